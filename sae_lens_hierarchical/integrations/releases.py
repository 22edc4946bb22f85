"""Release ids for hierarchical SAEs: SAELens's pretrained directory, extended by this package.

`SAE.from_pretrained(release, sae_id)` looks the release up in SAELens's directory (its
packaged `pretrained_saes.yaml`, parsed once by the `functools.cache`d
`get_pretrained_saes_directory()`) to find the Hugging Face repo, the folder inside it and
the expected L0 / variance explained. SAELens has no public way to add releases, so this
module merges the package's own `pretrained_hsaes.yaml` (plus any files named in the
environment variable `SAE_LENS_HIERARCHICAL_RELEASES`, separated by `os.pathsep`) into the
cached dict that every SAELens consumer reads.

The merged entries live in SAELens's cached dict; `patches.install_directory_wrapper` keeps
them there across `cache_clear()` and in modules that imported the function by name. A name
collision with a SAELens release keeps SAELens's entry and warns once.

`publish(...)` uploads trained HSAEs with SAELens's `upload_saes_to_huggingface` (the layout
`SAE.from_pretrained(repo_id, sae_id)` reads: one folder per SAE id holding cfg.json,
sae_weights.safetensors, sparsity.safetensors, runner_cfg.json) and returns, optionally
writes, the release entry for it, with L0 and variance explained measured on activations you
pass.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

from sae_lens_hierarchical.integrations import patches

PACKAGED_DIRECTORY = "pretrained_hsaes.yaml"
ENV_RELEASE_FILES = "SAE_LENS_HIERARCHICAL_RELEASES"

# Our releases, by name. Filled by register_releases(); the wrapper re-merges from here.
_RELEASES: dict[str, PretrainedSAELookup] = {}
_WARNED_COLLISIONS: set[str] = set()


# ---------------------------------------------------------------------------------------
# Parsing (the same rules as SAELens's get_pretrained_saes_directory, with clear errors)
# ---------------------------------------------------------------------------------------


def parse_release_directory(data: Any, source: str = "<release directory>") -> dict[str, PretrainedSAELookup]:
    """Turn a parsed `pretrained_saes.yaml`-style mapping into SAELens lookups.

    Defaults follow SAELens's parser (variance_explained 1.0, l0 0.0, neuronpedia None); a
    missing or mistyped field raises ValueError naming the file, the release and the field.
    """
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: the top level must map release names to releases")
    out: dict[str, PretrainedSAELookup] = {}
    for release, value in data.items():
        where = f"{source}: release {release!r}"
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping with repo_id, model and saes")
        for key in ("repo_id", "model", "saes"):
            if key not in value:
                raise ValueError(f"{where} has no {key!r} field")
        if not isinstance(value["repo_id"], str) or value["repo_id"].count("/") != 1:
            raise ValueError(f"{where}: repo_id={value['repo_id']!r} must be 'owner/name'")
        if not isinstance(value["saes"], list) or not value["saes"]:
            raise ValueError(f"{where}: 'saes' must be a non-empty list")
        saes_map: dict[str, str] = {}
        l0: dict[str, float] = {}
        var: dict[str, float] = {}
        npd: dict[str, Any] = {}
        nsf: dict[str, float] = {}
        for i, sae in enumerate(value["saes"]):
            if not isinstance(sae, Mapping) or "id" not in sae or "path" not in sae:
                raise ValueError(f"{where}: saes[{i}] needs 'id' and 'path'")
            sae_id = str(sae["id"])
            if sae_id in saes_map:
                raise ValueError(f"{where}: sae id {sae_id!r} appears twice")
            saes_map[sae_id] = str(sae["path"])
            var[sae_id] = _number(sae.get("variance_explained", 1.0), f"{where}: saes[{i}].variance_explained")
            l0[sae_id] = _number(sae.get("l0", 0.0), f"{where}: saes[{i}].l0")
            npd[sae_id] = sae.get("neuronpedia")
            if "norm_scaling_factor" in sae:
                nsf[sae_id] = _number(sae["norm_scaling_factor"], f"{where}: saes[{i}].norm_scaling_factor")
        out[str(release)] = PretrainedSAELookup(
            release=str(release),
            repo_id=value["repo_id"],
            model=str(value["model"]),
            conversion_func=value.get("conversion_func"),
            saes_map=saes_map,
            expected_var_explained=var,
            expected_l0=l0,
            neuronpedia_id=npd,
            norm_scaling_factor=nsf,
            config_overrides=value.get("config_overrides"),
        )
    return out


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}={value!r} must be a number")
    return float(value)


def load_release_file(path: str | Path) -> dict[str, PretrainedSAELookup]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"release file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"release file {path} is not valid YAML: {e}") from None
    return parse_release_directory(data, str(path))


def packaged_releases() -> dict[str, PretrainedSAELookup]:
    """The releases in the package's own pretrained_hsaes.yaml."""
    resource = files("sae_lens_hierarchical").joinpath(PACKAGED_DIRECTORY)
    data = yaml.safe_load(resource.read_text())
    return parse_release_directory(data, f"sae_lens_hierarchical/{PACKAGED_DIRECTORY}")


# ---------------------------------------------------------------------------------------
# Merging into SAELens's directory
# ---------------------------------------------------------------------------------------


def _merge_into(directory: dict[str, PretrainedSAELookup]) -> None:
    for name, lookup in _RELEASES.items():
        present = directory.get(name)
        if present is None:
            directory[name] = lookup
        elif present is not lookup and name not in _WARNED_COLLISIONS:
            _WARNED_COLLISIONS.add(name)
            warnings.warn(
                f"release {name!r} is already in SAELens's pretrained directory; SAELens's "
                "entry is kept and sae_lens_hierarchical's is ignored",
                stacklevel=3,
            )


def register_releases(*paths: str | Path) -> list[str]:
    """Merge the packaged releases, those of `SAE_LENS_HIERARCHICAL_RELEASES` and `paths`.

    Idempotent; later sources win over earlier ones for the same release name (so a file
    can update a release). A bad file named in the environment variable is skipped with a
    warning; a bad file passed here raises. Returns the names of every release registered.
    """
    sources: list[dict[str, PretrainedSAELookup]] = [packaged_releases()]
    for p in os.environ.get(ENV_RELEASE_FILES, "").split(os.pathsep):
        if not p.strip():
            continue
        try:
            sources.append(load_release_file(p.strip()))
        except (OSError, ValueError) as e:  # a bad environment must not stop the plugin loading
            warnings.warn(f"{ENV_RELEASE_FILES}: {e}; that file is skipped", stacklevel=2)
    sources.extend(load_release_file(p) for p in paths)
    for releases in sources:
        add_releases(releases)
    patches.install_directory_wrapper(_merge_into)
    return sorted(_RELEASES)


def add_releases(releases: Mapping[str, PretrainedSAELookup]) -> None:
    """Register already-parsed releases (replacing our own earlier entry of the same name)."""
    directory = patches.original_directory()
    for name, lookup in releases.items():
        old = _RELEASES.get(name)
        if old is not None and directory.get(name) is old:
            del directory[name]  # our previous version of this release
        _RELEASES[name] = lookup
    _merge_into(directory)


# ---------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------


def measure(sae: Any, activations: Any, batch_size: int = 4096) -> dict[str, float]:
    """Mean L0 and variance explained (SAELens's definition) of `sae` on `activations` [N, d_in]."""
    import torch
    from sae_lens.evals import ExplainedVarianceCalculator

    x_all = torch.as_tensor(activations)
    x_all = x_all.reshape(-1, x_all.shape[-1])
    calc = ExplainedVarianceCalculator()
    l0_sum, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start : start + batch_size].to(sae.device, sae.dtype)
            acts = sae.encode(x)
            calc.add_batch(sae_output=sae.decode(acts), hidden_acts=x)
            l0_sum += (acts != 0).sum().item()
            n += x.shape[0]
    if n == 0:
        raise ValueError("measure: no activations given")
    return {"l0": l0_sum / n, "variance_explained": float(calc.compute())}


def release_entry(
    release: str,
    repo_id: str,
    model: str,
    saes: Mapping[str, Mapping[str, Any]],
    conversion_func: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A YAML-ready release entry: {release: {repo_id, model, conversion_func, saes: [...]}}.

    `saes` maps each SAE id to its fields: path (defaults to the id, the folder that
    upload_saes_to_huggingface uses), l0, variance_explained, neuronpedia.
    """
    items = []
    for sae_id, fields in saes.items():
        item: dict[str, Any] = {"id": sae_id, "path": fields.get("path", sae_id)}
        for key in ("l0", "variance_explained", "norm_scaling_factor"):
            if fields.get(key) is not None:
                item[key] = round(float(fields[key]), 6)
        item["neuronpedia"] = fields.get("neuronpedia")
        items.append(item)
    body: dict[str, Any] = {"repo_id": repo_id, "model": model, "conversion_func": conversion_func}
    if config_overrides:
        body["config_overrides"] = dict(config_overrides)
    body["saes"] = items
    entry = {release: body}
    parse_release_directory(entry, f"release entry {release!r}")  # same checks as loading
    return entry


def write_release_entry(entry: Mapping[str, Any], path: str | Path) -> Path:
    """Add (or replace) the entry's releases in the YAML file at `path`, keeping the others."""
    path = Path(path)
    existing: dict[str, Any] = {}
    if path.exists():
        existing = yaml.safe_load(path.read_text()) or {}
        parse_release_directory(existing, str(path))
    existing.update(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(existing, sort_keys=False))
    return path


def publish(
    sae_dirs: Mapping[str, str | Path],
    repo_id: str,
    release: str,
    model: str,
    *,
    revision: str = "main",
    activations: Any = None,
    neuronpedia_ids: Mapping[str, str] | None = None,
    release_file: str | Path | None = None,
    upload: bool = True,
    register: bool = True,
    show_progress: bool = False,
    add_default_readme: bool = True,
) -> dict[str, Any]:
    """Upload trained HSAEs to `repo_id` in SAELens's layout and return their release entry.

    sae_dirs: SAE id -> a directory saved for inference (the runner's `output_path`, or
        `save_inference_model`): cfg.json + sae_weights.safetensors (+ sparsity.safetensors,
        runner_cfg.json). Each is loaded first, so a broken directory fails before any upload.
    activations: optional [N, d_in] tensor (or SAE id -> tensor) on which the entry's `l0`
        and `variance_explained` are measured.
    release_file: YAML file to add the entry to (created if missing; other releases kept).
    upload: False skips the upload and only builds the entry.
    register: also merge the release into this process's SAELens directory.

    The upload is SAELens's `upload_saes_to_huggingface(saes, repo_id, revision)`: it needs
    a Hugging Face token with write access (`huggingface-cli login` or HF_TOKEN). Release
    entries carry no revision: `SAE.from_pretrained` reads the repo's default branch, so
    publish releases to "main".
    """
    from sae_lens import SAE

    from sae_lens_hierarchical.config import ARCHITECTURE

    if not sae_dirs:
        raise ValueError("publish: no SAEs given")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"publish: repo_id={repo_id!r} must be 'owner/name'")
    fields: dict[str, dict[str, Any]] = {}
    for sae_id, directory in sae_dirs.items():
        if not sae_id or sae_id.startswith("/") or ".." in Path(sae_id).parts:
            raise ValueError(f"publish: SAE id {sae_id!r} must be a relative folder name in the repo")
        sae = SAE.load_from_disk(str(directory))
        if sae.cfg.architecture() != ARCHITECTURE:
            raise ValueError(f"publish: {directory} holds a {sae.cfg.architecture()!r} SAE, not {ARCHITECTURE!r}")
        info: dict[str, Any] = {"path": sae_id}
        acts = activations.get(sae_id) if isinstance(activations, Mapping) else activations
        if acts is not None:
            info.update(measure(sae, acts))
        if neuronpedia_ids and sae_id in neuronpedia_ids:
            info["neuronpedia"] = neuronpedia_ids[sae_id]
        fields[sae_id] = info
    entry = release_entry(release, repo_id, model, fields)

    if upload:
        # Looked up at call time, so a replaced network layer (tests, mirrors) is honoured.
        from sae_lens.training import upload_saes_to_huggingface as upload_module

        upload_module.upload_saes_to_huggingface(
            {sae_id: Path(d) for sae_id, d in sae_dirs.items()},
            hf_repo_id=repo_id,
            hf_revision=revision,
            show_progress=show_progress,
            add_default_readme=add_default_readme,
        )
    if release_file is not None:
        write_release_entry(entry, release_file)
    if register:
        add_releases(parse_release_directory(entry, f"release entry {release!r}"))
        patches.install_directory_wrapper(_merge_into)
    return entry
