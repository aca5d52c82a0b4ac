"""`qtoy plot RUN`: loss and learning-rate curves (and training dynamics) to a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("plot")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="PNG path (default RUN/curves.png)")
def plot_command(run, out) -> None:
    """Draw RUN's loss (train and validation) and learning rate, plus dynamics.jsonl when present."""
    from qtoy_core.training.plots import plot_run

    path = plot_run(run, out)
    click.echo(str(path))
