"""Generate each plugin eval's `eval_output_schema_<eval_type_id>.json`, as SAE-Bench does.

SAE-Bench's `sae_bench/evals/generate_json_schemas.py` walks only its own eval folders; this
walks ours with the same rule: every BaseEvalOutput subclass in an `eval_output.py` gets
`TypeAdapter(cls).json_schema()` written next to it. Run after changing an output class:

    python -m sae_lens_hierarchical.evals.generate_json_schemas
"""

import importlib
import json
import os

from pydantic import TypeAdapter
from sae_bench.evals.base_eval_output import BaseEvalOutput

EVAL_PACKAGES = ("hierarchy", "levelwise", "path_attribution")
HERE = os.path.dirname(os.path.abspath(__file__))


def output_classes() -> dict[str, type[BaseEvalOutput]]:
    """{schema file path: output class} for every plugin eval."""
    found: dict[str, type[BaseEvalOutput]] = {}
    for name in EVAL_PACKAGES:
        module = importlib.import_module(f"sae_lens_hierarchical.evals.{name}.eval_output")
        for obj in module.__dict__.values():
            if isinstance(obj, type) and issubclass(obj, BaseEvalOutput) and obj is not BaseEvalOutput:
                path = os.path.join(HERE, name, f"eval_output_schema_{obj.eval_type_id}.json")
                found[path] = obj
    return found


def schema(cls: type[BaseEvalOutput]) -> dict:
    return TypeAdapter(cls).json_schema()


def main() -> None:
    for path, cls in output_classes().items():
        with open(path, "w") as f:
            json.dump(schema(cls), f, indent=2)
            f.write("\n")
        print(f"Generated schema for {cls.__name__} in {path}")


if __name__ == "__main__":
    main()
