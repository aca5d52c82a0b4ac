"""The dynamics callback reads weights through the weight views (every QK pair, bilinear MLPs, folded
norm gains), draws its own `qtoy plot` panels, and `qtoy dynamics` / `qtoy similarity --checkpoints`
turn a run's checkpoints into one picture and a matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import qtoy_core
from qtoy_core.analysis import model_weights, qk_matrix
from qtoy_core.analysis.trajectory import change_points
from qtoy_plugins.callbacks.dynamics import Dynamics, circuit_spectra

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from fixed_stream import fixed_batches, tiny_run_config  # noqa: E402


def randomised(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


def test_spectra_cover_every_qk_pair_the_mlp_and_fold_norm_gains():
    model = randomised(qtoy_core.build_model("transformer_1L", attn="bilinear", mlp="bilinear", norm="rmsnorm",
                                             d_model=16, n_head=2, vocab_size=32, n_ctx=8))
    out = circuit_spectra(model, top_k=3)
    assert {"blocks.0.attn.qk_sv", "blocks.0.attn.qk2_sv", "blocks.0.attn.ov_sv", "blocks.0.mlp.top_eig"} <= set(out)
    w = model_weights(model)  # gains folded, as `qtoy analyze` reads them
    for f, key in enumerate(["blocks.0.attn.qk_sv", "blocks.0.attn.qk2_sv"]):
        ref = torch.linalg.svdvals(qk_matrix(w, 0, factor=f).AB.double())[:, :3]
        assert torch.allclose(torch.tensor(out[key], dtype=torch.float64), ref, rtol=1e-5)
    # the attribute-based reading (no ln1 gain, first pair only) disagrees: the gains matter here
    attn = model.blocks[0].attn
    wq = attn.q_proj.weight.view(2, -1, 16).double()
    wk = attn.k_proj.weight.view(2, -1, 16).double()
    naive = torch.linalg.svdvals(attn.scale * wq.transpose(1, 2) @ wk)[:, :3]
    assert not torch.allclose(torch.tensor(out["blocks.0.attn.qk_sv"], dtype=torch.float64), naive, rtol=1e-3)


def test_callback_records_and_draws_its_own_plot_panels(tmp_path):
    from qtoy_core.training.config import assemble_run_config
    from qtoy_core.training.plots import callback_panels, plot_run
    from qtoy_core.training.trainer import Trainer

    doc = tiny_run_config(max_iters=6)
    doc["callbacks"] = [{"name": "dynamics", "every": 2}]
    run = tmp_path / "run"
    Trainer(assemble_run_config(doc), run, train_batches=fixed_batches(), val_batches=list(fixed_batches(2, seed=9))).fit()
    records = [json.loads(line) for line in (run / "dynamics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6] and "blocks.0.mlp.top_eig" in records[-1]
    panels = callback_panels(run)
    assert len(panels) == len(Dynamics.plot_panels(run)) == 2
    assert plot_run(run).exists()


def test_change_points_find_a_planted_jump():
    steps = 10
    values = np.ones((steps, steps))
    for i in range(steps):
        for j in range(steps):
            values[i, j] = 1 - 0.01 * abs(i - j) - (0.5 if (i < 6) != (j < 6) else 0.0)
    assert change_points(values) == [6]


def test_dynamics_and_similarity_commands_on_a_log_schedule_run(tmp_path):
    from qtoy_cli.main import cli

    run = tmp_path / "run"
    args = ["train", "--model-type", "attention_only_2L", "--d-model", "16", "--n-head", "2", "--n-ctx", "16",
            "--batch-size", "4", "--precision", "fp32", "--no-compile", "--quiet", "--max-iters", "8",
            "--eval-interval", "8", "--eval-iters", "1", "--checkpoint-schedule", "log", "--out", str(run),
            "--set", "data.dataset.val_documents=8"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["dynamics", str(run), "--batches", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads((run / "dynamics.json").read_text())
    assert [r["step"] for r in rows] == [1, 2, 4, 8] and (run / "dynamics.png").exists()
    last = rows[-1]
    assert last["similarity to final"] == pytest.approx(1.0)
    assert {"loss", "excess", "excess copyable", "copying L0", "K-composition", "induction (weights)"} <= set(last)
    result = CliRunner().invoke(cli, ["similarity", str(run), "--checkpoints", "--batches", "1"])
    assert result.exit_code == 0, result.output
    doc = json.loads((run / "similarity.json").read_text())
    S = np.array(doc["similarity"])
    assert S.shape == (4, 4) and np.allclose(np.diag(S), 1) and np.allclose(S, S.T)
    assert (run / "similarity.png").exists()
    result = CliRunner().invoke(cli, ["similarity", str(run), str(run)])
    assert result.exit_code == 0 and "similarity 1.0000 +- 0.0000" in result.output, result.output
    # exact at vocab 4096, two layers: refused before any large allocation, pointing at method='data'
    result = CliRunner().invoke(cli, ["similarity", str(run), str(run), "--method", "exact", "--n-ctx", "2"])
    assert result.exit_code != 0 and "method='data'" in str(result.exception)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    result = CliRunner().invoke(cli, ["dynamics", str(empty)])
    assert result.exit_code != 0 and "--checkpoint-schedule log" in str(result.exception)
