#!/usr/bin/env python
"""Scaling of causal quadratic attention: plain (materialised T x T pattern) vs chunked (linear time).

Times forward + backward of ``qtoy_core.ops.quadratic.quadratic_attention`` with ``impl="plain"``
and ``impl="chunked"`` for a range of sequence lengths, head sizes and dtypes. Runs of the two
implementations alternate (so background load hits both alike) and the median is reported, with the
ratio plain/chunked and, per (dtype, d_head) setting, the crossover length from which chunked wins.
``--impl`` picks the implementations: also ``fused`` (the Triton kernel, CUDA; on CPU only under
TRITON_INTERPRET=1, for checking the plumbing) and ``sdpa`` (softmax attention, torch's
``scaled_dot_product_attention(is_causal=True)`` on the same q, k, v), with each one's speed against
SDPA. ``--device cuda`` runs everything on the GPU (timed with synchronisation).

Also reports the forward accuracy of each implementation against a float64 reference (the chunked
form in float64, which the tests show equals the plain one to 1e-10 relative), which matters for bf16.

Examples::

    python benchmarks/attention_scaling.py                 # full table (a few minutes on 2 cores)
    python benchmarks/attention_scaling.py --quick         # < 1 minute
    python benchmarks/attention_scaling.py --json > out.json
    python benchmarks/attention_scaling.py --compare-carry # matmul vs cumsum vs loop state carry
    python benchmarks/attention_scaling.py --bilinear      # the bilinear form (D^2 features)
    python benchmarks/attention_scaling.py --blocks        # plain form: query rows per block, vs SDPA
    python benchmarks/attention_scaling.py --device cuda --impl plain chunked fused sdpa --d 64 --dtypes bf16 \
        --T 256 512 1024 2048 4096 8192 16384 --no-accuracy   # the GPU check's sweep

On a machine whose cores are shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE`` (or
``--threads 1 --timer cpu``): the chunked form runs many more (smaller) kernels than the plain one, and
with OpenMP's default spin-waiting every parallel region stalls while one of its threads is
descheduled. Measured at load average ~4-7 on the 2 cores, T = 4096 fp32: chunked 1.46 s -> 0.36 s
(d_head 32) and 8.6 s -> 1.5 s (d_head 64) with PASSIVE, plain unchanged (3.4-4.9 s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import machine  # benchmarks/machine.py: the CPU and its matmul instruction sets

import torch

from qtoy_core.ops import quadratic as qa

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: what --impl can name: quadratic_attention's forms, the state-carry variants, the textbook plain form,
#: and softmax SDPA
IMPL_CHOICES = ("plain", "chunked", "fused", "sdpa", "chunked-cumsum", "chunked-loop", "plain-autograd")
# where the inputs live and the kernels run (--device), set once in main()
DEVICE = torch.device("cpu")


def sync() -> None:
    """Wait for queued GPU work (a no-op on CPU), so that the timers measure it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
# (T, T)-sized memory of the plain form's forward+backward, in units of one full (T, T) tensor, used to
# decide when plain is skipped for memory: the blocked kernel keeps the scores and the pattern of
# the lower triangle (~2 x T^2 / 2; 3 x with the bilinear second scores, counted by the x2 below);
# the textbook autograd form keeps the full square ~6 times.
PLAIN_TT_TENSORS = {"plain": 1.5, "plain-autograd": 6}


def mem_available_gb() -> float | None:
    if DEVICE.type == "cuda":
        return torch.cuda.mem_get_info(DEVICE)[0] / 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def make_inputs(batch, heads, t, d, dtype, bf16_mode, bilinear, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = torch.float32 if (dtype == torch.bfloat16 and bf16_mode == "autocast") else dtype
    n = 5 if bilinear else 3
    xs = [torch.randn(batch, heads, t, d, generator=g).to(DEVICE, store).requires_grad_() for _ in range(n)]
    return xs


def attend(impl, q, k, v, scale, q2, k2, chunk_size):
    if impl == "sdpa":  # softmax attention on the same q, k, v (its own 1/sqrt(d) scale)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if impl == "plain-autograd":  # the plain form as autograd ops over the full square
        return qa.quadratic_attention(q, k, v, scale=scale, q2=q2, k2=k2, impl="autograd")
    if impl.startswith("chunked-"):  # state-carry variants of the chunked form
        carry = impl.split("-", 1)[1]
        return qa._chunked(q, k, v, scale, q2, k2, chunk_size or qa.DEFAULT_CHUNK_SIZE, carry=carry)[0]
    return qa.quadratic_attention(q, k, v, scale=scale, q2=q2, k2=k2, impl=impl, chunk_size=chunk_size)


TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


def run_once(impl, xs, scale, dtype, bf16_mode, chunk_size, timer=time.perf_counter) -> float:
    for x in xs:
        x.grad = None
    q, k, v = xs[:3]
    q2, k2 = (xs[3], xs[4]) if len(xs) == 5 else (None, None)
    autocast = dtype == torch.bfloat16 and bf16_mode == "autocast"
    sync()
    t0 = timer()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        z = attend(impl, q, k, v, scale, q2, k2, chunk_size)
    z.float().sum().backward()
    sync()
    return timer() - t0


def rel_err(z, ref) -> float:
    return ((z.double() - ref).norm() / ref.norm()).item()


def accuracy(xs, scale, dtype, bf16_mode, chunk_size, impls, max_plain_t):
    """Forward relative error (Frobenius) of each implementation vs the float64 chunked result."""
    with torch.no_grad():
        x64 = [x.detach().double() for x in xs]
        q, k, v = x64[:3]
        q2, k2 = (x64[3], x64[4]) if len(x64) == 5 else (None, None)
        ref = qa.quadratic_attention(q, k, v, scale=scale, q2=q2, k2=k2, impl="chunked")
        out = {}
        autocast = dtype == torch.bfloat16 and bf16_mode == "autocast"
        xd = [x.detach() for x in xs]
        q, k, v = xd[:3]
        q2, k2 = (xd[3], xd[4]) if len(xd) == 5 else (None, None)
        for impl in impls:
            if impl == "sdpa" or (impl in PLAIN_TT_TENSORS and q.shape[-2] > max_plain_t):
                continue  # (softmax is another function: no accuracy against the quadratic reference)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
                z = attend(impl, q, k, v, scale, q2, k2, chunk_size)
            out[impl] = rel_err(z, ref)
        return out


BLOCK_CHOICES = (32, 64, 128, 256)


def block_sweep(args, timer) -> dict:
    """The plain form's forward+backward with each number of query rows per block (``BLOCK_ROWS``;
    "T" = a single block, the full square), next to softmax SDPA (causal) on the same q, k, v. The
    batch keeps batch * T = 4096 tokens (the training shape's 16 x 256) unless --batch is given."""
    import torch.nn.functional as F

    rows_out = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for d in args.d:
            for t in args.T:
                batch = args.batch_given or max(1, 4096 // t)
                xs = make_inputs(batch, args.heads, t, d, dtype, "tensors", False)
                grad = torch.randn(batch, args.heads, t, d).to(dtype)
                variants = {f"rows {r}": r for r in BLOCK_CHOICES if r < t}
                variants["rows T"] = t
                variants["sdpa"] = None
                original = qa.BLOCK_ROWS[dtype]

                def run(rows):
                    for x in xs:
                        x.grad = None
                    t0 = timer()
                    if rows is None:
                        z = F.scaled_dot_product_attention(*xs, is_causal=True)
                    else:
                        qa.BLOCK_ROWS[dtype] = rows
                        z = qa.quadratic_attention(*xs, scale=1.0 / d, impl="plain")
                    z.backward(grad)
                    return timer() - t0

                times = {name: [] for name in variants}
                try:
                    for name, rows in variants.items():
                        run(rows)  # warm-up
                    for r in range(args.repeats):
                        for name, rows in (variants.items() if r % 2 == 0 else list(variants.items())[::-1]):
                            times[name].append(run(rows))
                finally:
                    qa.BLOCK_ROWS[dtype] = original
                med = {name: statistics.median(v) for name, v in times.items()}
                quad = {n: v for n, v in med.items() if n != "sdpa"}
                best = min(quad, key=quad.get)
                row = {"dtype": dname, "d_head": d, "T": t, "batch": batch, "seconds": med, "best": best,
                       "default_rows": original, "sdpa_over_best_quadratic": med["sdpa"] / quad[best],
                       "unblocked_over_best": quad["rows T"] / quad[best]}
                rows_out.append(row)
                log(f"{dname} d={d} T={t} batch={batch}: " + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in med.items()))
    return {"rows": rows_out}


def print_block_table(result, meta) -> None:
    print(f"plain quadratic attention by query rows per block vs softmax SDPA (causal), forward+backward, "
          f"{meta['heads']} heads, {meta['threads']} threads, median {meta['timer']} time of {meta['repeats']}, "
          f"load avg {meta['loadavg_1min_before_after'][0]:.1f}->{meta['loadavg_1min_before_after'][1]:.1f}")
    print(f"machine: {machine.one_line(meta['machine'])}; malloc: {meta['malloc']}")
    for r in result["rows"]:
        cells = "  ".join(f"{n} {v * 1e3:7.1f}" for n, v in r["seconds"].items())
        print(f"  {r['dtype']} d_head {r['d_head']:3d} T {r['T']:5d} batch {r['batch']:3d} (ms): {cells}  | best "
              f"{r['best']} (default {r['default_rows']}), unblocked/best {r['unblocked_over_best']:.2f}x, "
              f"sdpa/best quadratic {r['sdpa_over_best_quadratic']:.2f}x")


def crossover(rows):
    """Smallest T from which chunked is at least as fast as plain for every larger measured T (None
    if never), and a log-interpolated estimate of where the ratio crosses 1."""
    pts = [(r["T"], r["ratio"]) for r in rows if r.get("ratio") is not None]
    if not pts:
        return None, None
    first = None
    for i, (t, _) in enumerate(pts):
        if all(rr >= 1.0 for _, rr in pts[i:]):
            first = t
            break
    if first is None:
        return None, None
    i = [t for t, _ in pts].index(first)
    if i == 0:  # chunked already wins at the smallest measured T
        return first, None
    (t0, r0), (t1, r1) = pts[i - 1], pts[i]
    a, b, la, lb = math.log(t0), math.log(t1), math.log(r0), math.log(r1)
    est = math.exp(a + (b - a) * (0.0 - la) / (lb - la)) if lb != la else float(t1)
    return first, est


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192], help="sequence lengths")
    p.add_argument("--d", type=int, nargs="+", default=[32, 64], help="head sizes")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--bf16-mode", choices=["tensors", "autocast"], default="tensors",
                   help="bf16 as bf16 tensors, or fp32 tensors under torch.autocast(bf16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (median)")
    p.add_argument("--chunk-size", type=int, default=None, help=f"default {qa.DEFAULT_CHUNK_SIZE}")
    p.add_argument("--bilinear", action="store_true", help="time the bilinear form (q2, k2; D^2 features)")
    p.add_argument("--compare-carry", action="store_true",
                   help="also time the other ways of carrying the state across chunks: cumulative sum over "
                        "the chunk states (chunked-cumsum) and a python loop over chunks (chunked-loop); "
                        "the default (chunked) is an exclusive prefix sum by a triangular matmul")
    p.add_argument("--max-plain-gb", type=float, default=8.0,
                   help="skip plain when its (T, T) temporaries would need more memory than this "
                        "(or than 60%% of the memory available at the time)")
    p.add_argument("--max-plain-s", type=float, default=20.0,
                   help="skip plain at larger T once one run took longer than this")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--timer", choices=sorted(TIMERS), default=None,
                   help="wall: wall-clock (default); cpu: process CPU time, which ignores time spent "
                        "descheduled: use it with --threads 1 when other jobs share the cores (--quick "
                        "switches to both by itself when the load average exceeds the cpu count)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the float64 accuracy check")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the inputs and kernels live")
    p.add_argument("--impl", nargs="+", choices=IMPL_CHOICES, default=None,
                   help="implementations to time (default: plain chunked, plus what --compare-carry / --textbook "
                        "add); fused needs CUDA (or TRITON_INTERPRET=1 on CPU, slow), sdpa is softmax attention")
    p.add_argument("--quick", action="store_true", help="small sweep that finishes in under a minute")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (nothing else)")
    p.add_argument("--textbook", action="store_true",
                   help="also time the plain form written as autograd ops over the full square (plain-autograd), "
                        "the baseline qtoy's blocked kernel replaced")
    p.add_argument("--blocks", action="store_true",
                   help="instead: the plain form with each number of query rows per block, and softmax SDPA "
                        "(default T 256 512 1024, batch * T = 4096)")
    machine.add_malloc_option(p)
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    if args.blocks and DEVICE.type == "cuda":
        raise SystemExit("--blocks measures the CPU blocked kernel's rows per block: run it without --device cuda")
    malloc_kept = machine.apply_malloc(args.malloc)
    args.batch_given = args.batch if "--batch" in (argv if argv is not None else sys.argv) else None
    if args.blocks and "--T" not in (argv if argv is not None else sys.argv):
        args.T = [256, 512, 1024]

    if args.quick:
        args.T = [t for t in args.T if t <= 2048] or [256, 512, 1024, 2048]
        args.repeats = min(args.repeats, 3)
        args.no_accuracy = True
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load > (os.cpu_count() or 1) and args.threads is None and args.timer is None:
            # many small kernels + OpenMP barriers + cores taken by other jobs = minutes of stalls;
            # one thread and CPU time keep the quick run short and its ratios meaningful
            log(f"load average {load:.1f} > {os.cpu_count()} cpus: --quick runs with --threads 1 --timer cpu")
            args.threads, args.timer = 1, "cpu"
    args.timer = args.timer or "wall"
    if args.threads:
        torch.set_num_threads(args.threads)

    timer = TIMERS[args.timer]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    impls = args.impl or (["plain", "chunked"] + (["chunked-cumsum", "chunked-loop"] if args.compare_carry else [])
                          + (["plain-autograd"] if args.textbook else []))
    impls = list(dict.fromkeys(impls))
    skipped_impls = {}
    if "fused" in impls:
        from qtoy_core.ops import fused_quadratic

        if not fused_quadratic.fused_available():
            skipped_impls["fused"] = "Triton is not installed"
        elif DEVICE.type != "cuda" and not fused_quadratic._interpreted():
            skipped_impls["fused"] = "CPU without TRITON_INTERPRET=1"
    if "sdpa" in impls and args.bilinear:
        skipped_impls["sdpa"] = "--bilinear (softmax attention has one q/k pair; the sdpa column would time it anyway)"
        impls.remove("sdpa")
    interpreted_note = None
    if "fused" in impls and DEVICE.type != "cuda":
        interpreted_note = "fused ran under Triton's interpreter (CPU): its times say nothing about the kernel's speed"
        log(interpreted_note)
    for name, why in skipped_impls.items():
        log(f"{name} skipped: {why}")
        if name in impls:
            impls.remove(name)
    results = []
    started = time.perf_counter()
    if args.blocks:
        result = block_sweep(args, timer)
        meta = {"machine": machine.describe(), "malloc": args.malloc, "malloc_kept_block_bytes": malloc_kept,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "heads": args.heads,
                "repeats": args.repeats, "timer": args.timer, "cpu_count": os.cpu_count(),
                "loadavg_1min_before_after": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
                "BLOCK_ROWS": {str(k).removeprefix("torch."): v for k, v in qa.BLOCK_ROWS.items()},
                "total_s": time.perf_counter() - started}
        if args.json:
            print(json.dumps({"meta": meta, **result}))
        else:
            print_block_table(result, meta)
        return 0
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for d in args.d:
            scale = 1.0 / d
            rows = []
            plain_too_slow: set[str] = set()
            for t in args.T:
                xs = make_inputs(args.batch, args.heads, t, d, dtype, args.bf16_mode, args.bilinear)
                elem = 2 if dtype == torch.bfloat16 else 4
                run_impls = list(impls)
                skipped = None
                avail = mem_available_gb()
                budget = args.max_plain_gb if avail is None else min(args.max_plain_gb, 0.6 * avail)
                for plain in [i for i in impls if i in PLAIN_TT_TENSORS]:
                    plain_gb = (PLAIN_TT_TENSORS[plain] * args.batch * args.heads * t * t * elem
                                * (2 if args.bilinear else 1) / 1e9)
                    reason = None
                    if plain_gb > budget:
                        reason = f"memory ~{plain_gb:.1f} GB > {budget:.1f} GB"
                    elif plain in plain_too_slow:
                        reason = f"time: a run at smaller T took > {args.max_plain_s} s"
                    if reason:
                        run_impls.remove(plain)
                        if plain == "plain":
                            skipped = reason
                times = {i: [] for i in run_impls}
                for i in run_impls:  # warm-up (allocations, lazy init)
                    run_once(i, xs, scale, dtype, args.bf16_mode, args.chunk_size, timer)
                for r in range(args.repeats):
                    order = run_impls if r % 2 == 0 else run_impls[::-1]
                    for i in order:
                        times[i].append(run_once(i, xs, scale, dtype, args.bf16_mode, args.chunk_size, timer))
                row = {"dtype": dname, "d_head": d, "T": t}
                for i in impls:
                    row[f"{i}_s"] = statistics.median(times[i]) if times.get(i) else None
                row["plain_skipped"] = skipped
                row["ratio"] = (row["plain_s"] / row["chunked_s"]) if row.get("plain_s") and row.get("chunked_s") else None
                if row.get("sdpa_s"):  # > 1: faster than softmax SDPA
                    row["sdpa_over"] = {i: row["sdpa_s"] / row[f"{i}_s"] for i in impls
                                        if i != "sdpa" and row.get(f"{i}_s")}
                if not args.no_accuracy:
                    row["rel_err"] = accuracy(xs, scale, dtype, args.bf16_mode, args.chunk_size, impls,
                                              max_plain_t=t if not skipped else 0)
                for plain in PLAIN_TT_TENSORS:
                    if row.get(f"{plain}_s") and row[f"{plain}_s"] > args.max_plain_s:
                        plain_too_slow.add(plain)
                if row.get("plain-autograd_s") and row.get("chunked_s"):
                    row["ratio_vs_textbook"] = row["plain-autograd_s"] / row["chunked_s"]
                rows.append(row)
                log(f"[{time.perf_counter() - started:6.1f}s] {dname} d={d} T={t}: "
                    + ", ".join(f"{i}={row[f'{i}_s']:.5f}s" for i in impls if row[f"{i}_s"] is not None)
                    + (f", ratio={row['ratio']:.2f}" if row["ratio"] else "")
                    + (f" (plain skipped: {skipped})" if skipped else ""))
                del xs
            first, est = crossover(rows)
            results.append({"dtype": dname, "d_head": d, "rows": rows, "crossover_T": first, "crossover_T_interp": est})

    meta = {
        "machine": machine.describe(),
        "device": str(DEVICE),
        "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
        "impls": impls,
        "skipped_impls": skipped_impls,
        "note": interpreted_note,
        "malloc": args.malloc,
        "malloc_kept_block_bytes": malloc_kept,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "heads": args.heads,
        "repeats": args.repeats,
        "chunk_size": args.chunk_size or qa.DEFAULT_CHUNK_SIZE,
        "bf16_mode": args.bf16_mode,
        "bilinear": args.bilinear,
        "measure": f"median {'wall-clock' if args.timer == 'wall' else 'process CPU'} seconds of forward + backward",
        "timer": args.timer,
        "cpu_count": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "CHUNKED_FROM_T": qa.CHUNKED_FROM_T,
        "total_s": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps({"meta": meta, "settings": results}))
        return 0
    print_table(results, meta, impls)
    return 0


def _fmt_s(x):
    return "-" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def print_table(results, meta, impls) -> None:
    both = "plain" in impls and "chunked" in impls
    header = ["dtype", "d_head", "T", *impls] + (["plain/chunked"] if both else [])
    if "plain-autograd" in impls and "chunked" in impls:
        header += ["plain-autograd/chunked"]
    vs_sdpa = [i for i in impls if i != "sdpa"] if "sdpa" in impls else []
    header += [f"sdpa/{i}" for i in vs_sdpa]
    have_err = any("rel_err" in r for s in results for r in s["rows"])
    err_impls = [i for i in impls if i != "sdpa"]
    if have_err:
        header += [f"err {i}" for i in err_impls]
    header += ["note"]
    body = []
    for s in results:
        for r in s["rows"]:
            line = [r["dtype"], str(r["d_head"]), str(r["T"])] + [_fmt_s(r.get(f"{i}_s")) for i in impls]
            if both:
                line += ["-" if r["ratio"] is None else f"{r['ratio']:.2f}x"]
            if "plain-autograd" in impls and "chunked" in impls:
                line += ["-" if r.get("ratio_vs_textbook") is None else f"{r['ratio_vs_textbook']:.2f}x"]
            over = r.get("sdpa_over", {})
            line += [f"{over[i]:.2f}x" if i in over else "-" for i in vs_sdpa]
            if have_err:
                e = r.get("rel_err", {})
                line += [f"{e[i]:.1e}" if i in e else "-" for i in err_impls]
            line += [f"plain skipped ({r['plain_skipped']})" if r["plain_skipped"] else ""]
            body.append(line)
    cross = [f"{s['dtype']} d_head={s['d_head']}: chunked faster from T={s['crossover_T']}"
             + (f" (interpolated ~{s['crossover_T_interp']:.0f})" if s["crossover_T_interp"] else "")
             for s in results] if both else []
    notes = [f"{name} not timed: {why}" for name, why in meta.get("skipped_impls", {}).items()]
    notes += [meta["note"]] if meta.get("note") else []
    if vs_sdpa:
        notes.append("sdpa/X > 1: X is faster than softmax SDPA (causal) on the same q, k, v")
    where = f"device {meta['gpu']}" if meta.get("gpu") else f"{meta['threads']} threads"
    title = (f"causal quadratic attention, forward+backward, batch {meta['batch']}, {meta['heads']} heads, "
             f"chunk {meta['chunk_size']}, {where}, median {meta['timer']} time of {meta['repeats']}, "
             f"load avg {meta['loadavg_1min_before_after'][0]:.1f}->{meta['loadavg_1min_before_after'][1]:.1f} "
             f"on {meta['cpu_count']} cpus"
             + (f", OMP_WAIT_POLICY={meta['OMP_WAIT_POLICY']}" if meta["OMP_WAIT_POLICY"] else "")
             + (", bilinear" if meta["bilinear"] else ""))
    machine_line = (f"machine: {machine.one_line(meta['machine'])}; malloc: {meta['malloc']}"
                    + (f"; GPU: {meta['gpu']}" if meta.get("gpu") else ""))
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="left" if h in ("dtype", "note") else "right")
        for line in body:
            table.add_row(*line)
        console = Console(width=None if sys.stdout.isatty() else 220)  # (piped: no 80-column wrap)
        console.print(table)
        console.print(machine_line)
        for c in cross + notes:
            console.print(c)
    except ImportError:  # plain-text fallback
        print(title)
        print(machine_line)
        widths = [max(len(h), *(len(l[i]) for l in body)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        for line in body:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        for c in cross + notes:
            print(c)


if __name__ == "__main__":
    raise SystemExit(main())
