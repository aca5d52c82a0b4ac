"""The `loss_trace` callback: the training loss every N steps, to loss_trace.jsonl in the run folder."""

from __future__ import annotations

import time

from qtoy_core import Callback, append_jsonl, truncate_jsonl

FILE_NAME = "loss_trace.jsonl"


class LossTrace(Callback):
    """Built as `LossTrace(callback_config)`. The trainer calls the hooks it overrides; `trainer`
    exposes `step`, `tokens`, `model`, `optimizer`, `config`, `run.path` and `world.is_main`."""

    def __init__(self, config):
        self.every = config.every
        self._start = time.perf_counter()
        self._first: float | None = None

    def on_train_start(self, trainer) -> None:
        """A fresh run starts an empty file; a resumed one keeps the records up to its checkpoint."""
        self._start = time.perf_counter()
        if not trainer.world.is_main:
            return
        truncate_jsonl(trainer.run.path / FILE_NAME, after_step=trainer.step)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self._first is None:
            self._first = metrics["loss"]
        if trainer.step % self.every or not trainer.world.is_main:
            return
        record = {"step": trainer.step, "loss": metrics["loss"],
                  "seconds": round(time.perf_counter() - self._start, 4)}
        append_jsonl(trainer.run.path / FILE_NAME, record)

    def on_train_end(self, trainer, summary: dict) -> None:
        if trainer.world.is_main:
            record = {"summary": True, "steps": trainer.step, "first_loss": self._first,
                      "train_loss": summary.get("train_loss"), "val_loss": summary.get("val_loss")}
            append_jsonl(trainer.run.path / FILE_NAME, record)
