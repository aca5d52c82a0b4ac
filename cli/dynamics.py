"""`qtoy checkpoints`, `qtoy similarity`, `qtoy dynamics`: a run's trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("checkpoints")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def checkpoints_command(run, as_json) -> None:
    """List the weights RUN kept: log-schedule snapshots (weights only) and full checkpoints, with
    their step and token count. Load one with ToyTransformer.from_pretrained(RUN, step=N).

      qtoy checkpoints runs/x
    """
    from qtoy_core.training.run_folder import RunFolderError, list_checkpoints

    entries = list_checkpoints(run)
    if not entries:
        raise RunFolderError(f"{run} has no saved checkpoints or snapshots (the run stopped before its first save, "
                             f"or it is not a run folder). Train with --checkpoint-schedule log to keep weights at "
                             f"steps 1, 2, 4, ... for studying training dynamics.")
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    click.echo(f"{'step':>9}  {'tokens':>12}  kind        path")
    for e in entries:
        flags = " ".join(f for f in ("latest", "best") if e[f])
        tokens = f"{e['tokens']:,}" if e["tokens"] is not None else "?"
        kind = e["kind"] + (f" ({flags})" if flags else "")
        click.echo(f"{e['step']:>9}  {tokens:>12}  {kind:<10}  {Path(e['path']).relative_to(Path(run))}")
