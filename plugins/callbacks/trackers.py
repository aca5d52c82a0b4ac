"""Experiment trackers as callbacks: Weights & Biases (`--callback wandb`) and TensorBoard
(`--callback tensorboard`), through their own libraries.

Both receive every record the run writes to metrics.jsonl (training steps: loss, lr, grad_norm,
tokens_per_s; evaluations: val_loss, val_ppl), every record a callback logs through
`Trainer.log_record` (dynamics.jsonl: its numbers, flattened to `dynamics/<key>/<index>`), the
samples of each evaluation, the run config at the start and the summary at the end. A resumed run
continues the same tracker run: wandb resumes the run id kept in the run folder (qtoy's step is its
x axis; the steps between the last checkpoint and a kill show twice there, as wandb keeps what it
was sent), TensorBoard appends to the run folder's log dir and drops the events after the resumed step.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any, Iterator

from qtoy_core import Callback, QtoyError

WANDB_ID_NAME = "wandb_run_id.txt"
STEP_KEYS = ("step", "tokens")


class MissingTrackerError(QtoyError):
    pass


def require(module: str, extra: str):
    """Import a tracker's library, or say which `pip install` brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingTrackerError(
            f"--callback {extra} needs the {module!r} package, which is not installed. Install it with "
            f"`pip install \"qtoy[{extra}]\"` (or `pip install {module.split('.')[0]}`), or drop --callback {extra}."
        ) from None


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The finite numbers of a (nested) record as flat `a/b/0` keys; step and tokens are axes, not data."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if not prefix and key in STEP_KEYS:
            continue
        if isinstance(value, bool):
            yield name, float(value)
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                yield name, float(value)
        elif isinstance(value, dict):
            yield from scalars(value, name + "/")
        elif isinstance(value, (list, tuple)):
            yield from scalars({str(i): v for i, v in enumerate(value)}, name + "/")


def log_prefix(source: str) -> str:
    """dynamics.jsonl -> "dynamics/"."""
    return Path(source).stem + "/"


class WandbTracker(Callback):
    """Log the run to Weights & Biases. `WANDB_MODE=offline` writes the run under RUN/wandb without
    a network (sync later with `wandb sync`)."""

    def __init__(self, config):
        self.config = config
        self.wandb = require("wandb", "wandb")
        self.run = None

    def on_train_start(self, trainer) -> None:
        if not trainer.world.is_main:
            return
        folder = trainer.run.path
        id_file = folder / WANDB_ID_NAME
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.exists() else secrets.token_hex(4)  # wandb ids: [a-z0-9]
        c = self.config
        self.run = self.wandb.init(project=c.project, entity=c.entity, name=c.run_name or folder.name, id=run_id,
                                   resume="allow", dir=str(folder), tags=list(c.tags) or None, mode=c.mode,
                                   config=trainer.model_doc,
                                   # a fit that raised in this process left its run open: close it first
                                   reinit="finish_previous")
        if not id_file.exists():
            id_file.write_text(run_id + "\n", encoding="utf-8")
        self.run.define_metric("*", step_metric="step")

    def _log(self, record: dict, prefix: str = "") -> None:
        if self.run is None:
            return
        data = {prefix + k: v for k, v in scalars(record)}
        if data:
            # qtoy's step is a metric (the x axis, see define_metric), not wandb's own step: wandb's must
            # only grow, and a resumed run logs again the steps after its checkpoint
            self.run.log({**data, "step": record["step"], "tokens": record.get("tokens")})

    def on_step_end(self, trainer, metrics: dict) -> None:
        self._log(metrics, "train/")

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self._log(metrics, "eval/")

    def on_log(self, trainer, record: dict, source: str) -> None:
        self._log(record, log_prefix(source))

    def on_samples(self, trainer, samples: list[dict]) -> None:
        if self.run is None or not samples:
            return
        table = self.wandb.Table(columns=["step", "prompt", "text"], data=[[s["step"], s["prompt"], s["text"]]
                                                                            for s in samples])
        self.run.log({"samples": table, "step": samples[0]["step"]})

    def on_train_end(self, trainer, summary: dict) -> None:
        if self.run is None:
            return
        self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        self.run.finish()
        self.run = None


class TensorBoardTracker(Callback):
    """Log the run as TensorBoard event files under RUN/<log_dir> (`tensorboard --logdir RUN`)."""

    def __init__(self, config):
        self.config = config
        self.tensorboard = require("torch.utils.tensorboard", "tensorboard")
        self.writer = None

    def on_train_start(self, trainer) -> None:
        if not trainer.world.is_main:
            return
        log_dir = trainer.run.path / self.config.log_dir
        # purge_step: a resumed run drops the events written after its checkpoint (they will be redone)
        self.writer = self.tensorboard.SummaryWriter(str(log_dir), purge_step=trainer.step + 1 if trainer.step else None)
        if not trainer.step:
            self.writer.add_text("config", "```json\n" + json.dumps(trainer.model_doc, indent=2) + "\n```", 0)

    def _log(self, record: dict, prefix: str) -> None:
        if self.writer is None:
            return
        for key, value in scalars(record):
            self.writer.add_scalar(prefix + key, value, record["step"])

    def on_step_end(self, trainer, metrics: dict) -> None:
        self._log(metrics, "train/")

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self._log(metrics, "eval/")
        self.writer is not None and self.writer.flush()

    def on_log(self, trainer, record: dict, source: str) -> None:
        self._log(record, log_prefix(source))

    def on_samples(self, trainer, samples: list[dict]) -> None:
        if self.writer is None:
            return
        for i, s in enumerate(samples):
            self.writer.add_text(f"samples/{i}", f"**{s['prompt']}**{s['text']}", s["step"])

    def on_train_end(self, trainer, summary: dict) -> None:
        if self.writer is None:
            return
        self.writer.add_text("summary", "\n".join(f"- {k}: {v}" for k, v in summary.items()), trainer.step)
        self.writer.close()
        self.writer = None
