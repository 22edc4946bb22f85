"""Work around two known breakages of this stack, inside the package (not in a user's shell).

1. datasets 3.6 + torchvision 0.29: datasets' torch formatter imports
   `torchvision.io.VideoReader`, which torchvision 0.29 removed, so every ActivationsStore on
   an in-memory `datasets.Dataset` fails on its first row. Telling datasets that torchvision
   is absent skips that import (nothing here formats video).
2. jaxtyping 0.3.11 shape checks fail inside SAE-Bench's probe training on its own code
   path; `JAXTYPING_DISABLE=1` turns the runtime checks off. It must be set before jaxtyping
   is imported, so it is set when this package is imported (a user's explicit value wins).
"""

import os


def apply() -> None:
    os.environ.setdefault("JAXTYPING_DISABLE", "1")
    try:
        import datasets.config
    except ImportError:  # datasets is a dependency; guard only for partial installs
        return
    datasets.config.TORCHVISION_AVAILABLE = False
