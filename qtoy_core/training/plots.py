"""Curves of a run folder drawn with matplotlib (headless)."""

from __future__ import annotations

from pathlib import Path

from qtoy_registry import QtoyError

from ..run_files import read_jsonl
from .run_folder import read_metrics


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
    dynamics = read_jsonl(run / "dynamics.jsonl")
    rows = 2 + (2 if dynamics else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3 * rows), constrained_layout=True)
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
    ax.set_xlabel("step")
    if dynamics:
        ax = axes[2]
        x = [d["step"] for d in dynamics]
        for key in sorted(k for k in dynamics[-1] if k.endswith(("qk_sv", "ov_sv"))):
            series = [d[key][0][0] if d.get(key) else float("nan") for d in dynamics]  # head 0, top value
            ax.plot(x, series, label=f"{key} (head 0, top)")
        ax.set_ylabel("top singular value")
        ax.legend(fontsize="x-small")
        ax = axes[3]
        for key in sorted(dynamics[-1]["weight_norm"]):
            ax.plot(x, [d["weight_norm"].get(key, float("nan")) for d in dynamics], label=key)
        ax.set_ylabel("weight norm")
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
    out = Path(out) if out else run / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
