#!/usr/bin/env python
"""The cost of document masking (`--doc-mask`) against unmasked attention, side by side.

1. Kernels: forward + backward of causal quadratic attention (``impl`` plain and chunked, via
   ``qtoy_core.ops.quadratic.quadratic_attention``) and softmax SDPA (``is_causal`` against the
   block-diagonal causal boolean mask the softmax attention passes with documents), with and
   without ``doc_ids``, at a few T. Documents are packed rows of random lengths around
   ``--doc-length`` tokens (SimpleStories/TinyStories stories are ~150-250 tokens).
2. A training step (forward, backward, AdamW step) of a small model on packed rows with separators,
   ``doc_mask`` on against off (each row's documents derived from its separator tokens, as in
   training).

Masked and unmasked runs alternate (background load hits both alike); medians are reported with
the ratio masked / unmasked and the machine (benchmarks/machine.py).

    python benchmarks/doc_mask_cost.py            # ~2 minutes on 2 cores
    python benchmarks/doc_mask_cost.py --quick    # < 1 minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import machine  # benchmarks/machine.py

import torch
import torch.nn.functional as F

from qtoy_core import build_model, document_ids, same_document
from qtoy_core.ops.quadratic import quadratic_attention

SEP = 0


def packed_docs(batch: int, T: int, mean: int, seed: int = 0) -> torch.Tensor:
    """(batch, T) document ids of rows packed with documents of 0.5x..1.5x ``mean`` tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < T:
            n = int(torch.randint(mean // 2, mean + mean // 2 + 1, (1,), generator=g))
            ids += [doc] * n
            doc += 1
        rows.append(ids[:T])
    return torch.tensor(rows)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, runs interleaved (one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timed(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def kernel_rows(Ts, d_head: int, heads: int, batch: int, mean: int, repeats: int) -> list[dict]:
    rows = []
    for T in Ts:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, T, d_head, requires_grad=True) for _ in range(3))
        docs = packed_docs(batch, T, mean)
        g = torch.randn(batch, heads, T, d_head)

        def quad(impl, doc_ids):
            def run():
                z = quadratic_attention(q, k, v, scale=1 / d_head, impl=impl, doc_ids=doc_ids)
                z.backward(g)
            return run

        def sdpa(masked):
            def run():
                if masked:
                    causal = torch.ones(T, T, dtype=torch.bool).tril() & same_document(docs)
                    z = F.scaled_dot_product_attention(q, k, v, attn_mask=causal[:, None])
                else:
                    z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                z.backward(g)
            return run

        for name, off, on in (("quadratic plain", quad("plain", None), quad("plain", docs)),
                              ("quadratic chunked", quad("chunked", None), quad("chunked", docs)),
                              ("softmax SDPA", sdpa(False), sdpa(True))):
            t = alternate({"off": off, "on": on}, repeats)
            rows.append({"what": name, "T": T, "off_ms": 1e3 * t["off"], "on_ms": 1e3 * t["on"],
                         "ratio": t["on"] / t["off"]})
    return rows


def train_rows(attns, n_ctx: int, batch: int, mean: int, repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 512, (batch, n_ctx + 1), generator=g)
    docs = packed_docs(batch, n_ctx + 1, mean, seed=1)
    starts = torch.nn.functional.pad(docs[:, 1:] != docs[:, :-1], (0, 1))  # a separator ends each document
    tokens[starts] = SEP
    assert torch.equal(document_ids(tokens, SEP)[:, :-1], document_ids(tokens[:, :-1], SEP))
    for attn in attns:
        steps = {}
        for masked in (False, True):
            torch.manual_seed(0)
            model = build_model("transformer_2L", attn=attn, mlp="bilinear", vocab_size=512, d_model=128, n_head=4,
                                n_ctx=n_ctx, doc_mask=masked, doc_separator_id=SEP if masked else None)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

            def step(model=model, opt=opt):
                loss = model.loss(tokens)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            steps["on" if masked else "off"] = step
        t = alternate(steps, repeats)
        rows.append({"what": f"train step {attn}", "T": n_ctx, "off_ms": 1e3 * t["off"], "on_ms": 1e3 * t["on"],
                     "ratio": t["on"] / t["off"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T 256 and 1024, fewer repeats")
    p.add_argument("--doc-length", type=int, default=200, help="mean document length in tokens")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    Ts = (256, 1024) if args.quick else (256, 1024, 2048, 4096)
    kernels = kernel_rows(Ts, d_head=32, heads=4, batch=1, mean=args.doc_length, repeats=repeats)
    training = train_rows(("quadratic", "softmax"), n_ctx=256, batch=8, mean=args.doc_length, repeats=repeats)
    info = {**machine.describe(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "doc_length": args.doc_length}
    if args.json:
        print(json.dumps({"machine": info, "kernels": kernels, "training": training}, indent=2))
        return
    print(f"machine: {info['cpu']} ({info['cpus']} cpus, {info['cpu_capability']}, bf16 units: "
          f"{info['bf16_matmul_units']}), torch {info['torch']}, {info['threads']} threads; fp32, median of {repeats}")
    print(f"documents: {args.doc_length // 2}..{args.doc_length + args.doc_length // 2} tokens; kernels: batch 1, "
          f"4 heads, d_head 32, forward+backward; training: transformer_2L d_model 128, batch 8, n_ctx 256")
    print(f"{'':24} {'T':>6} {'unmasked ms':>12} {'doc-mask ms':>12} {'ratio':>7}")
    for r in kernels + training:
        print(f"{r['what']:24} {r['T']:>6} {r['off_ms']:>12.2f} {r['on_ms']:>12.2f} {r['ratio']:>7.2f}")


if __name__ == "__main__":
    main()
