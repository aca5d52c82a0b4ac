"""`qtoy visualize` (per-token loss view) and `qtoy analyze` (circuit report): HTML a person reads."""

from __future__ import annotations

from pathlib import Path

import click


def _load(run: str, tokenizer: str | None, *, need_tokenizer: bool):
    """(model, tokenizer or None) from RUN; errors are one clear paragraph."""
    from qtoy_core.run_files import load_run

    model, run_tokenizer, _ = load_run(run)  # a folder that is not a run: one clear CheckpointError
    tok = run_tokenizer
    if tokenizer:
        from qtoy_core.data import Tokenizer

        tok = Tokenizer.from_file(tokenizer)
    if tok is None and need_tokenizer:
        raise click.ClickException(
            f"{run} has no tokenizer.json, so the text cannot be encoded. Pass --tokenizer PATH (the "
            f"tokenizer.json used for training), or copy it into {run}/tokenizer.json.")
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise click.ClickException(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}: they do not "
            f"belong together. Pass the tokenizer used for training with --tokenizer.")
    return model, tok


def _write(path: str, text: str) -> Path:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot write {p}: {exc.strerror or exc}.") from None
    return p


@click.command("visualize")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--text", help="the text to score")
@click.option("--file", "file_", type=click.Path(exists=True, dir_okay=False), help="read the text from a file")
@click.option("--story", type=click.IntRange(0), help="score story N of the run's corpus (synthetic: the generator's "
              "story N, with its ground truth: label and nats per token)")
@click.option("--color-by", "color_by", type=click.Choice(["loss", "excess"]), default="loss", show_default=True,
              help="background: the token's loss, or its excess loss (loss minus the nats the generator charged to "
                   "it; needs --story on a corpus with ground truth)")
@click.option("--out", default="loss.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML file to write")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), help="a tokenizer.json (default: the run's)")
@click.option("--top", type=click.IntRange(1, 50), default=5, show_default=True,
              help="top predictions shown per token")
@click.option("--no-separator", is_flag=True,
              help="do not put the end-of-text separator before the text (the first token then has no loss)")
def visualize_command(run, text, file_, story, color_by, out, tokenizer, top, no_separator) -> None:
    """Per-token loss of a text under RUN as an HTML page: each token on a white-to-red background
    (saturating at 7 nats); hover a token for its loss and the model's top predictions. With
    --story N on the synthetic corpus the tooltips also give each token's label, generator nats and
    excess loss, and --color-by excess colours by that excess (blue below the generator, red above).

      qtoy visualize runs/x --text "Once upon a time" --out loss.html

      qtoy visualize runs/x --file story.txt --out loss.html

      qtoy visualize runs/x --story 7 --color-by excess --out excess.html
    """
    if sum(x is not None for x in (text, file_, story)) != 1:
        raise click.UsageError("give the text with exactly one of --text TEXT, --file PATH or --story N.")
    if color_by == "excess" and story is None:
        raise click.UsageError(
            "--color-by excess needs the nats the corpus' generator spent on each token, which only the corpus' own "
            "stories have: pick one with --story N (on a run trained on the synthetic corpus) instead of "
            "--text/--file.")
    if file_ is not None:
        try:
            text = Path(file_).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise click.ClickException(f"{file_} is not UTF-8 text.") from None
    from qtoy_core.analysis.loss_view import loss_view

    model, tok = _load(run, tokenizer, need_tokenizer=story is None)
    truth, subtitle = None, f"run {run}"
    if story is not None:
        text, truth, tok, where = _story(run, story, tok, tokenizer)
        subtitle += f" \u00b7 {where}"
    if not text:
        raise click.UsageError("the text is empty.")
    try:
        view = loss_view(model, tok, text, top=top, prepend_separator=not no_separator,
                         title="Per-token loss" if color_by == "loss" else "Per-token excess loss",
                         subtitle=subtitle, color_by=color_by, ground_truth=truth)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    path = _write(out, view.html)
    mean, excess = view.mean_loss, view.mean_excess
    click.echo(f"{path}  ({len(view.tokens)} tokens, mean loss {'n/a' if mean is None else f'{mean:.3f}'} nats"
               f"{'' if excess is None else f', mean excess {excess:.3f} nats'})")


def _story(run: str, index: int, tok, tokenizer: str | None):
    """(text, ground truth or None, tokenizer, where) of story ``index`` of RUN's corpus."""
    from qtoy_core.run_files import load_run_dataset

    _, dataset = load_run_dataset(run, require_record=True)
    if tokenizer is None:
        tok = dataset.tokenizer()  # the run's tokenizer.json when it has one: the ids the ground truth uses
    story_of = getattr(dataset, "story", None)
    truth_of = getattr(dataset, "ground_truth", None)
    if not callable(story_of) or not callable(truth_of):
        raise click.ClickException(
            f"{run} was trained on the {dataset.name!r} corpus, which offers no indexed stories with ground truth "
            f"(per-token labels and nats): --story and --color-by excess need such a corpus (synthetic). Score a "
            f"text with --text or --file and --color-by loss.")
    text = story_of(index).text
    truth = truth_of(index)
    if tokenizer is not None and [int(i) for i in tok.encode(text)] != [int(i) for i in truth["ids"]]:
        raise click.ClickException(
            f"--tokenizer {tokenizer} is not the tokenizer of {run}'s corpus: its tokens differ from those the ground "
            f"truth describes. Leave --tokenizer out to use the run's own.")
    return text, truth, tok, f"story {index} ({dataset.split_of(text)} split) of the {dataset.name} corpus"


@click.command("analyze")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML report to write")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write every number as JSON")
@click.option("--top-k", "--top_k", "top_k", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="token pairs / tokens per table")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), help="a tokenizer.json (default: the run's)")
@click.option("--no-plots", is_flag=True, help="tables only (faster)")
@click.option("--no-behaviour", is_flag=True,
              help="leave out the heads scored on behaviour (repeated random sequences) and the induction loss")
@click.option("--attention-text", help="also write the attention viewer for this text next to the report "
              "(OUT's name with -attention.html) and link it")
def analyze_command(run, out, json_out, top_k, tokenizer, no_plots, no_behaviour, attention_text) -> None:
    """Circuit report of RUN, read from its weights: the direct path's top bigrams, each head's top
    QK and OV token pairs, eigenvalue spectra and copying scores, the positional kernel, composition
    scores (2+ layers) and the bilinear MLP's top eigenvectors; beside them the heads scored on
    behaviour (previous-token, duplicate-token, induction, copying on repeated random sequences), the
    rank correlation of each kind with its weight-based score, and the induction loss. One
    self-contained HTML file; --json writes every number for scripting.

      qtoy analyze runs/x --out report.html --json report.json

      qtoy analyze runs/x --out report.html --attention-text "Once upon a time"
    """
    from qtoy_core.analysis.report import Report

    model, tok = _load(run, tokenizer, need_tokenizer=attention_text is not None)
    page = None
    if attention_text is not None:
        page_path = Path(out).with_name(Path(out).stem + "-attention.html")
        _write(str(page_path), _attention_page(model, tok, attention_text, run))
        page = page_path.name
    report = Report.from_model(model, tok, top_k=top_k, run=run, plots=not no_plots, behaviour=not no_behaviour,
                               attention_page=page)
    path = _write(out, report.html)
    if page is not None:
        click.echo(str(Path(out).with_name(page)))
    click.echo(str(path))
    if json_out:
        click.echo(str(_write(json_out, report.to_json() + "\n")))


def _attention_page(model, tok, text: str, run: str, *, no_separator: bool = False) -> str:
    from qtoy_core.analysis.attention_view import attention_view

    if not text:
        raise click.UsageError("the text is empty: give the text whose attention patterns to show.")
    return attention_view(model, tok, text, prepend_separator=not no_separator, subtitle=f"run {run}").html


@click.command("attention")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--text", help="the text to show the patterns on")
@click.option("--file", "file_", type=click.Path(exists=True, dir_okay=False), help="read the text from a file")
@click.option("--out", default="attention.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML file to write")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), help="a tokenizer.json (default: the run's)")
@click.option("--no-separator", is_flag=True, help="do not put the end-of-text separator before the text")
def attention_command(run, text, file_, out, tokenizer, no_separator) -> None:
    """Attention patterns of every layer and head of RUN on a text, as one self-contained HTML page:
    hover a token to see its weights over the keys for the selected head; thumbnails show every
    head's whole pattern. The colour scale says what the pattern is: probabilities (softmax),
    non-negative and unbounded (quadratic), or signed (bilinear, a diverging scale).

      qtoy attention runs/x --text "Once upon a time, there was a fox." --out attention.html
    """
    if (text is None) == (file_ is None):
        raise click.UsageError("give the text with exactly one of --text TEXT or --file PATH.")
    if file_ is not None:
        try:
            text = Path(file_).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise click.ClickException(f"{file_} is not UTF-8 text.") from None
    model, tok = _load(run, tokenizer, need_tokenizer=True)
    path = _write(out, _attention_page(model, tok, text, run, no_separator=no_separator))
    click.echo(str(path))
