"""`hsae`: the command line over SAELens's own runners.

    hsae train CONFIG.yaml [--set KEY=VALUE ...] [--check]

CONFIG.yaml holds SAELens's own runner-config keys, so every SAELens option works:
`LanguageModelSAERunnerConfig` keys for language-model activations, or
`SyntheticSAERunnerConfig` keys (recognised by a `synthetic_model:` section) for SAELens's
synthetic data. The `sae:` section names the architecture (default "hierarchical") and its
fields. Every key and value is checked before any model or dataset loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

import sae_lens_hierarchical  # noqa: F401  (registers the architecture)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and value."""


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_keys(section: dict[str, Any], allowed: set[str], where: str, path: str) -> None:
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key {where + key!r}{hint}")


def _apply_override(cfg: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. --set sae.k_per_level=[4,8,16])")
    key, raw = item.split("=", 1)
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_runner_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Parse and validate a YAML runner config into SAELens's config object (no model loads)."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.synthetic import SyntheticModelConfig
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunnerConfig

    path = str(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of runner-config keys")
    for item in overrides or []:
        _apply_override(raw, item)

    synthetic = "synthetic_model" in raw
    runner_cls = SyntheticSAERunnerConfig if synthetic else LanguageModelSAERunnerConfig
    _check_keys(raw, _fields(runner_cls), "", path)

    sae = raw.get("sae")
    if not isinstance(sae, dict):
        raise ConfigError(f"{path}: an 'sae:' section with the SAE's fields is required")
    sae.setdefault("architecture", "hierarchical")
    arch = sae["architecture"]
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        raise ConfigError(
            f"{path}: sae.architecture={arch!r} is not a registered SAELens architecture; "
            f"allowed: {', '.join(sorted(SAE_TRAINING_CLASS_REGISTRY))}"
        )
    sae_cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch][1]
    _check_keys(sae, _fields(sae_cfg_cls) | {"architecture"}, "sae.", path)

    logger = raw.setdefault("logger", {"log_to_wandb": False})
    if not isinstance(logger, dict):
        raise ConfigError(f"{path}: 'logger:' must be a mapping of LoggingConfig keys")
    _check_keys(logger, _fields(LoggingConfig), "logger.", path)
    if synthetic and isinstance(raw["synthetic_model"], dict):
        _check_keys(raw["synthetic_model"], _fields(SyntheticModelConfig), "synthetic_model.", path)

    try:
        return runner_cls.from_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: invalid value: {e}") from None


def train(path: str | Path, overrides: list[str] | None = None) -> tuple[Any, str | None]:
    """Train from a YAML config through SAELens's runner; returns (sae, output path)."""
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner

    cfg = load_runner_config(path, overrides)
    if isinstance(cfg, LanguageModelSAERunnerConfig):
        sae = LanguageModelSAETrainingRunner(cfg).run()
        return sae, cfg.output_path
    result = SyntheticSAERunner(cfg).run()
    print(f"final eval: {result.final_eval}")
    return result.sae, cfg.output_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hsae",
        description="Hierarchical SAEs for SAELens: train through SAELens's own runners.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_train = sub.add_parser(
        "train",
        help="train an SAE from a YAML runner config",
        description=(
            "Train an SAE from CONFIG.yaml through SAELens's runner. The YAML holds "
            "LanguageModelSAERunnerConfig keys (or SyntheticSAERunnerConfig keys when it has "
            "a 'synthetic_model:' section); 'sae:' holds the SAE's fields, with "
            "architecture: hierarchical by default. Keys and values are checked before any "
            "model loads. The trained SAE is saved to output_path in SAELens's format."
        ),
    )
    p_train.add_argument("config", help="path to the YAML runner config")
    p_train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (dotted for sections, YAML values), e.g. --set sae.k_per_level=[4,8,16]",
    )
    p_train.add_argument(
        "--check", action="store_true", help="only validate the config, then exit"
    )
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        if args.command == "train":
            if args.check:
                load_runner_config(args.config, args.overrides)
                print(f"{args.config}: OK")
                return 0
            _, out = train(args.config, args.overrides)
            if out is not None:
                print(f"Saved SAE to: {Path(out).resolve()}")
            return 0
    except ConfigError as e:
        print(f"hsae: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
