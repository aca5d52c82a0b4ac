"""Tokens per second the data pipeline delivers (StreamingTextDataset), packed and padded, for the
synthetic generator and for a local JSONL file, compared with what training consumes (~20-50k
tokens/s on a 2-core CPU).

    python benchmarks/data_throughput.py            # full run (~1-2 min)
    python benchmarks/data_throughput.py --quick    # ~15 s
    python benchmarks/data_throughput.py --json     # one JSON object on stdout

The figure is steady-state: the first batches (filling the shuffle buffer, loading `datasets`) are
timed separately as `first_batch_s`. Delivered tokens are the predicted (real) tokens of the batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import machine  # benchmarks/machine.py: the CPU and its matmul instruction sets

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAINING_TOKENS_PER_S = (20_000, 50_000)


def measure(dataset, *, mode: str, n_ctx: int, batch_size: int, batches: int) -> dict:
    from qtoy_core.data import StreamingTextDataset

    stream = StreamingTextDataset(dataset, split="train", n_ctx=n_ctx, batch_size=batch_size, mode=mode)
    start = time.perf_counter()
    it = iter(stream)
    next(it)
    first = time.perf_counter() - start
    tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        tokens += next(it).n_targets
    elapsed = time.perf_counter() - start
    return {"mode": mode, "batches": batches, "tokens": tokens, "seconds": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed), "first_batch_s": round(first, 3),
            "epoch": stream.epoch}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and a smaller file")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--n-ctx", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    import torch

    from qtoy_core.data import build_dataset

    # enough batches to pass through many tokenize_batch chunks (padded rows are partly padding)
    batches = max(4, (300_000 if args.quick else 3_000_000) // (args.batch_size * args.n_ctx))
    n_file_docs = 4_000 if args.quick else 20_000
    results: dict = {"n_ctx": args.n_ctx, "batch_size": args.batch_size, "cpu_threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "machine": machine.describe(), "training_tokens_per_s": list(TRAINING_TOKENS_PER_S), "runs": []}

    synthetic = build_dataset("synthetic")
    start = time.perf_counter()
    tokenizer = synthetic.tokenizer()
    results["synthetic_tokenizer_load_s"] = round(time.perf_counter() - start, 3)
    for mode in ("packed", "padded"):
        results["runs"].append({"dataset": "synthetic", **measure(synthetic, mode=mode, n_ctx=args.n_ctx,
                                                                   batch_size=args.batch_size, batches=batches)})

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stories.jsonl")
        gen = synthetic.generator
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n_file_docs):
                f.write(json.dumps({"text": gen.text(i)}) + "\n")
        tok_path = os.path.join(tmp, "tokenizer.json")
        tokenizer.save(tok_path)
        results["file_mb"] = round(os.path.getsize(path) / 1e6, 1)
        results["file_documents"] = n_file_docs
        local = build_dataset({"name": "text", "data_files": [path], "tokenizer": tok_path})
        for mode in ("packed", "padded"):
            results["runs"].append({"dataset": "text (jsonl)", **measure(local, mode=mode, n_ctx=args.n_ctx,
                                                                          batch_size=args.batch_size,
                                                                          batches=batches)})
        # The one-off cost of a text dataset without a tokenizer: train + cache a 4096 BPE on the file.
        os.environ["QTOY_CACHE"] = os.path.join(tmp, "cache")
        start = time.perf_counter()
        build_dataset({"name": "text", "data_files": [path]}).tokenizer()
        results["text_tokenizer_training_s"] = round(time.perf_counter() - start, 2)

    for run in results["runs"]:
        run["ratio_to_training"] = [round(run["tokens_per_s"] / t, 1) for t in TRAINING_TOKENS_PER_S]
    results["min_ratio_to_training"] = min(r["ratio_to_training"][1] for r in results["runs"])

    if args.json:
        print(json.dumps(results))
        return
    print(f"data pipeline throughput (n_ctx={args.n_ctx}, batch_size={args.batch_size}, {results['cpus']} CPUs)")
    print(f"machine: {machine.one_line(results['machine'])}")
    for run in results["runs"]:
        print(f"  {run['dataset']:>13} {run['mode']:>6}: {run['tokens_per_s']:>10,} tokens/s   first batch "
              f"{run['first_batch_s']:.2f} s   x{run['ratio_to_training'][1]} of 50k tok/s training "
              f"(x{run['ratio_to_training'][0]} of 20k)")
    print(f"  synthetic tokenizer load: {results['synthetic_tokenizer_load_s']} s; training a 4096 BPE on the "
          f"{results['file_mb']} MB file: {results['text_tokenizer_training_s']} s (once, then cached)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
