"""wandb: a training run logs every loss term and the per-level metrics (L0, learned threshold,
the tree's edge count).

A tiny HSAE trains through SAELens's SyntheticSAERunner with `log_to_wandb=True` under
WANDB_MODE=offline and WANDB_DIR=tmp_path (no network). The offline run's `.wandb` file is
then read back: it is a LevelDB-style log (7-byte header ":W&B" + magic 0xBEE1 + version,
32 KiB blocks, records of [crc32 u32][length u16][type u8] with FULL/FIRST/MIDDLE/LAST
chunks) of `wandb_internal.Record` protobufs; wandb 0.31 ships no Python reader, so
`read_wandb_history` below parses it with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from sae_lens import LoggingConfig
from sae_lens.synthetic import HierarchyConfig, SyntheticModelConfig, ZipfianFiringProbabilityConfig
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

import sae_lens_hierarchical  # noqa: F401
from sae_lens_hierarchical import HierarchicalTrainingSAEConfig

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a wandb transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            continue
        else:
            raise AssertionError(f"unknown record type {kind} at byte {pos}")
    return records


def read_wandb_history(run_dir: Path, timeout: float = 60.0) -> list[dict[str, float]]:
    """The rows logged with wandb.log, as {key: value}, once the run's exit record is written.

    wandb's core process writes the log asynchronously, so `wandb.finish()` can return before
    the file is complete: wait (up to `timeout` seconds) for the final `exit` record.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in read_wandb_records(log):
            record = pb.Record()
            record.ParseFromString(raw)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [{(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
             for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, writing under tmp_path; wandb reads its settings once per process, so the
    process-wide setup is torn down before and after."""
    import wandb

    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path / "wandb"
    wandb.teardown()


# The learned tree (re-assigned every 4 steps, so it has edges from step 4 on) and the seed
# design's gated fixed tree (edges from the start).
DESIGNS = {
    "learned": {"tree_every": 4},
    "gated": {"tree": "fixed", "gate": "hard"},
}


@pytest.mark.parametrize("design", list(DESIGNS))
def test_training_logs_every_loss_term_and_per_level_metric(design, offline_wandb, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    sae_cfg = HierarchicalTrainingSAEConfig(
        d_in=16, d_sae=52, level_widths=[4, 12, 36], k=6,
        kl_coefficient=0.1, l2_coefficient=0.01, **DESIGNS[design],
    )
    synth = SyntheticModelConfig(
        num_features=52, hidden_dim=16,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.02),
        hierarchy=HierarchyConfig(total_root_nodes=4, branching_factor=3, max_depth=2,
                                  compensate_probabilities=True),
        seed=0,
    )
    n_steps, every = 20, 5
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=synth, sae=sae_cfg, training_samples=n_steps * 100, batch_size=100,
        lr=3e-3, eval_samples=500, checkpoint_path=None, output_path="out",
        logger=LoggingConfig(log_to_wandb=True, wandb_project="hsae-test", wandb_log_frequency=every),
    )
    SyntheticSAERunner(cfg).run()
    import wandb

    wandb.teardown()  # stops wandb's core process, which flushes the run's files

    (run_dir,) = offline_wandb.glob("offline-run-*")
    rows = read_wandb_history(run_dir)
    train_rows = [r for r in rows if "losses/mse_loss" in r]
    assert len(train_rows) == n_steps // every
    expected = {
        # the Matryoshka prefix reconstructions: roots (4 latents), roots + level 1 (16)
        "losses/mse_loss", "losses/inner_mse_loss_4", "losses/inner_mse_loss_16",
        "losses/kl_consistency_loss", "losses/l2_consistency_loss",
        "losses/auxiliary_reconstruction_loss", "losses/overall_loss",
        "metrics/l0_level_0", "metrics/l0_level_1", "metrics/l0_level_2",
        "metrics/threshold_level_0", "metrics/threshold_level_1", "metrics/threshold_level_2",
        "metrics/tree_edges",
    }
    for row in train_rows:
        missing = expected - set(row)
        assert not missing, f"step {row.get('_step')}: not logged: {sorted(missing)}"
        for key in expected:
            assert isinstance(row[key], (int, float)) and row[key] == row[key], key  # finite numbers
    # The L0 of the levels adds up to the one budget k (BatchTopK over every latent); the hard
    # gate then drops children whose parent is off.
    for row in train_rows:
        l0 = sum(row[f"metrics/l0_level_{lv}"] for lv in range(3))
        assert l0 == pytest.approx(6.0) if design == "learned" else 0 < l0 <= 6.0
    # The coefficients are on, so these terms carry signal (not the zero placeholder) wherever
    # the tree has edges (a learned tree has none before its first assignment).
    with_edges = [r for r in train_rows if r["metrics/tree_edges"] > 0]
    assert with_edges and (design == "learned" or with_edges == train_rows)
    if design == "gated":
        assert all(r["metrics/tree_edges"] == 48 for r in train_rows)  # 12 + 36 fixed edges
    assert any(r["losses/kl_consistency_loss"] > 0 for r in with_edges)
    assert all(r["losses/l2_consistency_loss"] > 0 for r in with_edges)
    assert all(r["losses/l2_consistency_loss"] == 0 for r in train_rows if r["metrics/tree_edges"] == 0)
    # The prefix levels reconstruct worse than the full tree, as they should. The logged terms
    # are the ones summed into the loss, i.e. weighted by `level_recon_weights`: unweight them.
    # The default leaves the roots' own prefix unweighted (0), so the roots-plus-level-1 prefix.
    last, weights = train_rows[-1], sae_cfg.level_recon_weights
    assert weights is not None and weights[0] == 0 and weights[1] not in (0, weights[-1])
    assert last["losses/inner_mse_loss_4"] == 0
    assert last["losses/inner_mse_loss_16"] / weights[1] >= last["losses/mse_loss"] / weights[-1]
    # The final synthetic evaluation is in the same run.
    assert any("final/mcc" in r for r in rows)
