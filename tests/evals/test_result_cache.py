"""`hsae eval`'s cache of results: reused only for the weights it was made from.

The silent failure it replaces: evaluating a retrained SAE into a folder that held results for
an SAE of the same name printed SAE-Bench's "Skipping ... results already exist" and reported
the old SAE's numbers under the new one.
"""

from __future__ import annotations

import os

from conftest import CTX, hsae, load_json, random_token_rows

from sae_lens_hierarchical.evals import run_all
from sae_lens_hierarchical.evals.run_all import RunSettings


def run(saes, tiny_model, out, capsys) -> tuple[dict, str]:
    settings = RunSettings(context_size=CTX, n_eval_prompts=8, batch_size_prompts=4)
    run_all.run_all_evals(saes, tiny_model, str(out), ["hierarchy"], random_token_rows(8), settings)
    path = out / "hierarchy" / "sae_custom_sae_eval_results.json"
    return load_json(path), capsys.readouterr().out


def test_results_of_other_weights_are_recomputed_and_same_weights_reused(tiny_model, tmp_path, capsys):
    out = tmp_path / "evals"
    first, _ = run([("sae", hsae(seed=0))], tiny_model, out, capsys)
    assert (out / run_all.CACHE_MANIFEST).is_file()

    again, said = run([("sae", hsae(seed=0))], tiny_model, out, capsys)
    assert "sae: reusing the cached results" in said
    assert again["eval_result_metrics"] == first["eval_result_metrics"]

    other, said = run([("sae", hsae(seed=1))], tiny_model, out, capsys)  # same name, other weights
    assert "sae: the cached results" in said and "made from other weights; recomputing" in said
    assert other["eval_result_metrics"] != first["eval_result_metrics"]


def test_results_without_a_record_are_recomputed_and_other_saes_kept(tiny_model, tmp_path, capsys):
    """Results from before digests were kept cannot be trusted; another SAE's files stay."""
    out = tmp_path / "evals"
    (out / "hierarchy").mkdir(parents=True)
    stale = out / "hierarchy" / "sae_custom_sae_eval_results.json"
    stale.write_text('{"stale": true}')
    kept = out / "hierarchy" / "my_sae_custom_sae_eval_results.json"  # a name that ends like it
    kept.write_text("{}")
    result, said = run([("sae", hsae(seed=0))], tiny_model, out, capsys)
    assert "weights this folder has no record of; recomputing" in said
    assert "stale" not in result and "eval_result_metrics" in result
    assert os.path.exists(kept)
