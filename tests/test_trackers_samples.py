"""Samples while training, and the experiment trackers (wandb offline, TensorBoard) read back with
their own file formats: every metric of metrics.jsonl, the samples, the config, the summary, and a
resumed run continuing the same tracker run."""

import json
import sys
from pathlib import Path

import pytest
import torch

from qtoy_core.training.config import assemble_run_config
from qtoy_core.training.run_folder import read_metrics
from qtoy_core.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from fixed_stream import VOCAB, fixed_batches, tiny_run_config  # noqa: E402

PROMPTS = ["t1 t2 t3", "t40 t41"]


def word_tokenizer():
    """A word-level tokenizer over the fixed stream's ids: token i is the word "t{i}"."""
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from qtoy_core import Tokenizer

    raw = tokenizers.Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    raw.pre_tokenizer = WhitespaceSplit()
    return Tokenizer(raw)


class StopAt:
    """Crash right after step `step`'s metrics were written (the last checkpoint is at the eval before)."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):
        return lambda *a, **k: None

    def on_step_end(self, trainer, m):
        if m["step"] == self.step:
            raise KeyboardInterrupt


def train(out, *, callbacks=(), stop_at=None, **train_options):
    doc = tiny_run_config(**{"sample_prompts": PROMPTS, "sample_tokens": 6, **train_options})
    doc["callbacks"] = list(callbacks)
    config = assemble_run_config(doc)
    resume = (Path(out) / "checkpoint.json").exists()
    trainer = Trainer(config, out, resume=resume, callbacks=[StopAt(stop_at)] if stop_at else [],
                      train_batches=fixed_batches(), val_batches=list(fixed_batches(2, seed=9)),
                      tokenizer=word_tokenizer())
    if stop_at:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        return trainer
    trainer.fit()
    return trainer


def read_samples(run):
    return [json.loads(line) for line in (Path(run) / "samples.jsonl").read_text().splitlines()]


def test_samples_at_each_evaluation_are_greedy_and_survive_a_resume(tmp_path):
    train(tmp_path / "whole")
    samples = read_samples(tmp_path / "whole")
    assert [(s["step"], s["prompt"]) for s in samples] == [(6, PROMPTS[0]), (6, PROMPTS[1]),
                                                           (12, PROMPTS[0]), (12, PROMPTS[1])]
    for s in samples:  # six generated words of the tokenizer's vocabulary
        words = s["text"].split()
        assert len(words) == 6 and all(w in {f"t{i}" for i in range(VOCAB)} for w in words)
    # killed after step 9 (checkpoint at 6), then resumed: the same samples.jsonl, step for step
    train(tmp_path / "resumed", stop_at=9)
    train(tmp_path / "resumed")
    assert read_samples(tmp_path / "resumed") == samples


def test_samples_continue_the_prompt_with_the_models_greedy_tokens(tmp_path):
    trainer = train(tmp_path / "run", max_iters=6)
    from qtoy_core.generate import generate

    tok = trainer.tokenizer
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    expected = tok.decode(generate(trainer.model, ids, 6, temperature=0)[0, ids.shape[1]:].tolist())
    assert read_samples(tmp_path / "run")[1]["text"] == expected


def test_no_prompts_no_samples(tmp_path):
    train(tmp_path / "run", sample_prompts=[])
    assert not (tmp_path / "run" / "samples.jsonl").exists()


# -- TensorBoard ---------------------------------------------------------------------------------
def tensorboard_events(log_dir):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'qtoy[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_logs_every_metric_and_resumes_into_the_same_log_dir(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'qtoy[tensorboard]')")
    run = tmp_path / "run"
    train(run, callbacks=["tensorboard"], stop_at=9)
    train(run, callbacks=["tensorboard"])
    acc = tensorboard_events(run / "tensorboard")
    metrics = read_metrics(run)
    steps = [m for m in metrics if "loss" in m]
    for key in ("loss", "lr", "grad_norm"):
        events = acc.Scalars(f"train/{key}")
        # each step once: the steps 7-9 written before the kill were purged on resume
        assert [e.step for e in events] == [m["step"] for m in steps] == list(range(1, 13))
        assert [e.value for e in events] == pytest.approx([m[key] for m in steps], rel=1e-6)
    evals = [m for m in metrics if "val_loss" in m]
    val = acc.Scalars("eval/val_loss")
    assert [e.step for e in val] == [m["step"] for m in evals] == [6, 12]
    assert [e.value for e in val] == pytest.approx([m["val_loss"] for m in evals], rel=1e-6)
    tags = acc.Tags()["tensors"]
    assert "config/text_summary" in tags and "summary/text_summary" in tags and "samples/0/text_summary" in tags


# -- wandb (offline) -----------------------------------------------------------------------------
def test_wandb_offline_run_holds_metrics_config_summary_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'qtoy[wandb]')")
    import wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    run = tmp_path / "run"
    train(run, callbacks=["wandb"], stop_at=9)
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    train(run, callbacks=["wandb"])
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # one wandb run, resumed
    for f in files:
        wandb_records.wait_until_closed(f)
    first, second = (wandb_records.history(f) for f in files)
    metrics = read_metrics(run)
    logged = {}  # step -> what was logged for it (a step's train, eval and samples rows merged)
    for row in [r for r in first if r["step"] <= 6] + second:
        logged.setdefault(row["step"], {}).update(row)
    for m in metrics:
        row = logged[m["step"]]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            if key in m:
                assert row[f"train/{key}"] == pytest.approx(m[key])
        if "val_loss" in m:
            assert row["eval/val_loss"] == pytest.approx(m["val_loss"])
    assert {r["step"] for r in second} == set(range(7, 13))  # the resumed run goes on from the checkpoint
    assert logged[12]["samples/nrows"] == len(PROMPTS)
    tables = sorted(files[1].parent.glob("files/media/table/samples_*.table.json"))
    written = {tuple(row) for t in tables for row in json.loads(t.read_text())["data"]}
    assert {(s["step"], s["prompt"], s["text"]) for s in read_samples(run) if s["step"] == 12} <= written
    config = {item.key: json.loads(item.value_json) for r in wandb_records.of_type(files[0], "run")
              for item in r.config.update}
    assert config["model"]["d_model"] == 32 and config["train"]["max_iters"] == 12  # the run document
    summary = [item.key for s in wandb_records.of_type(files[1], "summary") for item in s.update]
    assert "val_loss" in summary and "tokens_per_s" in summary


def test_a_missing_tracker_extra_names_the_pip_install(monkeypatch):
    import builtins

    from qtoy_core import QtoyError
    from qtoy_core.registry_access import build_component

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    config = assemble_run_config({**tiny_run_config(), "callbacks": ["wandb"]}).callbacks[0]
    with pytest.raises(QtoyError, match=r"pip install \"qtoy\[wandb\]\""):
        build_component(config)
