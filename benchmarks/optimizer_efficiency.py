#!/usr/bin/env python
"""Sample efficiency: Muon vs AdamW on the built-in `synthetic` corpus.

Each optimizer is trained with qtoy's Trainer (the real training path: registry-built model and
optimizer, warmup + cosine schedule, clipping) for the same number of tokens, at each learning rate
of a small sweep (extended by x3 steps while the best is at an edge); its best learning rate is the
one with the lowest final validation loss (Muon's
inner AdamW, for embeddings and unembedding, uses the best AdamW learning rate). The
target loss is the final validation loss of the best AdamW run (so AdamW reaches it at its last
evaluation, by construction); the figure is the number of training tokens each optimizer needs to
first reach it (linear interpolation between evaluations), and their ratio AdamW / Muon (> 1:
Muon needs fewer tokens). The seed claims about 1.5x for Muon.

    python benchmarks/optimizer_efficiency.py            # ~3-6 min on 2 cores
    python benchmarks/optimizer_efficiency.py --quick    # ~1 minute: shorter runs, 2 learning rates each
    python benchmarks/optimizer_efficiency.py --json     # one JSON object on stdout
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

SWEEP = {"adam": [1e-3, 3e-3, 1e-2], "muon": [0.01, 0.02, 0.05]}
QUICK_SWEEP = {"adam": [3e-3, 1e-2], "muon": [0.02, 0.05]}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class Curve:
    """Collects (tokens, val_loss) at every evaluation."""

    def __init__(self):
        self.points: list[tuple[int, float]] = []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_eval_end(self, trainer, metrics):
        self.points.append((metrics["tokens"], metrics["val_loss"]))


def train(optimizer: str, lr: float, args, adamw_lr: float | None = None) -> dict:
    from qtoy_core.training.config import RunConfig
    from qtoy_core.training.trainer import Trainer

    doc = {
        "model": {"model_type": args.model_type, "d_model": args.d_model, "n_head": args.n_head, "n_ctx": args.n_ctx},
        "data": {"dataset": "synthetic"},
        "optimizer": {"name": optimizer, "lr": lr, **({"adamw_lr": adamw_lr} if adamw_lr is not None else {})},
        "train": {"batch_size": args.batch_size, "max_iters": args.steps, "warmup": max(1, args.steps // 20),
                  "eval_interval": args.eval_interval, "eval_iters": args.eval_iters, "precision": args.precision,
                  "compile": False, "seed": args.seed, "log_interval": 10**6,
                  "checkpoint_interval": args.steps},  # checkpoints would dominate the time of such short runs
    }
    curve = Curve()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(RunConfig.model_validate(doc), os.path.join(tmp, "run"), callbacks=[curve])
        summary = trainer.fit()
        seconds = time.perf_counter() - t0
    return {"optimizer": optimizer, "lr": lr, "adamw_lr": adamw_lr, "final_val_loss": round(curve.points[-1][1], 4),
            "curve": [(t, round(v, 4)) for t, v in curve.points], "seconds": round(seconds, 1),
            "tokens_per_s": round(summary["tokens_per_s"] or 0)}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    prev = (0, float("inf"))
    for tokens, loss in curve:
        if loss <= target:
            if prev[1] == float("inf"):
                return float(tokens)
            frac = (prev[1] - target) / (prev[1] - loss) if prev[1] != loss else 1.0
            return prev[0] + frac * (tokens - prev[0])
        prev = (tokens, loss)
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (nothing else)")
    p.add_argument("--model-type", default="transformer_1L")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-interval", type=int, default=None)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--precision", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-extend", type=int, default=3,
                   help="extra learning rates per optimizer when the best one is at an edge of the sweep")
    args = p.parse_args(argv)
    args.steps = args.steps or (150 if args.quick else 400)
    args.eval_interval = args.eval_interval or max(1, args.steps // 16)
    sweep = {o: list(v) for o, v in (QUICK_SWEEP if args.quick else SWEEP).items()}

    import torch

    meta = {"machine": machine.describe(), "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            **{k: getattr(args, k) for k in ("model_type", "d_model", "n_head", "n_ctx", "batch_size", "steps",
                                             "eval_interval", "eval_iters", "precision", "seed")},
            "tokens_per_run": args.steps * args.batch_size * args.n_ctx, "sweep": sweep}
    runs = []
    for optimizer, lrs in sweep.items():
        # Muon's embeddings and unembedding go to its inner AdamW: at the best AdamW learning rate
        adamw_lr = None
        if optimizer == "muon":
            adamw_lr = min((r for r in runs if r["optimizer"] == "adam"), key=lambda r: r["final_val_loss"])["lr"]
        tried: dict[float, dict] = {}
        todo = sorted(lrs)
        # A best learning rate at the edge of the sweep is no optimum: extend the sweep by x3 steps on
        # that side until the best is inside it (at most `--max-extend` extra runs per optimizer).
        extra = 0
        while todo:
            lr = todo.pop(0)
            run = train(optimizer, lr, args, adamw_lr)
            log(f"{optimizer} lr {lr:g}: final val loss {run['final_val_loss']} ({run['seconds']} s)")
            tried[lr] = run
            runs.append(run)
            if todo:
                continue
            ordered = sorted(tried)
            best_lr = min(ordered, key=lambda x: tried[x]["final_val_loss"])
            if extra >= args.max_extend or len(ordered) < 2:
                break
            if best_lr == ordered[-1]:
                todo.append(float(f"{best_lr * 3:.3g}"))
            elif best_lr == ordered[0]:
                todo.append(float(f"{best_lr / 3:.3g}"))
            extra += len(todo)
        sweep[optimizer] = sorted(tried)
    best = {o: min((r for r in runs if r["optimizer"] == o), key=lambda r: r["final_val_loss"]) for o in sweep}
    target = best["adam"]["final_val_loss"]
    need = {o: tokens_to_reach(best[o]["curve"], target) for o in sweep}
    ratio = None if need["muon"] is None or not need["adam"] else round(need["adam"] / need["muon"], 2)
    result = {"meta": {**meta, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
              "runs": runs, "best_lr": {o: best[o]["lr"] for o in sweep},
              "best_final_val_loss": {o: best[o]["final_val_loss"] for o in sweep}, "target_val_loss": target,
              "tokens_to_target": {o: None if v is None else round(v) for o, v in need.items()},
              "muon_sample_efficiency_ratio": ratio, "seed_claim": 1.5}
    if args.json:
        print(json.dumps(result))
        return
    print(f"Muon vs AdamW on synthetic ({args.model_type}, d_model {args.d_model}, n_ctx {args.n_ctx}, batch "
          f"{args.batch_size}, {args.steps} steps = {meta['tokens_per_run']:,} tokens per run, precision "
          f"{args.precision}; load avg {meta['loadavg_start'][0]} -> {result['meta']['loadavg_end'][0]})")
    print(f"machine: {machine.one_line(meta['machine'])}")
    print(f"  {'optimizer':<9}{'lr':>8}{'final val':>11}{'seconds':>9}")
    for r in runs:
        mark = " *" if r is best[r["optimizer"]] else ""
        print(f"  {r['optimizer']:<9}{r['lr']:>8g}{r['final_val_loss']:>11.4f}{r['seconds']:>9.1f}{mark}")
    print(f"  target val loss (best AdamW, final): {target:.4f}")
    for o in sweep:
        v = need[o]
        print(f"  {o:<5} best lr {best[o]['lr']:g}: tokens to target "
              + ("not reached" if v is None else f"{round(v):,}"))
    print(f"  sample efficiency AdamW tokens / Muon tokens: {ratio if ratio is not None else 'n/a'}x "
          f"(seed claim ~1.5x)")


if __name__ == "__main__":
    main()
