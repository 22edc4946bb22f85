"""SAE-Bench-format evals for hierarchical (and flat) SAEs, plus runners for the stock evals.

Plugin evals, each a package in SAE-Bench's layout (eval_config.py, eval_output.py, main.py
with run_eval and a CLI, eval_output_schema_<id>.json written by `generate_json_schemas`):

* `hierarchy`: hierarchical consistency of the SAE's tree (native or post-hoc).
* `levelwise`: the standard metrics broken down per level.
* `path_attribution`: each root-to-latent path node's share of the reconstruction, of a probe
  direction and of the model's logits.

Around them: `common` (SAE, model, token and tree plumbing shared by the three), `stock`
(SAE-Bench's core, sparse_probing, meta_structure, absorption and autointerp run unchanged
with a model in hand) and `run_all` (every eval over a set of SAEs). The Markdown and PNG
comparison report of `hsae eval` is `sae_lens_hierarchical.reporting`; the SAE-Bench patches
the stock runners use are in `sae_lens_hierarchical.integrations.patches`.
Each eval folder has a README.md.
"""

EVAL_TYPE_IDS = ("hierarchy", "levelwise", "path_attribution")
