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
from qtoy_core.analysis.trajectory import (BEHAVIOUR_KEYS, behaviour_metrics, change_points, formation_step,
                                          trajectory_panels)
from qtoy_plugins.callbacks.dynamics import Dynamics, circuit_spectra

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from fixed_stream import fixed_batches, tiny_run_config  # noqa: E402
from test_detectors import constructed  # noqa: E402  (hand-set previous-token + induction heads)


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


def test_spectra_give_the_reports_ov_copying_score():
    from qtoy_core.analysis import ov_circuit, spectrum

    model = randomised(qtoy_core.build_model("attention_only_2L", attn="bilinear", norm="rmsnorm", d_model=16,
                                             n_head=2, vocab_size=32, n_ctx=8), seed=4)
    out = circuit_spectra(model, top_k=3)
    w = model_weights(model)
    for i in range(2):  # the copying score `qtoy analyze` prints, from the OV circuit W_E W_V W_O W_U
        ref = [s.copying_score for s in spectrum(ov_circuit(w, i))]
        assert out[f"blocks.{i}.attn.ov_copying"] == pytest.approx(ref, abs=1e-5)


class PluginBilinearMLP(torch.nn.Module):
    """A third-party bilinear MLP with its own parameter names (gate / up / down), read only through
    its weight_views(): down((gate x) * (up x))."""

    def __init__(self, d_model, d_mlp, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate = torch.nn.Parameter(torch.randn(d_mlp, d_model, generator=g) * 0.3)
        self.up = torch.nn.Parameter(torch.randn(d_mlp, d_model, generator=g) * 0.3)
        self.down = torch.nn.Parameter(torch.randn(d_model, d_mlp, generator=g) * 0.3)

    def forward(self, x):
        return ((x @ self.gate.T) * (x @ self.up.T)) @ self.down.T

    def weight_views(self):
        return {"W_l": self.gate.detach(), "W_r": self.up.detach(), "W_out": self.down.detach()}


def test_spectra_read_a_plugin_mlp_through_its_weight_views():
    model = randomised(qtoy_core.build_model("transformer_1L", attn="quadratic", mlp="gelu", norm="none", d_model=16,
                                             n_head=2, vocab_size=32, n_ctx=8))
    assert "blocks.0.mlp.top_eig" not in circuit_spectra(model, top_k=3)  # a GELU MLP has no interaction matrix
    mlp = model.blocks[0].mlp = PluginBilinearMLP(16, 24, seed=2)
    out = circuit_spectra(model, top_k=4)
    # by hand: u the top left singular vector of W_out, Q_u = sym(sum_h u.W_out[:, h] W_l[h]^T W_r[h])
    W_l, W_r, W_out = mlp.gate.detach().double(), mlp.up.detach().double(), mlp.down.detach().double()
    u = torch.linalg.svd(mlp.down.detach(), full_matrices=False).U[:, 0].double()
    Q = torch.einsum("h,hm,hn->mn", u @ W_out, W_l, W_r)
    eig = torch.linalg.eigvalsh((Q + Q.T) / 2)
    ref = eig[eig.abs().argsort(descending=True)][:4]
    assert torch.allclose(torch.tensor(out["blocks.0.mlp.top_eig"], dtype=torch.float64), ref, rtol=1e-4, atol=1e-6)


def test_behaviour_metrics_are_the_reports_induction_numbers():
    from qtoy_core.analysis.detectors import head_detectors
    from qtoy_core.analysis.report import behaviour_data

    model = constructed("quadratic")  # L1H0 attends exactly to the token after an earlier copy
    values, notes = behaviour_metrics(model)
    assert set(values) == set(BEHAVIOUR_KEYS) and notes == []
    det = head_detectors(model)
    assert values["induction (behaviour)"] == pytest.approx(float(np.nanmax(det.scores["induction"].numpy())))
    # the planted head (only where a token repeats right after itself does it also attend to its own
    # position, which is no induction target)
    assert values["induction (behaviour)"] == pytest.approx(float(det.scores["induction"][1, 0]))
    assert values["induction (behaviour)"] > 0.9
    assert values["induction (behaviour) chance"] == pytest.approx(float(det.uniform["induction"][1, 0]))
    report = behaviour_data(model)  # what qtoy analyze shows: the same numbers
    assert values["induction (behaviour)"] == max(h["induction"] for h in report["heads"] if h["induction"] is not None)
    assert values["induction loss (second half)"] == report["induction_loss"]["second_half_mean"]
    assert values["induction loss (first half)"] == report["induction_loss"]["first_half_mean"]
    # the planted head, writing at a small gain (its unnormalised pattern sums several matches), predicts
    # the repeated half; without its output both halves are at chance
    on = behaviour_metrics(constructed("quadratic", induction_gain=2.0))[0]
    off = behaviour_metrics(constructed("quadratic", induction_gain=0.0))[0]
    assert on["induction loss (second half)"] < 0.7 * on["induction loss (first half)"]
    assert on["induction loss (second half)"] < 0.7 * off["induction loss (second half)"]
    assert off["induction loss (second half)"] == pytest.approx(off["induction loss (first half)"], rel=0.05)
    assert on["induction (behaviour)"] == off["induction (behaviour)"]  # the pattern is the same either way
    assert values["induction (behaviour) chance"] < 0.3
    bilinear = behaviour_metrics(constructed("bilinear"))[0]  # both QK pairs equal: the same pattern
    assert bilinear["induction (behaviour)"] == pytest.approx(values["induction (behaviour)"])


class RunningMeanAttention(torch.nn.Module):
    """A third-party attention that records no pattern: the causal running mean of its input."""

    def forward(self, x, **_):
        return x.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]


def test_behaviour_metrics_without_patterns_are_none_with_a_note():
    model = randomised(qtoy_core.build_model("attention_only_2L", attn="quadratic", d_model=16, n_head=2,
                                             vocab_size=32, n_ctx=16))
    for block in model.blocks:
        block.attn = RunningMeanAttention()
    values, notes = behaviour_metrics(model)
    assert values["induction (behaviour)"] is None and values["induction (behaviour) chance"] is None
    assert any("records no hook_pattern" in n for n in notes) and len(notes) == 2
    assert values["induction loss (second half)"] > 0  # the loss needs no pattern


def test_the_induction_panel_shows_both_scores_and_extra_metrics_get_a_panel():
    rows = [{"step": s, "tokens": 8 * s, "kind": "snapshot", "loss": 5.0 / s, "induction (weights)": 0.1 * s,
             "induction (behaviour)": 0.2 * s, "induction (behaviour) chance": 0.05, "induction loss (first half)": 4.0,
             "induction loss (second half)": 4.0 / s, "similarity to final": 0.5, "similarity to final stderr": 0.01,
             "my probe": float(s), "notes": ["a note"]} for s in (1, 2, 4)]
    panels = dict(trajectory_panels(rows))
    assert panels["induction score"] == ["induction (behaviour)", "induction (behaviour) chance", "induction (weights)"]
    assert [ks for name, ks in panels.items() if name.startswith("induction loss")] == [
        ["induction loss (first half)", "induction loss (second half)"]]
    assert panels["my probe"] == ["my probe"] and "notes" not in panels and "loss (nats)" in panels


def test_formation_step_is_where_the_score_stays_above_half_its_rise_above_chance():
    # the docs' induction-2L run (dynamics.json, rounded): the behaviour score wobbles around its
    # chance level (0.023) for 1500 steps, so "half of the final value first reached" said step 1
    steps = [1, 32, 250, 1000, 1500, 1750, 2000, 2250, 2500, 3000]
    weights = [0.0, 0.001, 0.010, 0.005, 0.005, 0.028, 0.047, 0.058, 0.065, 0.067]
    behaviour = [0.028, 0.030, 0.026, 0.024, 0.022, 0.024, 0.027, 0.030, 0.031, 0.035]
    rows = [{"step": s, "induction (weights)": w, "induction (behaviour)": b, "induction (behaviour) chance": 0.023}
            for s, w, b in zip(steps, weights, behaviour)]
    assert formation_step(rows, "induction (weights)") == 2000  # 0.028 < 0.0335 <= 0.047
    # rise above chance: 0.012 at the end, half 0.006; 0.030 at step 32 and 0.027 at 2000 do not stay
    assert formation_step(rows, "induction (behaviour)") == 2250
    assert formation_step([dict(r, **{"induction (behaviour)": 0.02}) for r in rows], "induction (behaviour)") is None
    assert formation_step(rows, "my probe") is None


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
    # the behaviour-based induction score per checkpoint: qtoy analyze's numbers for that checkpoint
    from qtoy_core.run_files import load_run_dataset

    tokenizer = load_run_dataset(run)[1].tokenizer()
    for row in (rows[0], last):
        values, _ = behaviour_metrics(qtoy_core.ToyTransformer.from_pretrained(run, step=row["step"]).eval(), tokenizer)
        assert {k: row[k] for k in BEHAVIOUR_KEYS} == pytest.approx(values)
    assert "induction (behaviour)" in result.output
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
