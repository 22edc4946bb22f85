"""Make `pip install sae-lens-hierarchical` enough: SAELens knows `hierarchical` as soon as it loads.

SAELens has no plugin discovery, so without this a fresh interpreter that loads a
`hierarchical` cfg.json (`SAE.load_from_disk`, `SAE.from_pretrained`,
`LanguageModelSAERunnerConfig.from_dict`) fails with `KeyError: 'hierarchical'` unless the
user first runs `import sae_lens_hierarchical`.

How it works:

1. The install puts `sae_lens_hierarchical_autoload.pth` at the root of site-packages (see
   setup.py; both a normal and an editable install). Python's `site` module runs a .pth
   file's `import` lines at start-up, so every interpreter imports this module.
2. This module is cheap: it imports nothing beyond `sys` and `os`, and only puts a finder at
   the front of `sys.meta_path`. Start-up does not import torch or SAELens.
3. The finder answers for exactly one module name, `sae_lens`. When something imports SAELens,
   the finder lets the normal finders locate it, and wraps that spec's loader so that right
   after SAELens's `__init__` has run, `sae_lens_hierarchical` is imported. Importing it
   registers the architecture and merges the plugin's release directory (both idempotent).

Guards: the finder skips itself while it looks SAELens up (no recursion); if
`sae_lens_hierarchical` is already being imported (the user imported it first, which imports
SAELens), nothing more happens since that import registers by itself; a failure while
loading the plugin becomes a RuntimeWarning and never breaks `import sae_lens`.

Opt out with the environment variable `SAE_LENS_HIERARCHICAL_AUTOLOAD=0`; then import
`sae_lens_hierarchical` yourself.
"""

from __future__ import annotations

import os
import sys

TARGET = "sae_lens"
PLUGIN = "sae_lens_hierarchical"
ENV_SWITCH = "SAE_LENS_HIERARCHICAL_AUTOLOAD"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def load_plugin() -> None:
    """Import the plugin unless it is already imported or being imported; never raise."""
    if PLUGIN in sys.modules:
        return
    try:
        __import__(PLUGIN)
    except Exception as e:  # a broken plugin must not break `import sae_lens`
        import warnings

        warnings.warn(
            f"sae_lens_hierarchical could not be loaded automatically after sae_lens "
            f"({type(e).__name__}: {e}); `import sae_lens_hierarchical` shows the full error",
            RuntimeWarning,
            stacklevel=2,
        )


class SAELensImportHook:
    """A `sys.meta_path` finder that runs `load_plugin()` once `sae_lens` has been executed."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname != TARGET or self._busy:
            return None
        self._busy = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            _run_after_exec(spec.loader)
        return spec


def _run_after_exec(loader) -> None:  # noqa: ANN001
    """Shadow the loader's exec_module (on the instance only) with one that then loads the plugin.

    The loader object itself is kept, so everything else SAELens relies on (for instance
    `importlib.resources.files("sae_lens")`, which reads its packaged YAML) is untouched.
    """
    original = loader.exec_module

    def exec_module(module) -> None:  # noqa: ANN001
        try:
            original(module)
        finally:
            try:
                del loader.exec_module  # back to the class's method
            except AttributeError:
                pass
        load_plugin()

    try:
        loader.exec_module = exec_module
    except (AttributeError, TypeError):  # an exotic loader (slots): no auto-loading
        pass


def install() -> None:
    """Put the hook on sys.meta_path once (idempotent); load now if SAELens is already loaded."""
    if not enabled():
        return
    if TARGET in sys.modules:
        load_plugin()
        return
    if not any(isinstance(f, SAELensImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, SAELensImportHook())


install()
