"""Curves of a run folder drawn with matplotlib (headless).

Core draws the loss and the learning rate from metrics.jsonl; every callback the run used adds its
own rows through `Callback.plot_panels(run)` (core never reads a callback's files)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

from qtoy_registry import QtoyError, get_registry

from ..run_files import read_jsonl
from .run_folder import read_metrics


def callback_panels(run: Path) -> list[Callable]:
    """``draw(ax)`` functions of the callbacks named in the run's config.json (their `plot_panels`)."""
    try:
        doc = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    panels = []
    for spec in doc.get("callbacks") or []:
        name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            continue
        try:
            impl = get_registry().get("callback", name).load()
        except Exception as exc:  # a plugin that is gone: draw the rest
            warnings.warn(f"callback {name!r} of {run} cannot be loaded ({exc}); its panels are left out")
            continue
        draw = getattr(impl, "plot_panels", None)
        if callable(draw):
            panels += list(draw(run))
    return panels


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    metrics = read_metrics(run)
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    if not steps:
        raise QtoyError(f"{run} has no training records in metrics.jsonl yet: nothing to plot.")
    extra = callback_panels(run)
    rows = 2 + len(extra)
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3 * rows), constrained_layout=True, squeeze=False)
    axes = axes[:, 0]
    ax = axes[0]
    ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], lw=0.8, alpha=0.7, label="train")
    if evals:
        ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="validation")
    ax.set_ylabel("loss (nats)")
    ax.set_title(run.name)
    ax.legend()
    ax = axes[1]
    ax.plot([m["step"] for m in steps], [m["lr"] for m in steps])
    ax.set_ylabel("learning rate")
    for draw, ax in zip(extra, axes[2:]):
        draw(ax)
    axes[-1].set_xlabel("step")
    out = Path(out) if out else run / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
