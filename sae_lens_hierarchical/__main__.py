import sys

from sae_lens_hierarchical.cli import main

sys.exit(main())
