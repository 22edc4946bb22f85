"""Release ids: the packaged directory merges into SAELens's; publish + offline from_pretrained.

The round trip (`test_publish_then_from_pretrained_offline_by_release_id`):
1. two tiny HSAEs are trained a few steps and saved for inference;
2. `releases.publish` runs SAELens's real `upload_saes_to_huggingface`. ONLY the network
   calls are replaced (class `LocalHub` below: `HfApi.repo_info`, `create_repo`,
   `HfApi.upload_folder`, `HfApi.upload_file`, `get_hf_file_metadata`) by writes into a local
   folder standing for the Hub repo; upload_folder still runs huggingface_hub's own file
   selection (`_prepare_upload_folder_additions` with SAELens's allow_patterns), and the
   Hub's offline switch is on in this process so any other network call fails;
3. the test builds a real Hugging Face cache from that folder (blobs, snapshots/<sha>
   symlinks, refs/main), as `hf_hub_download` leaves it;
4. a fresh interpreter with HF_HOME=<cache>, HF_HUB_OFFLINE=1 and the release file written by
   publish runs `SAE.from_pretrained(release, sae_id)` without importing the plugin, and its
   outputs are compared bit for bit with those of the SAEs loaded from the trained output.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from builders import training_sae, warm_up
from sae_lens import SAE
from sae_lens.loading import pretrained_saes_directory as directory_module
from sae_lens.loading.pretrained_saes_directory import (
    get_pretrained_saes_directory,
    get_repo_id_and_folder_name,
)
from safetensors.torch import save_file

import sae_lens_hierarchical  # noqa: F401
from sae_lens_hierarchical.integrations import releases

PLACEHOLDER = "sae-lens-hierarchical-placeholder"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
ENV.pop("SAE_LENS_HIERARCHICAL_AUTOLOAD", None)


# ----------------------------------------------------------------------------------------------
# the packaged directory


def test_packaged_yaml_parses_and_is_merged_into_saelens_directory():
    ours = releases.packaged_releases()
    assert PLACEHOLDER in ours
    lookup = ours[PLACEHOLDER]
    assert lookup.repo_id == "sae-lens-hierarchical/placeholder" and lookup.conversion_func is None
    assert lookup.saes_map == {"blocks.8.hook_resid_pre": "blocks.8.hook_resid_pre"}
    directory = get_pretrained_saes_directory()
    assert directory[PLACEHOLDER] is releases._RELEASES[PLACEHOLDER]
    assert "gpt2-small-res-jb" in directory  # SAELens's own releases are still there
    assert get_repo_id_and_folder_name(PLACEHOLDER, "blocks.8.hook_resid_pre") == (
        "sae-lens-hierarchical/placeholder", "blocks.8.hook_resid_pre")
    # Every module that imported the function sees the merged directory.
    import sae_lens.saes.sae as sae_module

    assert sae_module.get_pretrained_saes_directory is directory_module.get_pretrained_saes_directory
    assert PLACEHOLDER in sae_module.get_pretrained_saes_directory()


def test_cache_clear_does_not_drop_our_releases():
    get_pretrained_saes_directory.cache_clear()
    directory_module.get_pretrained_saes_directory.cache_clear()
    assert PLACEHOLDER in directory_module.get_pretrained_saes_directory()
    assert releases.register_releases() == sorted(releases._RELEASES)  # idempotent
    assert PLACEHOLDER in directory_module.get_pretrained_saes_directory()


@pytest.mark.parametrize("bad, message", [
    ({"r": {"model": "m", "saes": [{"id": "a", "path": "a"}]}}, "has no 'repo_id' field"),
    ({"r": {"repo_id": "nope", "model": "m", "saes": [{"id": "a", "path": "a"}]}}, "'owner/name'"),
    ({"r": {"repo_id": "o/n", "model": "m", "saes": [{"id": "a"}]}}, "saes[0] needs 'id' and 'path'"),
    ({"r": {"repo_id": "o/n", "model": "m", "saes": [{"id": "a", "path": "a", "l0": "x"}]}},
     "saes[0].l0='x' must be a number"),
])
def test_release_file_errors_name_the_file_release_and_field(bad, message, tmp_path):
    path = tmp_path / "rel.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError) as exc:
        releases.register_releases(path)
    assert str(path) in str(exc.value) and "'r'" in str(exc.value) and message in str(exc.value)


def test_release_files_from_the_environment_merge_and_a_bad_one_only_warns(tmp_path, monkeypatch):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"hsae-env-test": {
        "repo_id": "o/n", "model": "m", "saes": [{"id": "a", "path": "folder/a", "l0": 3}]}}))
    monkeypatch.setenv(releases.ENV_RELEASE_FILES, os.pathsep.join([str(good), str(tmp_path / "missing.yaml")]))
    with pytest.warns(UserWarning, match="missing.yaml does not exist; that file is skipped"):
        names = releases.register_releases()
    assert "hsae-env-test" in names
    assert get_repo_id_and_folder_name("hsae-env-test", "a") == ("o/n", "folder/a")
    assert get_pretrained_saes_directory()["hsae-env-test"].expected_l0 == {"a": 3.0}


# ----------------------------------------------------------------------------------------------
# publish -> local stand-in for the Hub -> HF cache -> from_pretrained offline


class LocalHub:
    """The Hub's network endpoints, answered from a local folder per repo (nothing else)."""

    def __init__(self, root: Path):
        self.root = root
        self.commits = 0

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def api_class(self):
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS

        hub = self

        class LocalHfApi(HfApi):
            def repo_info(self, repo_id, *args, **kwargs):
                if not hub.repo_dir(repo_id).is_dir():
                    raise hub.not_found(repo_id)
                return {"id": repo_id}

            def create_repo(self, repo_id, *args, **kwargs):
                return hub.create_repo(repo_id)

            def upload_folder(self, *, folder_path, repo_id, path_in_repo=None,
                              allow_patterns=None, ignore_patterns=None, **kwargs):
                # huggingface_hub's own selection of files, then a local "commit".
                ops = self._prepare_upload_folder_additions(
                    folder_path, path_in_repo or "", allow_patterns=allow_patterns,
                    ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS,
                    repo_type=kwargs.get("repo_type"),
                )
                for op in ops:
                    hub.write(repo_id, op.path_in_repo, Path(op.path_or_fileobj).read_bytes())
                return ops

            def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
                data = (path_or_fileobj.read() if isinstance(path_or_fileobj, io.IOBase)
                        else Path(path_or_fileobj).read_bytes())
                hub.write(repo_id, path_in_repo, data)

        return LocalHfApi

    def not_found(self, repo_id: str):
        from huggingface_hub import errors
        from huggingface_hub.utils import RepositoryNotFoundError

        response_cls = errors.Response
        request_cls = sys.modules[response_cls.__module__.split(".")[0]].Request
        url = f"https://huggingface.co/api/models/{repo_id}"
        return RepositoryNotFoundError(f"{repo_id} not found",
                                       response=response_cls(404, request=request_cls("GET", url)))

    def create_repo(self, repo_id: str, *args, **kwargs) -> str:
        self.repo_dir(repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def write(self, repo_id: str, path_in_repo: str, data: bytes) -> None:
        assert self.repo_dir(repo_id).is_dir(), "upload before create_repo"
        dest = self.repo_dir(repo_id) / path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        self.commits += 1

    def file_metadata(self, url: str, *args, **kwargs):
        from huggingface_hub.utils import EntryNotFoundError

        repo_and_file = url.split("huggingface.co/", 1)[1]
        owner, name, _resolve, _revision, filename = repo_and_file.split("/", 4)
        if not (self.repo_dir(f"{owner}/{name}") / filename).is_file():
            raise EntryNotFoundError(f"{filename} not found")
        return {"filename": filename}


@pytest.fixture
def local_hub(tmp_path, monkeypatch) -> LocalHub:
    import huggingface_hub.constants as hf_constants
    from sae_lens.training import upload_saes_to_huggingface as upload_module

    hub = LocalHub(tmp_path / "hub-repos")
    # Only the functions that talk to the network; and any other call fails offline.
    monkeypatch.setattr(upload_module, "HfApi", hub.api_class())
    monkeypatch.setattr(upload_module, "create_repo", hub.create_repo)
    monkeypatch.setattr(upload_module, "get_hf_file_metadata", hub.file_metadata)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return hub


def populate_hf_cache(repo_dir: Path, repo_id: str, hf_home: Path) -> str:
    """The cache `hf_hub_download` leaves: blobs/<hash>, snapshots/<sha>/<path> -> blob, refs/main."""
    files = sorted(p for p in repo_dir.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
    base = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for p in files:
        data = p.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / commit / p.relative_to(repo_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks: the cache then holds copies, as on Windows
            shutil.copy2(blob, link)
    return commit


def save_trained(tmp_path: Path, design: str, seed: int) -> Path:
    sae = training_sae(design, seed=seed)
    warm_up(sae, n=10, seed=seed)  # past tree_every: a learned tree has edges
    assert (sae.tree_parent >= 0).any()
    out = tmp_path / "trained" / design
    sae.save_inference_model(str(out))
    # What SAELens's runner also writes: feature sparsity and its runner config.
    save_file({"sparsity": torch.linspace(-4, -1, sae.cfg.d_sae)}, str(out / "sparsity.safetensors"))
    (out / "runner_cfg.json").write_text(json.dumps({"seed": seed}))
    (out / "notes.txt").write_text("not part of SAELens's layout: must not be uploaded")
    return out


def test_publish_then_from_pretrained_offline_by_release_id(local_hub, tmp_path):
    repo_id, release = "hsae-org/tiny-hsaes", "hsae-tiny-test"
    dirs = {
        "blocks.0.hook_resid_post": save_trained(tmp_path, "learned", seed=0),
        "gated/blocks.0.hook_resid_post": save_trained(tmp_path, "gated", seed=1),
    }
    gen = torch.Generator().manual_seed(7)
    acts = torch.randn(512, 16, generator=gen)
    release_file = tmp_path / "my_releases.yaml"
    entry = releases.publish(dirs, repo_id=repo_id, release=release, model="tiny-model",
                             activations=acts, neuronpedia_ids={"blocks.0.hook_resid_post": "tiny/0-hsae"},
                             release_file=release_file)

    # The uploaded layout: one folder per SAE id with SAELens's four files, plus a README.
    repo = local_hub.repo_dir(repo_id)
    for sae_id in dirs:
        assert sorted(p.name for p in (repo / sae_id).iterdir()) == [
            "cfg.json", "runner_cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
        assert (repo / sae_id / "sae_weights.safetensors").read_bytes() == (
            dirs[sae_id] / "sae_weights.safetensors").read_bytes()
    assert f'SAE.from_pretrained("{repo_id}", "<sae_id>")' in (repo / "README.md").read_text()

    # The release entry: SAELens's fields, measured on the activations given.
    body = entry[release]
    assert body["repo_id"] == repo_id and body["model"] == "tiny-model"
    assert body["conversion_func"] is None
    saes = {s["id"]: s for s in body["saes"]}
    assert set(saes) == set(dirs) and all(s["path"] == s["id"] for s in saes.values())
    assert saes["blocks.0.hook_resid_post"]["neuronpedia"] == "tiny/0-hsae"
    for sae_id, d in dirs.items():
        measured = releases.measure(SAE.load_from_disk(str(d)), acts)
        assert saes[sae_id]["l0"] == pytest.approx(measured["l0"], abs=1e-5)
        assert saes[sae_id]["variance_explained"] == pytest.approx(measured["variance_explained"], abs=1e-5)
        assert 0 < saes[sae_id]["l0"] <= 84
    assert yaml.safe_load(release_file.read_text()) == entry
    # ... and it is registered in this process already.
    assert get_repo_id_and_folder_name(release, "gated/blocks.0.hook_resid_post") == (
        repo_id, "gated/blocks.0.hook_resid_post")

    # Expected outputs: the SAEs as trained (SAELens's own disk loader on the output dirs).
    x = torch.randn(64, 16, generator=gen)
    expected = {}
    for sae_id, d in dirs.items():
        sae = SAE.load_from_disk(str(d))
        with torch.no_grad():
            a = sae.encode(x)
            expected[sae_id] = {"acts": a, "out": sae.decode(a)}
    trees = {sae_id: SAE.load_from_disk(str(d)).tree_parent.tolist() for sae_id, d in dirs.items()}
    torch.save({"x": x, "expected": expected}, tmp_path / "expected.pt")

    hf_home = tmp_path / "hf-home"
    populate_hf_cache(repo, repo_id, hf_home)
    code = f"""
        import json, sys
        import torch
        from sae_lens import SAE
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
        e = torch.load({str(tmp_path / 'expected.pt')!r})
        result = {{}}
        for sae_id, exp in e["expected"].items():
            sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity({release!r}, sae_id)
            by_repo = SAE.from_pretrained({repo_id!r}, sae_id)  # the uploaded README's route
            with torch.no_grad():
                a = sae.encode(e["x"]); out = sae.decode(a)
                same_by_repo = torch.equal(by_repo.decode(by_repo.encode(e["x"])), out)
            result[sae_id] = {{
                "cls": type(sae).__name__, "same_acts": torch.equal(a, exp["acts"]),
                "tree": sae.tree_parent.tolist(), "gate": sae.cfg.gate,
                "same_out": torch.equal(out, exp["out"]), "same_by_repo": same_by_repo,
                "sparsity": sparsity.tolist()[:2], "neuronpedia_id": cfg.get("neuronpedia_id")}}
        lookup = get_pretrained_saes_directory()[{release!r}]
        result["expected_l0"] = lookup.expected_l0
        result["plugin_imported_by_autoload"] = "sae_lens_hierarchical_autoload" in sys.modules
        print(json.dumps(result))
    """
    env = {**ENV, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "SAE_LENS_HIERARCHICAL_RELEASES": str(release_file)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("plugin_imported_by_autoload")
    assert result.pop("expected_l0") == {k: v["l0"] for k, v in saes.items()}
    for sae_id, r in result.items():
        assert r["cls"] == "HierarchicalSAE"
        assert r["same_acts"] and r["same_out"] and r["same_by_repo"], sae_id
        assert r["sparsity"] == pytest.approx([-4.0, -4.0 + 3 / 83], abs=1e-6)
        assert r["tree"] == trees[sae_id]  # the tree travels with the weights
    assert result["gated/blocks.0.hook_resid_post"]["gate"] == "hard"
    assert result["blocks.0.hook_resid_post"]["gate"] == "none"
    # SAELens passes the directory's neuronpedia id on in the returned cfg dict.
    assert result["blocks.0.hook_resid_post"]["neuronpedia_id"] == "tiny/0-hsae"


def test_publish_checks_every_directory_before_uploading(local_hub, tmp_path):
    good = save_trained(tmp_path, "learned", seed=0)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        releases.publish({"a": good, "b": broken}, repo_id="hsae-org/x", release="x", model="m")
    assert local_hub.commits == 0 and not local_hub.root.exists()
    with pytest.raises(ValueError, match="relative folder"):
        releases.publish({"../a": good}, repo_id="hsae-org/x", release="x", model="m")
