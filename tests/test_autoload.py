"""`pip install` is enough: a fresh interpreter that never imports the plugin can use it.

Each check runs a new Python process (the installed environment's own interpreter, so its
site-packages .pth files run) whose code only imports SAELens:
* `SAE.load_from_disk` and `TrainingSAE.load_from_disk` of a saved `hierarchical` SAE;
* `LanguageModelSAERunnerConfig.from_dict` with `architecture: hierarchical`;
* start-up stays cheap (neither torch nor the plugin is imported before SAELens is);
* importing the plugin first, then SAELens, registers exactly once;
* SAE_LENS_HIERARCHICAL_AUTOLOAD=0 turns the hook off.
The packaging test builds a wheel and an editable wheel from a copy of the project with the
installed setuptools (no network) and checks that both put the .pth at site-packages' root,
then installs the wheel into a folder and runs it from there.
`SAE.from_pretrained` by release id without importing the plugin is in test_releases.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from builders import training_sae, warm_up

ROOT = Path(__file__).resolve().parents[1]
PTH = "sae_lens_hierarchical_autoload.pth"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
ENV.pop("SAE_LENS_HIERARCHICAL_AUTOLOAD", None)


def run_python(code: str, cwd: Path, env: dict | None = None, args: tuple[str, ...] = ()) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last, which is returned."""
    proc = subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)], cwd=cwd, env=env or ENV,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_pth_file_is_installed_in_this_environment():
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / PTH
    assert pth.is_file(), (
        f"{pth} is missing: reinstall the project (pip install -e .) so setup.py installs it")
    assert "import sae_lens_hierarchical_autoload" in pth.read_text()


@pytest.fixture(scope="module")
def saved_sae(tmp_path_factory) -> tuple[Path, Path]:
    """A trained tiny HSAE saved for inference, and its expected outputs on fixed inputs."""
    d = tmp_path_factory.mktemp("saved")
    sae = training_sae("learned")
    warm_up(sae, n=12)  # past tree_every: the saved tree has edges
    assert (sae.tree_parent >= 0).any()
    sae.save_inference_model(str(d / "sae"))
    x = torch.randn(32, sae.cfg.d_in, generator=torch.Generator().manual_seed(5))
    from sae_lens import SAE

    # Expected outputs of the saved SAE loaded in this process (plugin imported): the fresh
    # interpreter must reproduce them. (The training SAE's own encode is BatchTopK over the
    # batch; inference is its learned per-token threshold.)
    loaded = SAE.load_from_disk(str(d / "sae"))
    with torch.no_grad():
        torch.save({"x": x, "out": loaded.decode(loaded.encode(x)), "tree": sae.tree_parent.clone()},
                   d / "expected.pt")
    return d / "sae", d / "expected.pt"


def test_fresh_interpreter_loads_hierarchical_saes_and_configs_without_importing_the_plugin(
        saved_sae, tmp_path):
    sae_dir, expected = saved_sae
    result = run_python(f"""
        import json, sys
        before = sorted(m for m in ("torch", "sae_lens", "sae_lens_hierarchical") if m in sys.modules)
        import torch
        from sae_lens import SAE, LanguageModelSAERunnerConfig, TrainingSAE
        registered = "sae_lens_hierarchical" in sys.modules
        sae = SAE.load_from_disk({str(sae_dir)!r})
        back = TrainingSAE.load_from_disk({str(sae_dir)!r})
        e = torch.load({str(expected)!r})
        with torch.no_grad():
            diff = (sae.decode(sae.encode(e["x"])) - e["out"]).abs().max().item()
        same_tree = torch.equal(sae.tree_parent, e["tree"]) and torch.equal(back.tree_parent, e["tree"])
        cfg = LanguageModelSAERunnerConfig.from_dict({{
            "sae": {{"architecture": "hierarchical", "d_in": 16, "d_sae": 84,
                    "level_widths": [4, 16, 64], "k": 7}},
            "model_name": "tiny", "hook_name": "blocks.0.hook_resid_post", "dataset_path": "",
            "logger": {{"log_to_wandb": False}}, "checkpoint_path": None}})
        print(json.dumps({{"before": before, "autoload": "sae_lens_hierarchical_autoload" in sys.modules,
                          "registered": registered, "cls": type(sae).__name__,
                          "training_cls": type(back).__name__, "diff": diff, "same_tree": same_tree,
                          "runner_sae_cfg": type(cfg.sae).__name__, "widths": cfg.sae.level_widths,
                          "k": cfg.sae.k}}))
    """, tmp_path)
    assert result["before"] == [], "start-up imported torch, SAELens or the plugin"
    assert result["autoload"] and result["registered"]
    assert result["cls"] == "HierarchicalSAE"
    assert result["training_cls"] == "HierarchicalTrainingSAE"
    assert result["diff"] < 1e-5
    assert result["same_tree"]
    assert result["runner_sae_cfg"] == "HierarchicalTrainingSAEConfig"
    assert result["widths"] == [4, 16, 64] and result["k"] == 7


def test_plugin_first_then_sae_lens_registers_once(tmp_path):
    result = run_python("""
        import json, warnings
        warnings.simplefilter("error", RuntimeWarning)
        import sae_lens_hierarchical
        import sae_lens
        from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
        sae_lens_hierarchical.register()  # idempotent
        import sae_lens_hierarchical_autoload as a
        a.install(); a.load_plugin()
        print(json.dumps({"inf": SAE_CLASS_REGISTRY["hierarchical"][0].__name__,
                          "train": SAE_TRAINING_CLASS_REGISTRY["hierarchical"][0].__name__,
                          "hooks": sum(isinstance(f, a.SAELensImportHook) for f in __import__("sys").meta_path)}))
    """, tmp_path)
    assert result == {"inf": "HierarchicalSAE", "train": "HierarchicalTrainingSAE", "hooks": 1}


def test_autoload_can_be_switched_off(saved_sae, tmp_path):
    sae_dir, _ = saved_sae
    result = run_python(f"""
        import json, sys
        from sae_lens import SAE
        try:
            SAE.load_from_disk({str(sae_dir)!r})
            err = None
        except KeyError as e:
            err = str(e)
        print(json.dumps({{"plugin": "sae_lens_hierarchical" in sys.modules, "err": err}}))
    """, tmp_path, env={**ENV, "SAE_LENS_HIERARCHICAL_AUTOLOAD": "0"})
    assert result == {"plugin": False, "err": "'hierarchical'"}


# ----------------------------------------------------------------------------------------------
# packaging: the .pth reaches site-packages' root from a wheel and from an editable wheel


def _project_copy(dest: Path) -> Path:
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "sae_lens_hierarchical_autoload.py"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "sae_lens_hierarchical", src / "sae_lens_hierarchical",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_wheel_and_editable_wheel_install_the_pth(tmp_path):
    src = _project_copy(tmp_path)
    out = tmp_path / "dist"
    names = {}
    for hook in ("wheel", "editable"):  # one process per build, as pip's frontends do
        build = f"""
            import json, sys
            from setuptools import build_meta
            print(json.dumps(build_meta.build_{hook}(sys.argv[1])))
        """
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(build), str(out)], cwd=src,
                              env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        names[hook] = json.loads(proc.stdout.strip().splitlines()[-1])

    with zipfile.ZipFile(out / names["wheel"]) as whl:
        files = whl.namelist()
        assert PTH in files and "sae_lens_hierarchical_autoload.py" in files
        assert "sae_lens_hierarchical/pretrained_hsaes.yaml" in files
        assert "import sae_lens_hierarchical_autoload" in whl.read(PTH).decode()
        record = whl.read(next(f for f in files if f.endswith(".dist-info/RECORD"))).decode()
        assert PTH + ",sha256=" in record
    with zipfile.ZipFile(out / names["editable"]) as whl:
        files = whl.namelist()
        assert PTH in files, files
        editable_pth = next(f for f in files if f.startswith("__editable__") and f.endswith(".pth"))
        assert editable_pth < PTH, "site runs .pth files in name order: the finder must come first"
        finder = whl.read(next(f for f in files if f.endswith("_finder.py"))).decode()
        assert "'sae_lens_hierarchical_autoload'" in finder  # the module is importable

    # Install the wheel into a folder and run from it: site processes the folder's .pth, and
    # the rest of this environment (torch, SAELens) is on the path without its own .pth files.
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                           "--quiet", "--target", str(target), str(out / names["wheel"])],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (target / PTH).is_file()
    purelib = sysconfig.get_paths()["purelib"]
    result = run_python(f"""
        import json, site, sys
        site.addsitedir({str(target)!r})
        sys.path.append({purelib!r})
        import sae_lens
        import sae_lens_hierarchical
        print(json.dumps({{"from": sae_lens_hierarchical.__file__,
                           "registered": "hierarchical" in sae_lens.registry.SAE_CLASS_REGISTRY}}))
    """, tmp_path, args=("-S",))
    assert result["from"].startswith(str(target)) and result["registered"]
