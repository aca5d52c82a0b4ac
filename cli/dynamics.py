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


@click.command("similarity")
@click.argument("a", type=click.Path(exists=True, file_okay=False))
@click.argument("b", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoints", is_flag=True, help="the matrix over A's saved checkpoints (JSON + heatmap PNG)")
@click.option("--method", type=click.Choice(["exact", "data"]), default="data", show_default=True,
              help="exact: polynomial models, uniform sequences, no sampling (short n_ctx only); data: any "
                   "model, on A's validation sequences (or uniform ones with --uniform), with a standard error")
@click.option("--positions", type=click.Choice(["last", "all"]), default="last", show_default=True,
              help="compare the logits at the last position, or at every position")
@click.option("--n-ctx", "n_ctx", type=int, help="sequence length compared (default: the models' n_ctx)")
@click.option("--uniform", is_flag=True, help="data: uniform random sequences instead of the validation split")
@click.option("--samples", type=int, default=2048, show_default=True, help="data with --uniform: sequences")
@click.option("--batches", "n_batches", type=int, default=8, show_default=True,
              help="data: validation batches to use")
@click.option("--optimize", type=click.Choice(["greedy", "hyper"]), default="greedy", show_default=True,
              help="exact: the contraction path search (hyper: up to 30 s per network structure, much narrower "
                   "paths, so larger vocabularies and lengths fit)")
@click.option("--out", type=click.Path(dir_okay=False), help="--checkpoints: PNG path (default A/similarity.png)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="--checkpoints: JSON path (default A/similarity.json); else print JSON to this file")
def similarity_command(a, b, checkpoints, method, positions, n_ctx, uniform, samples, n_batches, optimize, out,
                       json_out) -> None:
    """Functional similarity: the cosine of two models' output functions, <f_a, f_b> / (|f_a| |f_b|)
    with <f, g> = E_x[f(x) . g(x)] over token sequences x (see docs/dynamics.md).

      qtoy similarity runs/seed0 runs/seed1

      qtoy similarity runs/x --checkpoints          # matrix over the run's checkpoints, phases marked
    """
    from qtoy_core.analysis.similarity import similarity
    from qtoy_core.analysis.trajectory import (change_points, checkpoint_models, checkpoint_similarity,
                                               plot_similarity, validation_batches)

    if checkpoints == (b is not None):
        raise click.UsageError("give two runs A B, or one run A with --checkpoints.")
    if checkpoints:
        models = checkpoint_models(a)
        if method == "data" and uniform:
            from qtoy_core.analysis.similarity import similarity_matrix

            values, errs = similarity_matrix([m for _, m in models], "data", n_ctx=n_ctx, positions=positions,
                                             samples=samples)
            steps = [e["step"] for e, _ in models]
        else:
            values, errs, steps = checkpoint_similarity(a, method=method, n_ctx=n_ctx, positions=positions,
                                                        n_batches=n_batches, models=models, optimize=optimize)
        phases = change_points(values)
        doc = {"run": a, "method": method, "positions": positions, "steps": steps, "similarity": values.tolist(),
               "stderr": errs.tolist(), "change_points": [steps[k] for k in phases],
               "tokens": [e["tokens"] for e, _ in models]}
        json_path = Path(json_out or Path(a) / "similarity.json")
        json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        png = plot_similarity(values, steps, out or Path(a) / "similarity.png",
                              title=f"{Path(a).name}: {method} similarity, {positions} position(s)")
        click.echo(f"{json_path}\n{png}")
        click.echo(f"{len(steps)} checkpoints; change points at steps: "
                   f"{', '.join(str(steps[k]) for k in phases) or 'none'}")
        return
    from qtoy_core import ToyTransformer

    model_a, model_b = ToyTransformer.from_pretrained(a).eval(), ToyTransformer.from_pretrained(b).eval()
    batches = None
    if method == "data" and not uniform:
        batches, _ = validation_batches(a, n_batches=n_batches)
    sim = similarity(model_a, model_b, method, n_ctx=n_ctx, positions=positions, batches=batches,
                     samples=0 if batches is not None else samples, optimize=optimize)
    if json_out:
        Path(json_out).write_text(json.dumps(sim.to_dict(), indent=2) + "\n", encoding="utf-8")
    err = f" +- {sim.stderr:.4f}" if sim.method == "data" else ""
    click.echo(f"similarity {sim.value:.4f}{err}  ({sim.method}, {sim.positions} position(s), n_ctx {sim.n_ctx}"
               f"{f', {sim.samples} sequences' if sim.samples else ''})")


@click.command("dynamics")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="PNG path (default RUN/dynamics.png)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="JSON path (default RUN/dynamics.json)")
@click.option("--batches", "n_batches", type=int, default=4, show_default=True, help="validation batches per checkpoint")
@click.option("--similarity", "method", type=click.Choice(["exact", "data"]), default="data", show_default=True,
              help="how the similarity to the final model is computed")
@click.option("--no-behaviour", is_flag=True,
              help="leave out the behaviour-based induction score and the induction loss (repeated random sequences)")
def dynamics_command(run, out, json_out, n_batches, method, no_behaviour) -> None:
    """When each circuit forms: per saved checkpoint of RUN (train with --checkpoint-schedule log),
    the validation loss and (synthetic) the excess loss per label, copying and composition scores,
    the induction score read from the weights and measured on behaviour (as qtoy analyze scores
    heads), the induction loss, and the similarity to the final model, as one PNG and JSON.

      qtoy dynamics runs/x
    """
    from qtoy_core.analysis.trajectory import FORMATION_KEYS, formation_step, plot_trajectory, trajectory

    rows = trajectory(run, similarity_method=method, n_batches=n_batches, behaviour=not no_behaviour)
    json_path = Path(json_out or Path(run) / "dynamics.json")
    json_path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    png = plot_trajectory(rows, out or Path(run) / "dynamics.png", title=f"{Path(run).name}: training dynamics")
    click.echo(f"{json_path}\n{png}")
    for key in FORMATION_KEYS:
        if not rows or rows[-1].get(key) is None:
            continue
        final = rows[-1][key]
        chance = rows[-1].get(f"{key} chance")
        formed = formation_step(rows, key)
        click.echo(f"{key}: {final:.3f} at the end{'' if chance is None else f' (chance {chance:.3f})'}; "
                   + ("no rise above its baseline" if formed is None else
                      f"at or above half of its rise{'' if chance is None else ' above chance'} from step {formed} on"))
    last = rows[-1] if rows else {}
    if last.get("induction loss (second half)") is not None:
        click.echo(f"induction loss: {last['induction loss (second half)']:.3f} nats on the repeated half vs "
                   f"{last['induction loss (first half)']:.3f} on the random half at the end")
    for note in dict.fromkeys(n for r in rows for n in r.get("notes", [])):
        click.echo(f"note: {note}")
