#!/usr/bin/env python
"""Generation: time and memory per generated token vs prefix length, for no cache, a KV cache and the
recurrent state of quadratic attention.

Drives ``qtoy_core.generate.generate`` with ``cache_mode`` None / "kv" / "recurrent" on a RoPE model
(positions unbounded). Per-token time is the median duration of the model calls ``generate`` makes after reading the
prompt (each makes one token; timed by forward hooks), over all tokens of all repeats, runs of
the three modes alternating. Memory
is what the cache holds between tokens (bytes of the KV tensors or of the recurrent states); the
recurrent state is d_head(d_head+1)/2 x d_head per head whatever the prefix. Also checks that the
cached logits equal the full forward pass (max |difference| of the last position's logits).

    python benchmarks/generate_speed.py            # prefixes 64..4096 (~2-4 min on 2 cores)
    python benchmarks/generate_speed.py --quick    # < 1 minute
    python benchmarks/generate_speed.py --json     # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import machine  # benchmarks/machine.py: the CPU and its matmul instruction sets

import torch

MODES = {"none": None, "kv": "kv", "recurrent": "recurrent"}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def cache_bytes(cache) -> int:
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for value in layer.values():
            if isinstance(value, torch.Tensor):
                total += value.nbytes
            elif hasattr(value, "_st"):
                total += value._st.nbytes
    return total


def build(model_type: str, d_model: int, n_head: int):
    import qtoy_core

    torch.manual_seed(0)
    model = qtoy_core.build_model(model_type, d_model=d_model, n_head=n_head, n_ctx=256, positional="rope")
    with torch.no_grad():  # the residual writers start at zero: give them weights so every path matters
        for block in model.blocks:
            for proj in (block.attn.out_proj, getattr(getattr(block, "mlp", None), "out_proj", None)):
                if proj is not None:
                    proj.weight.normal_(0, 0.02)
    return model.eval()


def logits_check(model, prompt, mode) -> float:
    """max |last-position logits through the cache - full forward| after prefill + 3 cached tokens."""
    with torch.no_grad():
        full = model(prompt)[:, -1]
        cache = model.new_cache(mode)
        model(prompt[:, :-3], cache=cache)
        for i in range(3, 0, -1):
            out = model(prompt[:, -i:][:, :1], cache=cache)
        return float((out[:, -1] - full).abs().max())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer prefixes and tokens (< 1 minute)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (nothing else)")
    p.add_argument("--model-type", default="transformer_2L")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--prefixes", default=None, help="comma-separated prefix lengths")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    machine.add_malloc_option(p)
    args = p.parse_args(argv)
    malloc_kept = machine.apply_malloc(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)

    from qtoy_core.generate import generate
    from qtoy_core.ops.quadratic import feature_dim

    prefixes = [int(x) for x in args.prefixes.split(",")] if args.prefixes else \
        ([64, 512, 2048] if args.quick else [64, 256, 1024, 4096])
    n_new = args.new_tokens or (8 if args.quick else 16)
    repeats = args.repeats or (3 if args.quick else 5)
    model = build(args.model_type, args.d_model, args.n_head)
    cfg = model.config
    meta = {"machine": machine.describe(), "malloc": args.malloc, "malloc_kept_block_bytes": malloc_kept,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "model_type": cfg.model_type,
            "d_model": cfg.d_model, "n_head": cfg.n_head, "d_head": cfg.d_head, "vocab_size": cfg.vocab_size,
            "positional": cfg.positional.name, "new_tokens": n_new, "repeats": repeats, "batch": 1,
            "recurrent_state_floats_per_head": feature_dim(cfg.d_head) * cfg.d_head}
    g = torch.Generator().manual_seed(0)
    rows = []
    # time each model call generate() makes (the first one reads the prompt; each later one makes a token)
    calls: list[float] = []
    started: list[float] = []
    model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    model.register_forward_hook(lambda *_: calls.append(time.perf_counter() - started.pop()))
    for prefix in prefixes:
        prompt = torch.randint(0, cfg.vocab_size, (1, prefix), generator=g)
        # no cache at long prefixes is slow: fewer new tokens there (still per-token figures)
        counts = {name: (n_new if name != "none" or prefix <= 1024 else max(2, n_new // 4)) for name in MODES}
        times = {name: [] for name in MODES}
        for _ in range(repeats):
            for name, mode in MODES.items():
                calls.clear()
                generate(model, prompt, counts[name], temperature=0, cache_mode=mode)
                times[name] += calls[1:]  # every model call after the prompt's one makes one token
        row = {"prefix": prefix}
        for name, mode in MODES.items():
            cache = None
            if mode is not None:
                cache = model.new_cache(mode)
                with torch.no_grad():
                    model(prompt, cache=cache)
            row[name] = {"ms_per_token": round(1e3 * statistics.median(times[name]), 3),
                         "cache_bytes": cache_bytes(cache)}
            if mode is not None and prefix <= 4096:
                row[name]["max_abs_logit_diff_vs_full"] = logits_check(model, prompt, mode)
        row["speedup_recurrent_vs_none"] = round(row["none"]["ms_per_token"] / max(row["recurrent"]["ms_per_token"], 1e-9), 1)
        row["speedup_recurrent_vs_kv"] = round(row["kv"]["ms_per_token"] / max(row["recurrent"]["ms_per_token"], 1e-9), 2)
        rows.append(row)
        log(f"prefix {prefix}: " + ", ".join(f"{n} {row[n]['ms_per_token']} ms" for n in MODES))
    rec = [r["recurrent"]["ms_per_token"] for r in rows]
    summary = {
        "recurrent_ms_per_token_longest_over_shortest": round(rec[-1] / rec[0], 2),
        "recurrent_cache_bytes_constant": len({r["recurrent"]["cache_bytes"] for r in rows}) == 1,
        "kv_ms_per_token_longest_over_shortest": round(rows[-1]["kv"]["ms_per_token"] / rows[0]["kv"]["ms_per_token"], 2),
        "none_ms_per_token_longest_over_shortest": round(rows[-1]["none"]["ms_per_token"] / rows[0]["none"]["ms_per_token"], 2),
    }
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "summary": summary}))
        return
    print(f"generation per token ({cfg.model_type}, d_model {cfg.d_model}, {cfg.n_head} heads, d_head {cfg.d_head}, "
          f"RoPE, batch 1, greedy; median of {repeats}; load avg {meta['loadavg_start'][0]} -> {meta['loadavg_end'][0]})")
    print(f"machine: {machine.one_line(meta['machine'])}; malloc: {meta['malloc']}")
    print(f"{'prefix':>7} | {'none ms':>9} | {'kv ms':>7} {'kv MB':>7} | {'recur ms':>8} {'recur MB':>8} | "
          f"{'x vs none':>9} {'x vs kv':>7} | {'|dlogit| kv':>11} {'recurrent':>9}")
    for r in rows:
        print(f"{r['prefix']:>7} | {r['none']['ms_per_token']:>9.2f} | {r['kv']['ms_per_token']:>7.2f} "
              f"{r['kv']['cache_bytes'] / 1e6:>7.2f} | {r['recurrent']['ms_per_token']:>8.2f} "
              f"{r['recurrent']['cache_bytes'] / 1e6:>8.2f} | {r['speedup_recurrent_vs_none']:>9.1f} "
              f"{r['speedup_recurrent_vs_kv']:>7.2f} | {r['kv'].get('max_abs_logit_diff_vs_full', float('nan')):>11.1e} "
              f"{r['recurrent'].get('max_abs_logit_diff_vs_full', float('nan')):>9.1e}")
    print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
