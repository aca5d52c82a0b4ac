"""Issue 8, faults: kill -9 at random moments, SIGINT/SIGTERM, non-finite steps, unwritable folders and
full disks. Each fault is made for real (a real signal, a real SIGKILL, a real unwritable path, a real
non-finite gradient); only the full disk is simulated, by making the write itself fail with ENOSPC."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtoy_core import ToyTransformer
from qtoy_core import run_files as run_files_mod
from qtoy_core.training import run_folder as run_folder_mod
from qtoy_core.training.config import assemble_run_config
from qtoy_core.training.run_folder import RunFolder, RunFolderError, read_metrics
from qtoy_core.training.trainer import Trainer, TrainingStopped
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
from in_process import FAST, qtoy  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from fixed_stream import fixed_batches, tiny_run_config  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_thread")




def losses(run) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]


# -- kill -9 ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    """benchmarks/kill_resume.py in small: 5 SIGKILLs (3 aimed inside a checkpoint save, 2 at random
    moments) plus a SIGINT and a SIGTERM stop; after each, the folder is checked and `qtoy train
    --resume` must continue from the checkpoint pointed to; the resumed run's losses and final weights
    must equal those of an uninterrupted run of the same command."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kill_resume.py"), "--kills", "5",
                           "--signals", "SIGINT,SIGTERM", "--seed", "1", "--json", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.strip(), proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and proc.returncode == 0, result["failures"]
    assert result["kills"] == 5 and result["clean_resumes"] == 5, result["events"]
    assert result["kills_inside_a_save"] >= 1, result["kills_by_phase"]
    assert result["signal_stops"] == result["clean_signal_stops"] == 2, result["events"]
    assert result["loss_curve_matches"] and result["val_loss_matches"] and result["final_weights_match"]
    assert result["steps_in_run"] == result["max_iters"]


# -- SIGINT / SIGTERM ------------------------------------------------------------------------------
def _signal_at(monkeypatch, step: int, sig: signal.Signals, times: int = 1) -> None:
    """Deliver a real signal to this process right after the metrics of `step` are written."""
    real_append = RunFolder.append_metrics

    def append(self, records):
        real_append(self, records)
        if any(r.get("step") == step and "loss" in r for r in records):
            for _ in range(times):
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(RunFolder, "append_metrics", append)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch, sig):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert qtoy("train", *FAST, "--max-iters", "6", "--out", reference)[0] == 0
    handler = signal.getsignal(sig)
    _signal_at(monkeypatch, 3, sig)
    code, output = qtoy("train", *FAST, "--max-iters", "6", "--out", run)
    assert code == 2, output
    assert f"Stopped by {sig.name} at step 3/6" in output and f"qtoy train --resume {run}" in output
    assert "Traceback" not in output
    assert RunFolder(run).latest_checkpoint()[1] == 3  # step 3 is odd: saved because of the signal
    assert signal.getsignal(sig) == handler  # the trainer's handlers are removed again
    monkeypatch.undo()
    code, output = qtoy("train", "--resume", run, "--quiet")
    assert code == 0, output
    assert losses(run) == losses(reference)  # nothing lost, nothing repeated


def test_second_sigint_stops_at_once_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _signal_at(monkeypatch, 3, signal.SIGINT, times=2)
    code, output = qtoy("train", *FAST, "--max-iters", "6", "--out", run)
    assert code == 130 and "Aborted." in output and "Traceback" not in output, output
    assert RunFolder(run).latest_checkpoint()[1] == 2
    ToyTransformer.from_pretrained(run)


# -- non-finite loss or gradient -------------------------------------------------------------------
class Poison:
    """Make the training loss infinite at the given steps (1-based): a forward hook scales the logits by
    inf, so the loss and every gradient are non-finite, as a real overflow would make them."""

    def __init__(self, steps):
        self.steps, self.params, self.trainer = set(steps), {}, None

    def on_train_start(self, trainer):
        self.trainer = trainer
        trainer.model.unembed.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if module.training and self.trainer.step + 1 in self.steps:
            return output * float("inf")
        return output

    def on_step_end(self, trainer, metrics):
        self.params[metrics["step"]] = trainer.model.embed.weight.detach().clone()

    def __getattr__(self, name):
        return lambda *a, **k: None


def _fixed_trainer(out, *, resume=False, skip=0, callbacks=(), model=None, **train):
    doc = tiny_run_config(**train)
    doc["model"].update(model or {})
    config = assemble_run_config(doc)
    stream = fixed_batches()
    for _ in range(skip):  # the fixed stream has no state of its own: skip what earlier steps consumed
        next(stream)
    return Trainer(config, out, resume=resume, callbacks=list(callbacks), train_batches=stream,
                   val_batches=list(fixed_batches(2, seed=9)))


def test_non_finite_steps_are_skipped_counted_and_stop_training_after_k_in_a_row(tmp_path):
    run = tmp_path / "run"
    poison = Poison([4, 12, 13, 14, 15, 16])
    trainer = _fixed_trainer(run, callbacks=[poison], max_iters=30, checkpoint_interval=5, max_bad_steps=3)
    with pytest.raises(TrainingStopped) as stopped:
        trainer.fit()
    message = str(stopped.value)
    assert "3 steps in a row had a non-finite loss or gradient (last at step 14)" in message
    assert f"--resume {run}" in message and "--learning-rate" in message
    records = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in records if m.get("skipped")] == [4, 12, 13, 14]
    assert records[-1]["step"] == 14 and trainer.skipped_total == 4
    assert torch.equal(poison.params[4], poison.params[3])  # a skipped step changes nothing
    assert not torch.equal(poison.params[5], poison.params[4])  # a single bad step does not stop training
    folder, step = RunFolder(run).latest_checkpoint()
    assert step == 10  # the last good checkpoint is kept (and no checkpoint holds a non-finite weight)
    model = ToyTransformer.from_pretrained(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the problem gone, the run resumes from step 10 and finishes with finite losses
    _fixed_trainer(run, resume=True, skip=10, max_iters=30, checkpoint_interval=5, max_bad_steps=3).fit()
    after = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in after] == list(range(1, 31))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in after[10:])


def test_cli_learning_rate_1e30_stops_with_a_clear_message(tmp_path):
    run = tmp_path / "run"
    code, output = qtoy("train", *FAST, "--max-iters", "20", "--learning-rate", "1e30", "--warmup", "0",
                        "--set", "train.max_bad_steps=3", "--out", run)
    assert code == 2 and "Traceback" not in output, output
    assert "3 steps in a row had a non-finite loss or gradient" in output and f"--resume {run}" in output
    skipped = [m["step"] for m in read_metrics(run) if m.get("skipped")]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    assert RunFolder(run).latest_checkpoint() is not None


def test_a_learning_rate_given_on_resume_replaces_the_saved_one(tmp_path):
    """The advice after non-finite steps is 'lower the learning rate, then resume': it must take effect."""
    run = tmp_path / "run"
    assert qtoy("train", *FAST, "--max-iters", "4", "--warmup", "0", "--learning-rate", "1e-2", "--out", run)[0] == 0
    code, output = qtoy("train", "--resume", run, "--max-iters", "8", "--learning-rate", "1e-4", "--quiet")
    assert code == 0, output
    lrs = {m["step"]: m["lr"] for m in read_metrics(run) if "loss" in m}
    assert lrs[1] == pytest.approx(1e-2) and lrs[5] < 1e-4 < lrs[4]
    assert json.loads((run / "config.json").read_text())["train"]["learning_rate"] == 1e-4


# -- unwritable folders and full disks -------------------------------------------------------------
def _unwritable(tmp_path, kind):
    if kind == "a file in the way":
        (tmp_path / "file").write_text("not a folder")
        return tmp_path / "file" / "run"
    path = Path("/sys/qtoy-reliability-run")  # sysfs: even root cannot create folders here
    try:
        path.mkdir()
    except OSError:
        return path
    path.rmdir()
    pytest.skip("/sys is writable here")


@pytest.mark.parametrize("kind", ["a file in the way", "a read-only file system"])
def test_unwritable_output_folder_is_refused_before_training(tmp_path, kind):
    out = _unwritable(tmp_path, kind)
    code, output = qtoy("train", *FAST, "--max-iters", "2", "--out", out)
    assert code == 2 and "Traceback" not in output, output
    assert f"Cannot write to the output folder {out}" in output and "writable --out folder" in output


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    usage = run_folder_mod.shutil.disk_usage
    free = {"bytes": 10 * 2**20}
    monkeypatch.setattr(run_folder_mod.shutil, "disk_usage",
                        lambda p: usage(p)._replace(free=free["bytes"]))
    code, output = qtoy("train", *FAST, "--max-iters", "2", "--out", tmp_path / "run")
    assert code == 2 and "Only 10 MiB free" in output and "Traceback" not in output, output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # the estimate grows with the model: ~4M parameters need more than the 64 MiB floor
    free["bytes"] = 100 * 2**20
    big = _fixed_trainer(tmp_path / "big", max_iters=2, model={"d_model": 512})
    with pytest.raises(RunFolderError, match=r"Only 100 MiB free .* checkpoints need about 1\d\d MiB"):
        big.fit()
    assert not (tmp_path / "big" / "metrics.jsonl").exists()


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["weights", "state", "pointer", "metrics", "publish"])
def test_a_failed_save_keeps_the_previous_checkpoint_and_says_why(tmp_path, monkeypatch, where):
    """ENOSPC in each write of the save (at the second checkpoint), or in the metrics log."""
    import safetensors.torch

    run = tmp_path / "run"
    targets = {"weights": (safetensors.torch, "save_model"), "state": (torch, "save"),
               "pointer": (run_folder_mod, "write_atomic"), "metrics": (run_files_mod, "open"),
               "publish": (RunFolder, "_publish")}
    owner, name = targets[where]
    real = getattr(owner, name, open)
    calls = {"n": 0}
    fail_at = 7 if where == "metrics" else 2  # the 7th step's record / the second checkpoint

    def flaky(*args, **kwargs):
        if where == "pointer" and Path(args[0]).name != "checkpoint.json":
            return real(*args, **kwargs)  # config.json and metrics rewrites use the same helper
        if where == "metrics" and (Path(args[0]).name != "metrics.jsonl" or args[1] != "a"):
            return real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == fail_at:
            if where == "weights":  # a half-written file first, as a real full disk leaves
                Path(args[1]).write_bytes(b"half")
            _enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky, raising=False)
    with pytest.raises(RunFolderError) as failed:
        _fixed_trainer(run, max_iters=10, checkpoint_interval=5).fit()
    message = str(failed.value)
    assert "No space left on device" in message and f"--resume {run}" in message
    folder, step = RunFolder(run).latest_checkpoint()
    if where == "publish":  # the checkpoint itself was committed; only the top-level copy lags
        assert step == 10 and "is saved in" in message
    else:
        assert step == 5 and "intact" in message
    assert not list((run / "checkpoints").glob(".tmp-*"))
    ToyTransformer.from_pretrained(run)  # the published weights still load
    monkeypatch.undo()
    _fixed_trainer(run, resume=True, skip=step, max_iters=10, checkpoint_interval=5).fit()
    assert [s for s, _ in losses(run)] == list(range(1, 11))
    top = (run / "model.safetensors").read_bytes()
    assert top == (RunFolder(run).latest_checkpoint()[0] / "model.safetensors").read_bytes()


def test_a_fresh_start_after_a_kill_before_the_first_checkpoint_does_not_mix_logs(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        trainer = _fixed_trainer(run, max_iters=10, checkpoint_interval=5)

        class Crash:
            def __getattr__(self, name):
                return lambda *a, **k: None

            def on_step_end(self, trainer, metrics):
                if metrics["step"] == 3:
                    raise KeyboardInterrupt

        trainer.callbacks.append(Crash())
        trainer.fit()
    assert RunFolder(run).latest_checkpoint() is None and len(losses(run)) == 3
    code, output = qtoy("train", "--resume", run)
    assert code == 2 and "no complete checkpoint to resume from" in output and "without --resume" in output
    (run / ".checkpoint.json.abc123.tmp").write_text("{")  # litter of a killed atomic write
    _fixed_trainer(run, max_iters=10, checkpoint_interval=5).fit()
    assert [s for s, _ in losses(run)] == list(range(1, 11))
    assert not list(run.glob(".*.tmp"))
