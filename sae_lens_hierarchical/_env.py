"""Work around two known breakages of this stack, inside the package (not in a user's shell).

1. datasets 3.6 + torchvision 0.29: datasets' torch formatter imports
   `torchvision.io.VideoReader`, which torchvision 0.29 removed, so every ActivationsStore on
   an in-memory `datasets.Dataset` fails on its first row. Telling datasets that torchvision
   is absent skips that import (nothing here formats video).
2. jaxtyping 0.3.11 shape checks fail inside SAE-Bench's probe training on its own code
   path; `JAXTYPING_DISABLE=1` turns the runtime checks off. jaxtyping reads it when it is
   imported, so it is set when this package is imported (a user's explicit value wins); if
   jaxtyping was imported first (its pytest plugin does that), its config is updated too, as
   the checks consult it at call time.
"""

import os
import sys


def apply() -> None:
    user_set = "JAXTYPING_DISABLE" in os.environ
    os.environ.setdefault("JAXTYPING_DISABLE", "1")
    if not user_set and "jaxtyping" in sys.modules:
        sys.modules["jaxtyping"].config.update("jaxtyping_disable", True)
    try:
        import datasets.config
    except ImportError:  # datasets is a dependency; guard only for partial installs
        return
    datasets.config.TORCHVISION_AVAILABLE = False
