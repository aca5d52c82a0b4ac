"""`qtoy patch`: activation patching from a clean into a corrupted prompt, as an HTML heat map."""

from __future__ import annotations

import json

import click


def _token(tok, text: str, what: str) -> int:
    """One token id from a token's text (or a number: the id itself)."""
    if text.isdigit():
        return int(text)
    ids = tok.encode(text)
    if len(ids) != 1:
        pieces = [tok.decode([i]) for i in ids]
        raise click.ClickException(
            f"--{what} {text!r} is {len(ids)} tokens ({pieces}) under this tokenizer, not one: give a single token's "
            f"text (often with its leading space, e.g. ' Mo') or its id")
    return ids[0]


@click.command("patch")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--clean", required=True, help="the clean prompt")
@click.option("--corrupted", required=True, help="the corrupted prompt (same number of tokens)")
@click.option("--answer", help="the token the clean prompt should predict next (text or id)")
@click.option("--wrong", help="the token the corrupted prompt leads to (text or id)")
@click.option("--metric", type=click.Choice(["logit_diff", "loss"]), default="logit_diff", show_default=True,
              help="logit_diff: answer minus wrong at the last position; loss: next-token loss of the clean text")
@click.option("--kinds", default="resid_pre,head_out_by_pos,head_q,head_k,head_v,head_pattern", show_default=True,
              help="comma-separated scans (resid_pre, attn_out, mlp_out, head_out_by_pos, head_out, head_q, "
                   "head_k, head_v, head_pattern)")
@click.option("--out", default="patch.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML file to write")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write every value as JSON")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), help="a tokenizer.json (default: the run's)")
def patch_command(run, clean, corrupted, answer, wrong, metric, kinds, out, json_out, tokenizer) -> None:
    """Activation patching in RUN: run the corrupted prompt, put back one clean activation at a time
    (the residual stream per layer and position, each head's output per position, each head's q,
    k, v and pattern) and show how much of the clean logit difference returns, as a heat map
    (1 = clean restored, 0 = no effect).

      qtoy patch runs/x --clean "Mo met Pip. Pip met" --corrupted "Mo met Bo. Pip met" --answer " Mo" --wrong " Bo"
    """
    import torch

    from qtoy_core.analysis.patching import activation_patching, patching_html

    from .analysis import _load, _write

    model, tok = _load(run, tokenizer, need_tokenizer=True)
    if metric == "logit_diff" and (answer is None or wrong is None):
        raise click.UsageError("the logit_diff metric needs --answer and --wrong (or use --metric loss).")
    clean_ids, corrupted_ids = tok.encode(clean), tok.encode(corrupted)
    if not clean_ids:
        raise click.UsageError("the clean prompt is empty.")
    a = _token(tok, answer, "answer") if answer is not None else None
    w = _token(tok, wrong, "wrong") if wrong is not None else None
    results = activation_patching(model, torch.tensor([clean_ids]), torch.tensor([corrupted_ids]), answer=a, wrong=w,
                                  metric=metric, kinds=[k.strip() for k in kinds.split(",") if k.strip()])
    pieces = [tok.decode([i]) for i in clean_ids]
    note = (f"run {run}; clean {clean!r}, corrupted {corrupted!r}"
            + (f"; answer {tok.decode([a])!r} ({a}) vs wrong {tok.decode([w])!r} ({w}) at the last position"
               if a is not None else "; metric: next-token loss of the clean text"))
    path = _write(out, patching_html(results, tokens=pieces, note=note))
    first = next(iter(results.values()))
    click.echo(f"{path}  ({metric}: clean {first.clean:.4g}, corrupted {first.corrupted:.4g})")
    if json_out:
        data = {"run": run, "clean": clean, "corrupted": corrupted, "tokens": pieces, "answer": a, "wrong": w,
                "results": {k: r.to_dict() for k, r in results.items()}}
        click.echo(str(_write(json_out, json.dumps(data, indent=1) + "\n")))
