"""`qtoy eval` and `qtoy generate`: using a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import click


def load_run(run: str):
    """(model, tokenizer or None, run document) from a run folder or a model folder."""
    from qtoy_core.checkpoint import read_document
    from qtoy_core.model import ToyTransformer

    document = read_document(run)  # a clear message for a missing or corrupt config.json
    model = ToyTransformer.from_pretrained(run)
    tokenizer = None
    tok_path = Path(run) / "tokenizer.json"
    if tok_path.exists():
        from qtoy_core.data import Tokenizer

        tokenizer = Tokenizer.from_file(tok_path)
    return model, tokenizer, document


@click.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--dataset", help="evaluate on another dataset (default: the run's)")
@click.option("--data-files", "--data_files", "data_files", multiple=True, help="local data files or globs")
@click.option("--tokenizer", help="a local tokenizer.json (default: the run's)")
@click.option("--eval-iters", "eval_iters", type=int, default=50, show_default=True)
@click.option("--batch-size", "batch_size", type=int, default=None, help="default: the run's")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def eval_command(run, dataset, data_files, tokenizer, eval_iters, batch_size, as_json) -> None:
    """Loss and perplexity of RUN on a validation stream."""
    import math

    import torch

    from qtoy_core.data import StreamingTextDataset, build_dataset, check_vocab
    from qtoy_core.data.config import DataConfig
    from qtoy_core.model import cross_entropy

    model, run_tokenizer, doc = load_run(run)
    data = DataConfig.model_validate(doc.get("data", {}))
    ds = data.dataset.model_dump()
    if dataset:
        ds = {"name": dataset}
    if data_files:
        ds["data_files"] = list(data_files)
    if tokenizer:
        ds["tokenizer"] = tokenizer
    elif run_tokenizer is not None and not dataset:
        ds["tokenizer"] = str(Path(run) / "tokenizer.json")
    data = DataConfig.model_validate({**data.model_dump(), "dataset": ds})
    train = doc.get("train", {})
    if data.prepared and not (dataset or data_files or tokenizer):  # trained on prepared shards: their val split
        from qtoy_core.data.shards import ShardBatches

        stream = ShardBatches(data.prepared, split="validation", n_ctx=model.config.n_ctx,
                              batch_size=batch_size or train.get("batch_size", 16))
        check_vocab(model.config, stream.shards.tokenizer())
    else:
        source = build_dataset(data.dataset)
        check_vocab(model.config, source.tokenizer())
        stream = StreamingTextDataset(source, split="validation", n_ctx=model.config.n_ctx,
                                      batch_size=batch_size or train.get("batch_size", 16), mode=data.mode,
                                      seed=train.get("seed", 0), shuffle_buffer=data.shuffle_buffer,
                                      tokenize_batch=data.tokenize_batch)
    model.eval()
    total, count, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(stream):
            if i >= eval_iters:
                break
            tokens, mask = batch.tokens, batch.attention_mask
            logits = model(tokens[:, :-1], None if mask is None else mask[:, :-1])
            weight = float(mask[:, 1:].sum()) if mask is not None else tokens[:, 1:].numel()
            total += cross_entropy(logits, tokens[:, 1:], None if mask is None else mask[:, 1:]).item() * weight
            count += weight
            n += 1
    if n == 0:
        raise click.ClickException("the validation stream produced no batch: the data is too small.")
    loss = total / count
    result = {"run": run, "dataset": data.dataset.name, "batches": n, "tokens": int(count), "loss": loss,
              "perplexity": math.exp(min(loss, 50))}
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{data.dataset.name}: loss {loss:.4f}  perplexity {result['perplexity']:.2f}  "
                   f"({n} batches, {int(count):,} tokens)")


@click.command("generate")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", default="Once upon a time", show_default=True)
@click.option("--max-new-tokens", "--max_new_tokens", "max_new_tokens", type=int, default=100, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", "--top_k", "top_k", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--num-samples", "-n", "num_samples", type=int, default=1, show_default=True)
@click.option("--cache", "cache_mode", type=click.Choice(["recurrent", "kv", "none"]), default="recurrent",
              show_default=True, help="recurrent: constant-size state for polynomial attention")
def generate_command(run, prompt, max_new_tokens, temperature, top_k, seed, num_samples, cache_mode) -> None:
    """Sample continuations of --prompt from RUN."""
    import torch

    from qtoy_core.generate import generate

    model, tokenizer, _ = load_run(run)
    if tokenizer is None:
        raise click.ClickException(f"{run} has no tokenizer.json, so text cannot be encoded. Copy the tokenizer "
                                   f"used for training into {run}/tokenizer.json.")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise click.ClickException("the prompt encodes to no tokens; give some text.")
    prompt_ids = torch.tensor([ids] * num_samples)
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   cache_mode=None if cache_mode == "none" else cache_mode, eos_id=tokenizer.eos_id)
    for i, row in enumerate(out.tolist()):
        if num_samples > 1:
            click.secho(f"--- sample {i + 1}", fg="cyan")
        click.echo(tokenizer.decode(row))
