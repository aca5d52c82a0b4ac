"""`qtoy data preview`: look at a dataset through its tokenizer before training on it;
`qtoy data prepare`: tokenize it once into memory-mapped shards (`qtoy train --data DIR`)."""

from __future__ import annotations

import json

import click

from .options import RegistryChoice


@click.group("data")
def data_group() -> None:
    """Datasets: preview documents, token boundaries and statistics; prepare token shards."""


@data_group.command("preview")
@click.argument("files", nargs=-1)
@click.option("--dataset", type=RegistryChoice("dataset"), default="synthetic", show_default=True,
              help="the dataset to read")
@click.option("--data-files", "--data_files", "data_files", multiple=True,
              help="local files, globs or a hub-like folder in the dataset's format (repeatable; FILES too)")
@click.option("--tokenizer", help="a local tokenizer.json instead of the dataset's own")
@click.option("-n", "n", type=int, default=3, show_default=True, help="sample documents to show")
@click.option("--split", type=click.Choice(["train", "validation"]), default="train", show_default=True)
@click.option("--stats-docs", "stats_docs", type=int, default=200, show_default=True,
              help="documents the statistics are computed over")
@click.option("--max-chars", "max_chars", type=int, default=800, show_default=True,
              help="characters of each sample shown (0: all)")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="a dataset option, e.g. --set difficulty=0.8 --set column=body")
@click.option("--json", "as_json", is_flag=True, help="print JSON (samples with their tokens, and the stats)")
def preview_command(files, dataset, data_files, tokenizer, n, split, stats_docs, max_chars, assignments,
                    as_json) -> None:
    """Show sample documents with token boundaries and a table of statistics.

    Token boundaries alternate colours on a terminal (elsewhere tokens are separated by |); unknown
    tokens are red. Examples: `qtoy data preview`, `qtoy data preview --dataset text notes/*.txt`,
    `qtoy data preview --dataset simplestories --data-files ss/ --tokenizer ss-tokenizer.json`.
    """
    from qtoy_core.data import build_dataset
    from qtoy_core.data.preview import sample_documents, split_stats
    from qtoy_core.overrides import apply_overrides

    options: dict = {"name": dataset}
    paths = list(data_files) + list(files)
    if paths:
        options["data_files"] = paths
    if tokenizer:
        options["tokenizer"] = tokenizer
    options = apply_overrides(options, assignments)
    ds = build_dataset(options)
    ds.tokenizer()  # the tokenizer first: a missing one fails before any data is read
    samples = sample_documents(ds, n, split) if n > 0 else []
    stats = split_stats(ds, max(stats_docs, 1), split)
    if as_json:
        click.echo(json.dumps({"dataset": ds.name, "samples": samples, "stats": stats}, indent=2))
        return
    _render(ds, samples, stats, max_chars)


@data_group.command("prepare")
@click.option("--dataset", type=RegistryChoice("dataset"), default="synthetic", show_default=True,
              help="the dataset to tokenize")
@click.option("--data-files", "--data_files", "data_files", multiple=True,
              help="local files, globs or a hub-like folder in the dataset's format (repeatable)")
@click.option("--tokenizer", help="a local tokenizer.json instead of the dataset's own")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="the shards folder to write")
@click.option("--num-proc", "--num_proc", "num_proc", type=int, default=None,
              help="tokenizing processes (default: the CPU count)")
@click.option("--max-documents", "max_documents", type=int, default=None,
              help="read only the source's first N documents (needed for an endless source)")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="a dataset option, e.g. --set n_stories=20000 --set val_fraction=0.02")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def prepare_command(dataset, data_files, tokenizer, out, num_proc, max_documents, assignments, as_json) -> None:
    """Tokenize a dataset once into flat token shards (memory-mapped by `qtoy train --data OUT`).

    The documents and splits are those the streaming path reads. Interrupted, the same command
    resumes; until it has finished, OUT is refused by `qtoy train`. Examples:
    `qtoy data prepare --set n_stories=20000 --out shards/synthetic`,
    `qtoy data prepare --dataset simplestories --data-files ss/ --tokenizer ss.json --out shards/ss`.
    """
    import os
    import sys

    from qtoy_core.data import build_dataset
    from qtoy_core.data.shards import prepare_shards
    from qtoy_core.overrides import apply_overrides

    options: dict = {"name": dataset}
    if data_files:
        options["data_files"] = list(data_files)
    if tokenizer:
        options["tokenizer"] = tokenizer
    options = apply_overrides(options, assignments)
    ds = build_dataset(options)
    ds.tokenizer()  # the tokenizer first: a missing one fails before any data is read

    def report(p: dict) -> None:
        if not as_json:
            click.echo(f"  {p['source_pos']:,} documents, {p['tokens']:,} tokens, {p['seconds']:.0f} s "
                       f"(committed)", err=True)

    if max_documents is not None and max_documents < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-documents")
    procs = num_proc or max(1, min(os.cpu_count() or 1, 8))
    manifest = prepare_shards(ds, out, num_proc=procs, max_documents=max_documents,
                              progress=report if sys.stderr.isatty() else None)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    prep = manifest["prepared"]
    click.echo(f"{out}: {manifest['dataset']}, {manifest['source_records']:,} source documents, tokens {manifest['dtype']}")
    for split, info in manifest["splits"].items():
        click.echo(f"  {split:<10} {info['documents']:>10,} documents {info['tokens']:>14,} tokens "
                   f"({len(info['shards'])} shard{'s' if len(info['shards']) > 1 else ''})")
    rate = prep.get("tokens_per_s")
    click.echo(f"  {prep['seconds']:.1f} s with {prep['num_proc']} process(es)"
               + (f", {rate:,} tokens/s ({rate // prep['num_proc']:,} per process)" if rate else ""))
    click.echo(f"train on it: qtoy train --data {out}")


def _render(ds, samples, stats, max_chars: int) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    colour = console.is_terminal and not console.no_color
    styles = ("on grey23", "on grey35")
    for sample in samples:
        text = Text()
        shown = 0
        k = 0
        for piece in sample["pieces"]:
            if max_chars and shown >= max_chars:
                text.append(" …", style="dim")
                break
            chunk = piece["text"]
            shown += len(chunk)
            if piece["id"] is None:
                text.append(chunk)
                continue
            if colour:
                text.append(chunk, style="bold red" if piece["unk"] else styles[k % 2])
            else:
                text.append(("|" if k else "") + (f"[UNK:{chunk}]" if piece["unk"] else chunk))
            k += 1
        n_tokens = sum(1 for p in sample["pieces"] if p["id"] is not None)
        console.rule(f"{ds.name} document {sample['key']} ({n_tokens} tokens, {len(sample['text'])} chars)")
        console.print(text, soft_wrap=not colour)
    table = Table(title=f"{ds.name}: {stats['split']} split, first {stats['documents']} documents",
                  title_justify="left", show_header=False)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    tok = stats["tokenizer"]
    rows = [
        ("documents", f"{stats['documents']:,}"),
        ("tokens", f"{stats['tokens']:,}"),
        ("tokens per document (mean / median)",
         f"{stats['tokens_per_document_mean']:.1f} / {stats['tokens_per_document_median']:g}"),
        ("tokens per document (min / max)", f"{stats['tokens_per_document_min']} / {stats['tokens_per_document_max']}"),
        ("characters per token", f"{stats['chars_per_token']:.2f}"),
        ("vocabulary size", f"{stats['vocab_size']:,}"),
        ("vocabulary coverage", f"{stats['distinct_tokens']:,} tokens ({stats['vocab_coverage']:.1%})"),
        ("unknown-token rate", "n/a (no unknown token)" if stats["unknown_rate"] is None
         else f"{stats['unknown_rate']:.3%} ({stats['unknown_tokens']:,} tokens)"),
        ("special ids (bos / eos / pad / unk)", " / ".join(str(tok[k]) for k in ("bos_id", "eos_id", "pad_id", "unk_id"))),
        ("tokenizer", f"{tok['fingerprint']} ({tok['source']})"),
    ]
    entropy = stats.get("entropy")
    if entropy:
        rows += [
            ("corpus entropy per token", f"{entropy['nats_per_token']:.4f} nats ({entropy['bits_per_token']:.4f} bits)"),
            ("entropy per document", f"{entropy['nats_per_document']:.1f} nats"),
            ("token labels (fixed / copyable / free)",
             " / ".join(f"{entropy['label_fractions'][k]:.1%}" for k in ("fixed", "copyable", "free"))),
        ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
