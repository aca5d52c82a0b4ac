"""Checkpoints worth studying: the log snapshot schedule, wall-clock checkpoints, one writer per run
folder (an OS lock released when the trainer dies), `from_pretrained(RUN, step=...)`, `qtoy checkpoints`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qtoy_core import ToyTransformer
from qtoy_core.training import trainer as trainer_module
from qtoy_core.training.config import assemble_run_config
from qtoy_core.training.run_folder import RunFolderError, list_checkpoints
from qtoy_core.training.trainer import Trainer, snapshot_due

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from fixed_stream import fixed_batches, tiny_run_config  # noqa: E402


def _trainer(out, callbacks=(), **train):
    config = assemble_run_config(tiny_run_config(**train))
    return Trainer(config, out, callbacks=list(callbacks), train_batches=fixed_batches(),
                   val_batches=list(fixed_batches(2, seed=9)))


def test_log_schedule_steps():
    due = [s for s in range(1, 61) if snapshot_due(s, every=16)]
    assert due == [1, 2, 4, 8, 16, 32, 48]
    assert snapshot_due(61, every=16, last=True)


def test_log_schedule_keeps_weights_at_its_steps_and_they_load(tmp_path):
    run = tmp_path / "run"
    seen = {}

    class Record:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_step_end(self, trainer, metrics):
            seen[trainer.step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    _trainer(run, [Record()], max_iters=20, checkpoint_schedule="log", snapshot_interval=8,
             checkpoint_interval=10, eval_interval=20).fit()
    kept = list_checkpoints(run)
    # the full checkpoint of step 10 was replaced by step 20's (latest and best), as before
    assert [e["step"] for e in kept] == [1, 2, 4, 8, 16, 20]
    kinds = {e["step"]: e["kind"] for e in kept}
    assert kinds[20] == "checkpoint" and kinds[4] == "snapshot" and kept[-1]["latest"] and kept[-1]["best"]
    assert all(e["tokens"] == e["step"] * 8 * 16 for e in kept)  # batch 8 x n_ctx 16 tokens per step
    snap = run / "checkpoints" / "snapshots" / "step_00000004.safetensors"
    assert snap.exists() and not (run / "checkpoints" / "step_00000004").exists()  # weights only
    for step in (1, 4, 16, 20):
        model = ToyTransformer.from_pretrained(run, step=step)
        for k, v in model.state_dict().items():
            assert torch.equal(v, seen[step][k]), (step, k)
    with pytest.raises(RunFolderError, match="no weights saved at step 3; it kept steps 1, 2, 4"):
        ToyTransformer.from_pretrained(run, step=3)


def test_a_run_without_checkpoints_says_how_to_get_them(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(RunFolderError, match="--checkpoint-schedule log"):
        ToyTransformer.from_pretrained(run, step=1)


def test_wall_clock_checkpoints(tmp_path, monkeypatch):
    """With a clock that moves 1 minute per reading and checkpoint_minutes=2.5, a full checkpoint is
    saved every few steps although the step-based interval (1000) is never reached."""
    clock = iter(range(0, 10**6, 60))
    monkeypatch.setattr(trainer_module, "monotonic", lambda: float(next(clock)))
    saved = []

    class Record:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_checkpoint(self, trainer, path):
            saved.append(trainer.step)

    _trainer(tmp_path / "run", [Record()], max_iters=10, checkpoint_interval=1000, eval_interval=1000,
             checkpoint_minutes=2.5).fit()
    assert saved[-1] == 10 and len(saved) >= 3
    gaps = [b - a for a, b in zip(saved, saved[1:-1])]
    assert all(g == gaps[0] for g in gaps) and 1 <= gaps[0] <= 3
    saved.clear()
    monkeypatch.setattr(trainer_module, "monotonic", lambda: 0.0)  # no time passes: step-based only
    _trainer(tmp_path / "run2", [Record()], max_iters=10, checkpoint_interval=1000, eval_interval=1000).fit()
    assert saved == [10]


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {helpers!r})
    from fixed_stream import fixed_batches, tiny_run_config
    from qtoy_core.training.config import assemble_run_config
    from qtoy_core.training.trainer import Trainer

    class Hold:
        def __getattr__(self, name):
            return lambda *a, **k: None
        def on_step_end(self, trainer, metrics):
            if trainer.step == 2:
                print("training", flush=True)
                time.sleep(600)

    config = assemble_run_config(tiny_run_config(max_iters=5))
    Trainer(config, {out!r}, callbacks=[Hold()], train_batches=fixed_batches(),
            val_batches=list(fixed_batches(2, seed=9))).fit()
""")


def test_one_trainer_per_run_folder_and_kill_9_releases_it(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(helpers=str(HELPERS), out=str(run))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "training", proc.stderr.read()
        with pytest.raises(RunFolderError, match=r"being written by another trainer that is still running \(pid"):
            _trainer(run, max_iters=3).fit()
        with pytest.raises(RunFolderError, match="another trainer"):
            Trainer(assemble_run_config(tiny_run_config(max_iters=3)), run, resume=True,
                    train_batches=fixed_batches(), val_batches=list(fixed_batches(2, seed=9))).fit()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert (run / "trainer.lock").exists()  # the file stays; the kernel dropped the lock with the process
    summary = _trainer(tmp_path / "run", max_iters=3).fit()  # the folder is free again (no checkpoint yet)
    assert summary["steps"] == 3


def test_cli_checkpoints_lists_a_run(tmp_path):
    from click.testing import CliRunner

    from qtoy_cli.main import cli

    run = tmp_path / "run"
    _trainer(run, max_iters=6, checkpoint_schedule="log", eval_interval=6).fit()
    result = CliRunner().invoke(cli, ["checkpoints", str(run), "--json"])
    assert result.exit_code == 0, result.output
    steps = [e["step"] for e in json.loads(result.output)]
    assert steps == [1, 2, 4, 6]
    result = CliRunner().invoke(cli, ["checkpoints", str(run)])
    assert "snapshot" in result.output and "latest" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["checkpoints", str(empty)])
    assert result.exit_code != 0 and "--checkpoint-schedule log" in str(result.exception or result.output)
