"""Build hook (all metadata lives in pyproject.toml): install the auto-load .pth file.

`sae_lens_hierarchical_autoload.pth` must sit at the root of site-packages, where Python's
`site` module executes it at start-up (see sae_lens_hierarchical_autoload.py for what it
does). setuptools has no option for a top-level file, so `build_py` writes it:

* wheel / normal install: into build_lib, whose contents become the wheel's root, i.e.
  site-packages;
* editable install (PEP 660, `pip install -e .`): setuptools' editable_wheel ignores build_lib
  for the default (lenient) mode and points the `install` command's `install_lib` at the
  unpacked editable wheel, so the file is written there. The editable wheel's own
  `__editable__.*.pth` (which makes the module importable) sorts before ours, so it has run
  by the time ours imports the module.
"""

from __future__ import annotations

import os
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "sae_lens_hierarchical_autoload.pth"
# One line, starting with "import", as `site` requires; a missing module is ignored silently.
PTH_TEXT = (
    'import sys; exec("try:\\n    import sae_lens_hierarchical_autoload\\n'
    'except ImportError:\\n    pass")\n'
)


class build_py_with_autoload_pth(build_py):
    def run(self) -> None:
        super().run()
        target = self._pth_dir()
        if target is None:
            return
        os.makedirs(target, exist_ok=True)
        path = os.path.join(target, PTH_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(PTH_TEXT)

    def _pth_dir(self) -> str | None:
        if not getattr(self, "editable_mode", False):
            return self.build_lib
        wheel_root = self.get_finalized_command("install").install_lib
        if wheel_root and os.path.isdir(wheel_root) and any(
            name.endswith(".dist-info") for name in os.listdir(wheel_root)
        ):
            return wheel_root
        warnings.warn(
            f"sae-lens-hierarchical: could not locate the editable wheel's root, so {PTH_NAME} "
            "was not installed; `import sae_lens_hierarchical` before loading hierarchical SAEs",
            stacklevel=1,
        )
        return None

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": build_py_with_autoload_pth})
