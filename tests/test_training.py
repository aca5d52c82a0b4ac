"""The Trainer and `qtoy train`: learning, exact resume, atomic checkpoints, precision, DDP, generation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qtoy_core import ToyTransformer, build_model
from qtoy_core.generate import generate
from qtoy_core.training import precision as precision_mod
from qtoy_core.training.config import ConfigFileError, assemble_run_config
from qtoy_core.training.run_folder import RunFolder, read_metrics
from qtoy_core.training.trainer import Trainer, TrainingStopped, cosine_schedule

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from fixed_stream import GLOBAL_BATCH, fixed_batches, tiny_run_config  # noqa: E402

SMALL_SYNTHETIC = ["--d-model", "64", "--n-head", "2", "--n-ctx", "64", "--batch-size", "8", "--precision", "fp32",
                   "--no-compile", "--quiet"]


def _train_fixed(out, stop_at=None, **train):
    config = assemble_run_config(tiny_run_config(**train))

    class StopAt:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_step_end(self, trainer, m):
            if stop_at is not None and m["step"] == stop_at:
                raise KeyboardInterrupt  # a crash after the step's metrics were written

    trainer = Trainer(config, out, resume=(Path(out) / "checkpoint.json").exists() and stop_at is None,
                      callbacks=[StopAt()], train_batches=fixed_batches(), val_batches=list(fixed_batches(2, seed=9)))
    return trainer


def test_schedule_warms_up_then_decays_to_min():
    values = [cosine_schedule(s, warmup=10, total=100, min_lr_frac=0.1) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(values[10:], values[11:]))


def test_fixed_stream_training_learns_and_writes_a_complete_run(tmp_path):
    trainer = _train_fixed(tmp_path / "run", max_iters=40)
    summary = trainer.fit()
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 40 and losses[-1] < losses[0] - 1.0
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(metrics[0])
    assert summary["val_loss"] is not None
    run = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "checkpoint.json", "metrics.jsonl"):
        assert (run / name).exists(), name
    doc = json.loads((run / "config.json").read_text())
    assert doc["plugins"]["attention"]["distribution"] == "qtoy"
    assert set(doc) >= {"model", "data", "train", "optimizer", "plugins", "qtoy_version"}
    model = ToyTransformer.from_pretrained(run)
    torch.testing.assert_close(model.state_dict()["embed.weight"], trainer.model.state_dict()["embed.weight"])
    best = ToyTransformer.from_pretrained(run / "best")
    assert best.config == model.config


def test_resume_continues_step_for_step(tmp_path):
    _train_fixed(tmp_path / "full", max_iters=20, checkpoint_interval=5).fit()
    with pytest.raises(KeyboardInterrupt):
        _train_fixed(tmp_path / "cut", stop_at=13, max_iters=20, checkpoint_interval=5).fit()
    assert RunFolder(tmp_path / "cut").latest_checkpoint()[1] == 10
    resumed = Trainer(assemble_run_config(tiny_run_config(max_iters=20, checkpoint_interval=5)), tmp_path / "cut",
                      resume=True, train_batches=None, val_batches=list(fixed_batches(2, seed=9)))
    # the fixed stream has no state of its own: skip what the first 10 steps consumed
    stream = fixed_batches()
    for _ in range(10):
        next(stream)
    resumed._given_train = stream
    resumed.fit()
    full = [m["loss"] for m in read_metrics(tmp_path / "full") if "loss" in m]
    cut = [m["loss"] for m in read_metrics(tmp_path / "cut") if "loss" in m]
    assert cut == full  # bit for bit on CPU, and no duplicated steps 11-13


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _train_fixed(tmp_path / "run", max_iters=10, checkpoint_interval=5)
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way
            with open(f, "wb") as fh:
                fh.write(b"half")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(Exception, match="previous checkpoint .* is intact"):
        trainer.fit()
    folder, step = RunFolder(tmp_path / "run").latest_checkpoint()
    assert step == 5
    ToyTransformer.from_pretrained(tmp_path / "run")  # the published weights still load
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_precision_auto_picks_bf16_where_the_cpu_supports_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision_mod, "cpu_supports_fast_bf16", lambda: True)
    assert precision_mod.resolve_precision("auto", cpu).name == "bf16"
    monkeypatch.setattr(precision_mod, "cpu_supports_fast_bf16", lambda: False)
    assert precision_mod.resolve_precision("auto", cpu).name == "fp32"
    assert precision_mod.resolve_precision("fp16", cpu).grad_scaler() is not None


def test_config_file_and_flag_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  d_model: 64\n  n_head: 2\ntrain:\n  batch_size: 4\n  warmup: 7\n")
    from qtoy_core.training.config import read_config_file

    file_data = read_config_file(tmp_path / "c.yaml")
    cfg = assemble_run_config(file_data, {"d_model": 32}, ["train.warmup=3"])
    assert (cfg.model.d_model, cfg.model.n_head, cfg.train.batch_size, cfg.train.warmup) == (32, 2, 4, 3)
    (tmp_path / "c.toml").write_text("[train]\nbatch_size = 5\n")
    assert assemble_run_config(read_config_file(tmp_path / "c.toml")).train.batch_size == 5
    assert assemble_run_config({}, {"mlp": "bilinear"}).model.model_type == "transformer_1L"
    with pytest.raises(ConfigFileError, match="contradicts"):
        assemble_run_config({}, {"model_type": "attention_only_2L", "mlp": "bilinear"})


@pytest.mark.parametrize("mode", ["recurrent", "kv"])
def test_generation_with_cache_matches_generation_without(mode):
    torch.manual_seed(0)
    model = build_model("transformer_2L", d_model=32, n_head=2, vocab_size=64, n_ctx=64)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    prompt = torch.randint(0, 64, (2, 5))
    fast = generate(model, prompt, 20, temperature=0, cache_mode=mode)
    slow = generate(model, prompt, 20, temperature=0, cache_mode=None)
    assert torch.equal(fast, slow) and fast.shape == (2, 25)
    sampled = [generate(model, prompt, 10, temperature=1.0, top_k=5, seed=1, cache_mode=mode) for _ in range(2)]
    assert torch.equal(*sampled)


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    str(HELPERS / "ddp_worker.py"), str(tmp_path / "ddp")], check=True, env=env, capture_output=True,
                   timeout=300)
    ranks = [torch.load(tmp_path / "ddp" / f"params_rank{r}.pt") for r in (0, 1)]
    single = _train_fixed(tmp_path / "single")
    single.fit()
    for name, value in single.model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "ddp" / "params").exists()


def _cli(*args):
    from qtoy_cli.main import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_train_on_synthetic_lowers_validation_loss(tmp_path):
    run = tmp_path / "run"
    result = _cli("train", *SMALL_SYNTHETIC, "--max-iters", "120", "--eval-interval", "60", "--eval-iters", "4",
                  "--learning-rate", "1e-2", "--warmup", "10", "--out", str(run))
    assert result.exit_code == 0, result.output
    evals = [m["val_loss"] for m in read_metrics(run) if "val_loss" in m]
    assert len(evals) == 2
    first = [m["loss"] for m in read_metrics(run) if "loss" in m][0]
    assert evals[-1] < first - 1.5, (first, evals)
    assert "training summary" in result.output and str(run) in result.output
    assert (run / "tokenizer.json").exists()
    gen = _cli("generate", str(run), "--prompt", "Once upon a time", "--max-new-tokens", "12", "--seed", "0")
    assert gen.exit_code == 0 and gen.output.lower().startswith("once upon a time")
    ev = _cli("eval", str(run), "--eval-iters", "4", "--json")
    assert ev.exit_code == 0 and json.loads(ev.output)["loss"] < first
    # the same batches and the same final weights: `qtoy eval` says what training said (one evaluate)
    assert json.loads(ev.output)["loss"] == pytest.approx(evals[-1], rel=1e-5)
    plot = _cli("plot", str(run))
    assert plot.exit_code == 0 and (run / "curves.png").stat().st_size > 10_000


def test_cli_flags_work_exactly_as_written_and_seed_spellings(tmp_path):
    result = _cli("train", "--attn", "quadratic", "--mlp", "bilinear", *SMALL_SYNTHETIC, "--max_iters", "2",
                  "--batch_size", "4", "--learning_rate", "1e-3", "--eval-iters", "1", "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "r" / "config.json").read_text())
    assert doc["model"]["model_type"] == "transformer_1L" and doc["model"]["mlp"]["name"] == "bilinear"
    assert doc["train"]["batch_size"] == 4 and doc["train"]["learning_rate"] == 1e-3


def test_sigterm_saves_and_exits_cleanly_then_resume_finishes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "qtoy_cli.main", "train", *SMALL_SYNTHETIC, "--max-iters", "100000",
           "--eval-interval", "1000", "--eval-iters", "1", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(run)) < 5:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Stopped by SIGTERM" in err and f"--resume {run}" in err and "Traceback" not in err
    folder, step = RunFolder(run).latest_checkpoint()
    assert step >= 5
    result = _cli("train", "--resume", str(run), "--max-iters", str(step + 3), "--quiet")
    assert result.exit_code == 0, result.output
    assert RunFolder(run).latest_checkpoint()[1] == step + 3
