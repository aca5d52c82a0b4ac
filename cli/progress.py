"""What `qtoy train` shows: a rich live display on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from qtoy_core.interfaces import Callback


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


class RichProgress(Callback):
    """Live bar with step, loss, eval loss, lr, tokens/s and ETA."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    def on_train_start(self, trainer) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  eval {task.fields[val]}  lr {task.fields[lr]}  "
                       "{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=trainer.total_steps, completed=trainer.step,
                                           loss="-", val="-", lr="-", tps="-")
        self.console.print(f"run folder: {trainer.run.path}  ({trainer.model.num_parameters:,} parameters, "
                           f"{trainer.precision.name}, {trainer.device})")

    def on_step_end(self, trainer, m: dict) -> None:
        self.progress.update(self.task, completed=m["step"], loss=_fmt(m["loss"]), lr=_fmt(m["lr"], ".2e"),
                             tps=_fmt(m["tokens_per_s"], ",.0f"))

    def on_eval_end(self, trainer, m: dict) -> None:
        self.progress.update(self.task, val=_fmt(m["val_loss"]))

    def on_samples(self, trainer, samples: list[dict]) -> None:
        from rich.markup import escape

        for s in samples:
            self.progress.console.print(f"[dim]sample step {s['step']}:[/dim] [bold]{escape(s['prompt'])}[/bold]"
                                        f"{escape(s['text'])}")

    def on_train_end(self, trainer, summary: dict) -> None:
        self.progress.stop()


class PlainLog(Callback):
    """One line every log_interval steps and per evaluation (for logs and pipes)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_train_start(self, trainer) -> None:
        self.start = time.perf_counter()
        self._print(f"run folder: {trainer.run.path}  ({trainer.model.num_parameters:,} parameters, "
                    f"{trainer.precision.name}, {trainer.device}); steps {trainer.step}->{trainer.total_steps}")

    def on_step_end(self, trainer, m: dict) -> None:
        if m["step"] % trainer.config.train.log_interval == 0 or m.get("skipped"):
            note = "  (skipped: non-finite)" if m.get("skipped") else ""
            self._print(f"step {m['step']:>6}/{trainer.total_steps}  loss {_fmt(m['loss'])}  lr {_fmt(m['lr'], '.2e')}  "
                        f"grad {_fmt(m['grad_norm'], '.3f')}  {_fmt(m['tokens_per_s'], ',.0f')} tok/s{note}")

    def on_eval_end(self, trainer, m: dict) -> None:
        self._print(f"eval step {m['step']:>6}  val_loss {_fmt(m['val_loss'])}  ppl {_fmt(m['val_ppl'], '.2f')}")

    def on_samples(self, trainer, samples: list[dict]) -> None:
        for s in samples:
            self._print(f"sample step {s['step']:>6}  {s['prompt']!r} -> {s['text']!r}")


def print_summary(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="training summary", title_justify="left", show_header=False)
    rows = [
        ("steps", f"{summary['steps']:,}"), ("tokens", f"{summary['tokens']:,}"),
        ("train loss", _fmt(summary["train_loss"])), ("val loss", _fmt(summary["val_loss"])),
        ("best val loss", _fmt(summary["best_val_loss"])), ("time", f"{summary['seconds']:.1f} s"),
        ("tokens/s", _fmt(summary["tokens_per_s"], ",.0f")),
        ("precision", f"{summary['precision']}{' + compile' if summary['compiled'] else ''}"),
    ]
    if summary.get("skipped_steps"):
        rows.append(("skipped steps", str(summary["skipped_steps"])))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    # on its own line, never cut by the table's width, so it can be copied
    console.print(f"run folder: {summary['run']}", soft_wrap=True, highlight=False)
