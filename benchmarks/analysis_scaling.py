#!/usr/bin/env python
"""Time and peak memory of the weight-based circuits at GPT-2 vocabulary size.

For one attention layer with random weights (vocab 50257, d_model 512, 8 heads by default) it
times, phase by phase: building the factored QK and OV circuits of every head (never the
vocab x vocab matrices), their top-k token pairs (QK by |form|, as quadratic attention squares it;
OV by value), the eigenvalue spectra and copying scores, and (not part of the target) the direct
path's top bigrams. Targets: under 10 s and under 2 GB in all.

Peak memory is the resident-set high-water mark of this process during each phase above what was
resident before it (the kernel's VmHWM, reset per phase through /proc/self/clear_refs; elsewhere
ru_maxrss, which cannot be reset and so only bounds the total). tracemalloc does not see torch.

Top-k search: up to ``--max-tokens`` rows and columns are searched exhaustively per head (those
with the largest factor norms); a result is still exact when a Cauchy-Schwarz bound certifies that
nothing outside could beat it (``certified`` per head). Random weights are the worst case: their
norms are nearly equal, so nothing is certified and an exhaustive search costs vocab^2 * d_head
multiply-adds per head (``--exhaustive-heads N`` times N heads of it, to show the cost).

Examples::

    python benchmarks/analysis_scaling.py                  # vocab 50257, d_model 512, 8 heads
    python benchmarks/analysis_scaling.py --quick          # vocab 8192, d_model 256, 4 heads
    python benchmarks/analysis_scaling.py --json > out.json
    python benchmarks/analysis_scaling.py --exhaustive-heads 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import machine  # benchmarks/machine.py: the CPU and its matmul instruction sets

import torch

from qtoy_core import build_model
from qtoy_core.analysis.circuits import (
    DEFAULT_MAX_TOKENS,
    direct_path_top,
    ov_circuit,
    qk_circuit,
    search_topk,
    spectrum,
)
from qtoy_core.analysis.weights import model_weights

TARGET_S = 10.0
TARGET_MB = 2048.0


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phase:
    """Wall time and resident-memory peak (MB above the resident size at the start) of a block."""

    def __init__(self, name: str, results: dict):
        self.name, self.results = name, results

    def __enter__(self):
        self.resettable = _reset_peak()
        self.rss0 = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.t0
        peak = (_status_kb("VmHWM") if self.resettable else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.results[self.name] = {"time_s": round(elapsed, 3),
                                   "peak_delta_mb": round(max(0.0, peak - self.rss0) / 1024, 1),
                                   "peak_rss_mb": round(peak / 1024, 1)}
        log(f"  {self.name:<22} {elapsed:7.2f} s   peak +{self.results[self.name]['peak_delta_mb']:.0f} MB")
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="rows/columns searched exhaustively per head (0: all, exhaustive)")
    p.add_argument("--exhaustive-heads", type=int, default=0,
                   help="also time a fully exhaustive top-k of this many QK heads (slow: vocab^2 * d_head each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="vocab 8192, d_model 256, 4 heads")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    machine.add_malloc_option(p)
    args = p.parse_args(argv)
    malloc_kept = machine.apply_malloc(args.malloc)
    if args.quick:
        args.vocab, args.d_model, args.n_head = 8192, 256, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    max_tokens = args.max_tokens or None

    torch.manual_seed(args.seed)
    model = build_model("attention_only_1L", vocab_size=args.vocab, d_model=args.d_model, n_head=args.n_head,
                        n_ctx=256, attn="quadratic", positional="rope")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)  # random weights everywhere (out_proj starts at zero otherwise)
    model.requires_grad_(False)
    log(f"machine: {machine.one_line()}")
    log(f"vocab {args.vocab}, d_model {args.d_model}, {args.n_head} heads, d_head {args.d_model // args.n_head}, "
        f"{torch.get_num_threads()} threads, max_tokens {max_tokens}")

    phases: dict[str, dict] = {}
    rss_start = _status_kb("VmRSS")
    with Phase("circuits (factors)", phases):
        w = model_weights(model)
        qk = qk_circuit(w, 0)
        ov = ov_circuit(w, 0)
    with Phase("qk top-k pairs", phases):
        qk_top = search_topk(qk, args.top_k, abs=True, max_tokens=max_tokens)
    with Phase("ov top-k pairs", phases):
        ov_top = search_topk(ov, args.top_k, max_tokens=max_tokens)
    with Phase("eigenvalues+copying", phases):
        ov_spec = spectrum(ov)
        qk_spec = spectrum(qk)
    with Phase("direct path top-k", phases):
        direct = direct_path_top(w, args.top_k, max_tokens=max_tokens)
    target_parts = ("circuits (factors)", "qk top-k pairs", "ov top-k pairs", "eigenvalues+copying")
    total_s = sum(phases[k]["time_s"] for k in target_parts)
    # the factors stay resident while the top-k phases run: the peak above the RSS before the
    # analysis is the highest absolute peak of any phase minus that starting RSS
    peak_mb = round(max(phases[k]["peak_rss_mb"] for k in target_parts) - (rss_start or 0) / 1024, 1)
    exhaustive = None
    if args.exhaustive_heads:
        with Phase("exhaustive qk top-k", phases):
            full = search_topk(qk[: args.exhaustive_heads], args.top_k, abs=True, max_tokens=None)
        per_head = phases["exhaustive qk top-k"]["time_s"] / args.exhaustive_heads
        # how many of the true top-k pairs the restricted search found (random weights: the worst case)
        recall = [len({(int(r), int(c)) for r, c in zip(f.rows, f.cols)}
                      & {(int(r), int(c)) for r, c in zip(g.rows, g.cols)}) / args.top_k
                  for f, g in zip(full, qk_top)]
        exhaustive = {"heads": args.exhaustive_heads, "per_head_s": round(per_head, 2),
                      "all_qk_and_ov_heads_estimate_s": round(per_head * 2 * args.n_head, 1),
                      "restricted_search_recall": recall}

    result = {
        "config": {"vocab": args.vocab, "d_model": args.d_model, "n_head": args.n_head,
                   "d_head": args.d_model // args.n_head, "top_k": args.top_k, "max_tokens": max_tokens,
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": machine.describe(),
                   "cpus": os.cpu_count(), "malloc": args.malloc, "malloc_kept_block_bytes": malloc_kept, "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "phases": phases,
        "total_s": round(total_s, 2),
        "peak_delta_mb": peak_mb,
        "rss_before_mb": round((rss_start or 0) / 1024, 1),
        "targets": {"time_s": TARGET_S, "peak_mb": TARGET_MB},
        "meets_targets": total_s < TARGET_S and peak_mb < TARGET_MB,
        "certified_exact": {"qk": [f.exact for f in qk_top], "ov": [f.exact for f in ov_top], "direct": direct.exact},
        "copying_scores": [round(s.copying_score, 4) for s in ov_spec],
        "qk_same_token_scores": [round(s.copying_score, 4) for s in qk_spec],
        "top_qk_pair_head0": [int(qk_top[0].rows[0]), int(qk_top[0].cols[0]), float(qk_top[0].values[0])],
        "exhaustive": exhaustive,
    }
    log(f"total {total_s:.2f} s (target {TARGET_S:.0f} s), peak +{peak_mb:.0f} MB (target {TARGET_MB:.0f} MB): "
        f"{'meets' if result['meets_targets'] else 'misses'} the targets")
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
