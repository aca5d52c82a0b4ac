"""`qtoy attribute`: which parts and paths of the model wrote one prediction's logit."""

from __future__ import annotations

import click

from .analysis import _load, _write


def _target_id(tok, model, target: str | None, target_id: int | None) -> int | None:
    """The target token id from --target TEXT (one token of the vocabulary) or --target-id ID."""
    vocab = model.config.vocab_size
    if target is not None and target_id is not None:
        raise click.UsageError("give the target once: --target TEXT or --target-id ID, not both.")
    if target_id is not None:
        if not 0 <= target_id < vocab:
            raise click.ClickException(f"--target-id {target_id} is not in the vocabulary (ids 0..{vocab - 1}).")
        return target_id
    if target is None:
        return None
    ids = tok.encode(target)
    if len(ids) != 1:
        pieces = ", ".join(repr(tok.decode([i])) for i in ids) or "no tokens"
        raise click.ClickException(
            f"--target {target!r} is not a token in the vocabulary: it encodes to {len(ids)} tokens ({pieces}). Give "
            f"a single token's text (mind the leading space, e.g. ' the'), or its id with --target-id.")
    return ids[0]


@click.command("attribute")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--text", required=True, help="the text whose prediction is attributed")
@click.option("--position", type=int, default=-1, show_default=True,
              help="the token (0-based, negative from the end) whose next-token prediction is attributed")
@click.option("--target", help="the predicted token's text (one token; default: the model's top prediction)")
@click.option("--target-id", "target_id", type=int, help="the predicted token's id instead of --target")
@click.option("--out", default="attr.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML page to write")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, type=click.Path(dir_okay=False),
              help="also write every number as JSON: --json PATH, or --json alone for standard output")
@click.option("--paths/--no-paths", default=None,
              help="require (or skip) the exact path expansion; default: shown when the model allows it")
@click.option("--top", type=click.IntRange(1, 200), default=12, show_default=True, help="paths shown")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), help="a tokenizer.json (default: the run's)")
@click.option("--no-separator", is_flag=True,
              help="do not put the end-of-text separator before the text (position 0 is then its first token)")
def attribute_command(run, text, position, target, target_id, out, json_out, paths, top, tokenizer,
                      no_separator) -> None:
    """Split the logit of one prediction of RUN on a text into the parts that wrote it: the direct
    path (token and position embeddings), each head of each layer, each MLP; exact for a model
    without norm (with RMSNorm the final scale is frozen and the page says approximate). For
    polynomial attention without norm also the largest paths: each head's output split by the
    sources of its value, query and key (V-, Q-, K-composition). One offline HTML page.

      qtoy attribute runs/x --text "Zorblin went home. Then Zorb" --target "lin" --out attr.html

      qtoy attribute runs/x --text "..." --position 5 --json attr.json
    """
    from qtoy_core.analysis.attribution_view import attribution_view

    model, tok = _load(run, tokenizer, need_tokenizer=True)
    tid = _target_id(tok, model, target, target_id)
    view = attribution_view(model, tok, text, position=position, target=tid, paths=paths, top=top, run=run,
                            title=None, prepend_separator=not no_separator)
    path = _write(out, view.html)
    d = view.data
    t = d["target"]
    click.echo(f"{path}  (position {d['position']}, target {t['text']!r} #{t['id']}: logit {d['logit']:.4g}, "
               f"{'approximate' if d['approximate'] else 'exact'}, {len(d['parts'])} parts, "
               f"{len(d['paths']['top'])} paths)", err=json_out == "-")
    if json_out == "-":
        click.echo(view.to_json())
    elif json_out:
        click.echo(str(_write(json_out, view.to_json() + "\n")))
