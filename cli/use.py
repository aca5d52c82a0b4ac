"""`qtoy eval` and `qtoy generate`: using a trained run."""

from __future__ import annotations

import json

import click


@click.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--dataset", help="evaluate on another dataset (default: the run's)")
@click.option("--data-files", "--data_files", "data_files", multiple=True, help="local data files or globs")
@click.option("--tokenizer", help="a local tokenizer.json (default: the run's)")
@click.option("--eval-iters", "eval_iters", type=int, default=50, show_default=True)
@click.option("--batch-size", "batch_size", type=int, default=None, help="default: the run's")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def eval_command(run, dataset, data_files, tokenizer, eval_iters, batch_size, as_json) -> None:
    """Loss and perplexity of RUN on a validation stream (per real token, as training reports it)."""
    from qtoy_core.data import StreamingTextDataset, build_dataset, check_vocab
    from qtoy_core.data.config import DataConfig
    from qtoy_core.evaluation import evaluate
    from qtoy_core.run_files import load_run, run_tokenizer_path

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
        ds["tokenizer"] = str(run_tokenizer_path(run))
    data = DataConfig.model_validate({**data.model_dump(), "dataset": ds})
    train = doc.get("train", {})
    if data.prepared and not (dataset or data_files or tokenizer):  # trained on prepared shards: their val split
        from qtoy_core.data.shards import ShardBatches

        source = None
        stream = ShardBatches(data.prepared, split="validation", n_ctx=model.config.n_ctx,
                              batch_size=batch_size or train.get("batch_size", 16))
        check_vocab(model.config, stream.shards.tokenizer())
    else:
        source = build_dataset(data.dataset)
        check_vocab(model.config, source.tokenizer())
        stream = StreamingTextDataset.from_config(data, split="validation", n_ctx=model.config.n_ctx,
                                                  batch_size=batch_size or train.get("batch_size", 16),
                                                  seed=train.get("seed", 0), dataset=source)
    scored = evaluate(model, stream, eval_iters)
    if scored.batches == 0:
        raise click.ClickException("the validation stream produced no batch: the data is too small.")
    result = {"run": run, "dataset": data.dataset.name, "batches": scored.batches, "tokens": scored.tokens,
              "loss": scored.loss, "perplexity": scored.perplexity}
    if callable(getattr(source, "batch_ground_truth", None)):  # a corpus that knows its entropy (synthetic)
        result["optimum"] = _excess(model, source, data, model.config.n_ctx, batch_size or train.get("batch_size", 16),
                                    train.get("seed", 0), eval_iters)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{data.dataset.name}: loss {scored.loss:.4f}  perplexity {scored.perplexity:.2f}  "
                   f"({scored.batches} batches, {scored.tokens:,} tokens)")
        if "optimum" in result:
            o = result["optimum"]
            click.echo(f"excess over the generator's entropy: {o['excess']:.4f} nats/token (loss {o['loss']:.4f}, "
                       f"entropy {o['entropy']:.4f})")
            for label, e in o["by_label"].items():
                if e["tokens"]:
                    click.echo(f"  {label:<9} {e['fraction']:6.1%} of tokens  loss {e['loss']:.4f}  entropy "
                               f"{e['entropy']:.4f}  excess {e['excess']:.4f}")


def _excess(model, source, data, n_ctx, batch_size, seed, eval_iters) -> dict:
    """Loss, entropy and excess loss per label on the validation stream (`analysis.optimum.excess_loss`)."""
    from qtoy_core.analysis.optimum import excess_loss
    from qtoy_core.data import StreamingTextDataset

    labels = getattr(source, "LABELS", None) or ("fixed", "copyable", "free")
    stream = StreamingTextDataset(source, split="validation", n_ctx=n_ctx, batch_size=batch_size, mode=data.mode,
                                  seed=seed, shuffle_buffer=data.shuffle_buffer, tokenize_batch=data.tokenize_batch,
                                  track_documents=True)
    return excess_loss(model, stream, source.batch_ground_truth, labels=labels, max_batches=eval_iters)


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
    from qtoy_core.run_files import load_run

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
