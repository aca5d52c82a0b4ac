"""Tokens per second the data pipeline delivers: the streaming path (StreamingTextDataset), packed
and padded, for the synthetic generator and for a local JSONL file, compared with what training
consumes (~20-50k tokens/s on a 2-core CPU); and prepared shards (`qtoy data prepare`): the
`prepare` throughput per process (1 and 2 processes, same files checked), and the batches
`ShardBatches` delivers through the Trainer's own batch loop (`Trainer._batches`), random and
sequential order, at the CPU training shape and at a GPU-sized batch (target: >= 50M tokens/s; on a
CUDA machine the batches are pinned and copied to the GPU, `--device cuda`).

    python benchmarks/data_throughput.py            # full run (~2 min)
    python benchmarks/data_throughput.py --quick    # ~30 s
    python benchmarks/data_throughput.py --json     # one JSON object on stdout
    python benchmarks/data_throughput.py --shards-only [--device cuda]   # the prepared-shards part only

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
SHARDS_TARGET_TOKENS_PER_S = 50_000_000


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


def measure_shards(folder, *, order: str, n_ctx: int, batch_size: int, seconds: float, device: str) -> dict:
    """Tokens/s of prepared-shard batches as the training loop receives them (Trainer._batches)."""
    import types

    import torch

    from qtoy_core.data.shards import ShardBatches
    from qtoy_core.training.trainer import Trainer

    dev = torch.device(device)
    stream = ShardBatches(folder, split="train", n_ctx=n_ctx, batch_size=batch_size, order=order,
                          pin_memory=dev.type == "cuda")
    loop = Trainer._batches(types.SimpleNamespace(device=dev), stream)  # the Trainer's own batch loop
    for _ in range(3):
        next(loop)
    batches = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    end = start + seconds
    while True:
        for _ in range(16):
            tokens, _mask = next(loop)
        batches += 16
        if time.perf_counter() >= end:
            break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = batches * batch_size * n_ctx
    # tokens per second of this process's CPU time too: on a shared, loaded machine the wall-clock
    # figure counts the time other processes held the cores
    return {"order": order, "n_ctx": n_ctx, "batch_size": batch_size, "device": device, "batches": batches,
            "tokens_per_s": round(tokens / elapsed), "tokens_per_cpu_s": round(tokens / max(cpu, 1e-9)),
            "us_per_batch": round(elapsed / batches * 1e6, 1),
            "epoch": stream.epoch, "pinned": bool(dev.type == "cuda")}


def shards_section(*, quick: bool, n_ctx: int, batch_size: int, device: str) -> dict:
    """`prepare` with 1 and 2 processes (same files), then the delivery rates."""
    from qtoy_core.data import build_dataset
    from qtoy_core.data.shards import prepare_shards

    n_stories = 6_000 if quick else 40_000
    ds = build_dataset({"name": "synthetic", "n_stories": n_stories})
    ds.tokenizer()
    out: dict = {"n_stories": n_stories, "prepare": [], "deliver": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for procs in (1, 2):
            folder = os.path.join(tmp, f"p{procs}")
            start = time.perf_counter()
            manifest = prepare_shards(ds, folder, num_proc=procs)
            wall = time.perf_counter() - start
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            out["prepare"].append({"num_proc": procs, "tokens": tokens, "seconds": round(wall, 2),
                                   "tokens_per_s": round(tokens / wall),
                                   "tokens_per_s_per_process": round(tokens / wall / procs)})
            files[procs] = {p: open(os.path.join(r, p), "rb").read() for r, _, names in os.walk(folder)
                            for p in names if p.endswith(".bin")}
        out["same_files_1_vs_2_processes"] = files[1].keys() == files[2].keys() and all(
            files[1][k] == files[2][k] for k in files[1])
        folder = os.path.join(tmp, "p1")
        seconds = 1.0 if quick else 3.0
        shapes = [(n_ctx, batch_size), (1024, 64)]  # the CPU training shape; a GPU-sized batch
        for order in ("random", "sequential"):
            for T, B in shapes:
                out["deliver"].append(measure_shards(folder, order=order, n_ctx=T, batch_size=B,
                                                     seconds=seconds, device=device))
    out["min_tokens_per_s"] = min(r["tokens_per_s"] for r in out["deliver"])
    out["target_tokens_per_s"] = SHARDS_TARGET_TOKENS_PER_S
    out["target_met"] = out["min_tokens_per_s"] >= SHARDS_TARGET_TOKENS_PER_S
    return out


def print_shards(sh: dict) -> None:
    print(f"prepared shards (synthetic, {sh['n_stories']:,} stories; load avg {os.getloadavg()[0]:.1f})")
    for p in sh["prepare"]:
        print(f"  prepare, {p['num_proc']} process(es): {p['tokens_per_s']:>10,} tokens/s "
              f"({p['tokens_per_s_per_process']:,} per process; {p['tokens']:,} tokens in {p['seconds']} s)")
    print(f"  same files with 1 and 2 processes: {sh['same_files_1_vs_2_processes']}")
    for r in sh["deliver"]:
        print(f"  deliver {r['order']:>10} n_ctx {r['n_ctx']:>4} batch {r['batch_size']:>3} ({r['device']}"
              f"{', pinned' if r['pinned'] else ''}): {r['tokens_per_s']:>13,} tokens/s ({r['tokens_per_cpu_s']:,} per CPU s)  "
              f"{r['us_per_batch']:>8} us/batch")
    print(f"  slowest: {sh['min_tokens_per_s']:,} tokens/s against the {sh['target_tokens_per_s']:,} target: "
          f"{'met' if sh['target_met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and a smaller file")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--n-ctx", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shards-only", action="store_true", help="only the prepared-shards part")
    parser.add_argument("--device", default="cpu", help="where shard batches go (cuda: pinned, copied)")
    args = parser.parse_args(argv)
    if args.shards_only:
        sh = shards_section(quick=args.quick, n_ctx=args.n_ctx, batch_size=args.batch_size, device=args.device)
        sh["machine"] = machine.describe()
        if args.json:
            print(json.dumps({"shards": sh}))
        else:
            print(f"machine: {machine.one_line(sh['machine'])}")
            print_shards(sh)
        return

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
    results["shards"] = shards_section(quick=args.quick, n_ctx=args.n_ctx, batch_size=args.batch_size,
                                       device=args.device)

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
    print_shards(results["shards"])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
