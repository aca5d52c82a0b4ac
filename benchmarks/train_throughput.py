#!/usr/bin/env python
"""Training throughput: qtoy's real training step against a hand-written reference of the same model.

For each model type (attention_only_1L/2L, transformer_1L/2L: quadratic attention, RoPE, no norm,
bilinear MLP, tied embeddings) this times, in tokens/s:

* ``qtoy``:         the Trainer's own step (``Trainer._train_step`` after ``setup()``, a registry-built
                    model and optimizer, an in-memory token stream), precision fp32 / bf16 and
                    compiled through the Trainer's own compile switch (``train.compile=True``);
* ``ref``:          a minimal hand-written PyTorch model of the identical network (nn.Linear, einsum-free
                    quadratic attention, the same init, the same AdamW and clipping), written below;
* ``sdpa``:         the same hand-written model with nanoGPT-style softmax attention
                    (``F.scaled_dot_product_attention(is_causal=True)``) instead of the quadratic one;
* ``qtoy_softmax``: qtoy's step with ``--attn softmax`` (full mode only).

Runs of all variants alternate (background load hits them alike); the median of the repeats is
reported, with ratios and the model FLOP utilisation (MFU) against the fp32 and bf16 matmul peaks
this script measures first. ``default`` is what ``qtoy train`` does by itself for a default-length run
(600 steps): precision auto (bf16 on CPUs with AVX512-BF16 or AMX) and torch.compile when `should_compile` says it pays.
Where bf16 matmuls are only emulated (AVX2-only CPUs: ~1 GFLOP/s against ~100 for fp32) the bf16
variants are skipped (``--bf16 on`` forces them) and the compiled variants run in fp32, the
precision ``auto`` picks there.

    python benchmarks/train_throughput.py             # full (~10 min on 2 cores, compiles included)
    python benchmarks/train_throughput.py --quick     # < 1 minute: 2 model types, eager only
    python benchmarks/train_throughput.py --bf16 on   # bf16 variants even where bf16 is emulated (slow)
    python benchmarks/train_throughput.py --json      # one JSON object on stdout (ratios included)
    python benchmarks/train_throughput.py --malloc system  # glibc's malloc defaults, as a plain script
    python benchmarks/train_throughput.py --device cuda --models transformer_2L --shapes large \
        --shape n_ctx=1024 --sweep batch=32,64,128 --impls qtoy,sdpa --modes bf16,bf16+compile
                                                         # the GPU check: MFU per batch size

On CUDA, MFU is also given against the card's datasheet dense bf16 peak, looked up by device name
(``CARD_BF16_TFLOPS``; the line ``bf16 peak used`` says which entry matched, or that none did and
the measured matmul peak stands in).

Host memory: by default the whole run keeps freed memory for reuse, as the ``qtoy`` command does
(qtoy_core.host_memory), so the reference gets it too and the comparison is of the steps alone.
With ``--malloc system`` every eager step faults in fresh pages for its large tensors, as in a plain
script; the ``faults/step`` column counts them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time

import machine  # benchmarks/machine.py: the CPU and its matmul instruction sets

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPES = ("attention_only_1L", "attention_only_2L", "transformer_1L", "transformer_2L")
SHAPES = {
    # the shape of the hand-written measurements
    "base": dict(vocab_size=4096, d_model=256, n_head=4, n_ctx=256, batch=16),
    "large": dict(vocab_size=4096, d_model=512, n_head=8, n_ctx=512, batch=8),
}
DEFAULT_RUN_STEPS = 600  # TrainConfig's default max_iters: what `qtoy train` decides compilation for
MODES = ("fp32", "bf16", "bf16+compile", "fp32+compile")

#: datasheet dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in this order against
#: torch.cuda.get_device_name() (first substring that occurs): the SXM parts' figures unless named
CARD_BF16_TFLOPS = (
    ("B200", 2250.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def card_bf16_peak(device_name: str | None) -> tuple[str, float] | None:
    """(matched entry, dense bf16 GFLOP/s) for a GPU name, None when the table has no entry for it."""
    if not device_name:
        return None
    for key, tflops in CARD_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return key, tflops * 1000.0
    return None


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# matmul peak
# ---------------------------------------------------------------------------------------------


# where every variant runs: "cpu" (default) or "cuda" (--device), set once in main()
DEVICE = torch.device("cpu")


def sync() -> None:
    """Wait for queued GPU work (a no-op on CPU) so that wall-clock times measure it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...], seconds: float) -> float:
    """Best GFLOP/s of (n, n) x (n, n) products (``a @ b`` and ``F.linear``, which may take other
    kernels) over ~`seconds` per size: the best single call counts (background load only slows calls)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=DEVICE).to(dtype)
        b = torch.randn(n, n, device=DEVICE).to(dtype)
        for _ in range(3):
            a @ b
            F.linear(a, b)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for f in (torch.matmul, F.linear):
                sync()
                t0 = time.perf_counter()
                f(a, b)
                sync()
                best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def measure_peaks(quick: bool, bf16_emulated: bool = False) -> dict:
    """fp32 and bf16 matmul peaks. Where bf16 is emulated (~1 GFLOP/s) one (2048, 2048) product would
    take ~17 s, so its peak is taken at n = 256 only (enough to show the gap; marked in the output)."""
    sizes = (1024, 2048) if quick else (1024, 2048, 4096)
    seconds = 0.5 if quick else 1.5
    return {"fp32": round(matmul_peak(torch.float32, sizes, seconds), 1),
            "bf16": round(matmul_peak(torch.bfloat16, (256,) if bf16_emulated else sizes,
                                      0.3 if bf16_emulated else seconds), 1)}


def bf16_is_emulated() -> bool:
    """True on a CPU without AVX512-BF16 or AMX (bf16 matmuls then run tens of times slower than fp32);
    never on CUDA (a card without bf16 is caught by torch.cuda.is_bf16_supported)."""
    if DEVICE.type == "cuda":
        return not torch.cuda.is_bf16_supported()
    from qtoy_core.training.precision import cpu_supports_fast_bf16

    return not cpu_supports_fast_bf16()


# ---------------------------------------------------------------------------------------------
# the hand-written reference (same parameter names, so qtoy's state dict loads into it)
# ---------------------------------------------------------------------------------------------


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RefAttention(nn.Module):
    def __init__(self, d, h, softmax):
        super().__init__()
        self.h, self.dh, self.softmax = h, d // h, softmax
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, future):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.h, self.dh).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.softmax:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q * (1.0 / self.dh)) @ k.transpose(-1, -2)
            z = scores.square().masked_fill(future, 0.0) @ v
        return self.out_proj(z.transpose(1, 2).reshape(b, t, d))


class RefBilinear(nn.Module):
    def __init__(self, d, d_mlp):
        super().__init__()
        self.w_left = nn.Linear(d, d_mlp, bias=False)
        self.w_right = nn.Linear(d, d_mlp, bias=False)
        self.out_proj = nn.Linear(d_mlp, d, bias=False)

    def forward(self, x):
        return self.out_proj(self.w_left(x) * self.w_right(x))


class RefBlock(nn.Module):
    def __init__(self, d, h, d_mlp, mlp, softmax):
        super().__init__()
        self.attn = RefAttention(d, h, softmax)
        self.mlp = RefBilinear(d, d_mlp) if mlp else None

    def forward(self, x, cos, sin, future):
        x = x + self.attn(x, cos, sin, future)
        if self.mlp is not None:
            x = x + self.mlp(x)
        return x


class RefModel(nn.Module):
    def __init__(self, vocab, d, h, n_layers, mlp, softmax=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(RefBlock(d, h, 4 * d, mlp, softmax) for _ in range(n_layers))
        self.unembed = nn.Linear(d, vocab, bias=False)
        dh = d // h
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)).float(),
                             persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.attn.out_proj.weight)
            if blk.mlp is not None:
                nn.init.zeros_(blk.mlp.out_proj.weight)
        self.unembed.weight = self.embed.weight

    def forward(self, tokens):
        t = tokens.shape[1]
        freqs = torch.arange(t, dtype=torch.float32, device=tokens.device)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        future = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu_(1)
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin, future)
        return self.unembed(x)


# ---------------------------------------------------------------------------------------------
# variants: each has .step() -> loss (float)
# ---------------------------------------------------------------------------------------------


class RefStep:
    def __init__(self, model_type, shape, batches, precision, compiled, softmax, seed=0):
        from qtoy_core.config import parse_model_type

        n_layers, mlp = parse_model_type(model_type)
        torch.manual_seed(seed)
        self.model = RefModel(shape["vocab_size"], shape["d_model"], shape["n_head"], n_layers, mlp, softmax).to(DEVICE)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        other = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": 0.1}] + ([{"params": other, "weight_decay": 0.0}] if other else [])
        self.opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-16)
        self.bf16 = precision == "bf16"
        # compiled: the forward and the loss as one graph, as qtoy's Trainer compiles them
        self.loss = torch.compile(self._loss) if compiled else self._loss
        self.batches = batches

    def _loss(self, tokens):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    def step(self) -> float:
        loss = self.loss(next(self.batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class QtoyStep:
    """The Trainer's step on a registry-built model and optimizer."""

    def __init__(self, model_type, shape, batches, precision, compiled, attn="quadratic", seed=0):
        from qtoy_core.training.config import RunConfig
        from qtoy_core.training.trainer import Trainer

        doc = {
            "model": {"model_type": model_type, "vocab_size": shape["vocab_size"], "d_model": shape["d_model"],
                      "n_head": shape["n_head"], "n_ctx": shape["n_ctx"], "attention": attn},
            "optimizer": {"name": "adam"},
            "train": {"batch_size": shape["batch"], "precision": precision, "compile": compiled,
                      "max_iters": 10**6, "warmup": 0, "seed": seed, "device": DEVICE.type},
        }
        self._tmp = tempfile.TemporaryDirectory()
        self.trainer = Trainer(RunConfig.model_validate(doc), os.path.join(self._tmp.name, "run"),
                               train_batches=batches, val_batches=None)
        tr = self.trainer
        tr.setup()
        tr._first_step, tr._compile_decided, tr.skipped_total, tr.step_seconds = 0, False, 0, 0.0
        tr._maybe_compile()  # compile=True/False: decided now, by the Trainer's own switch
        self.model = tr.model

    def step(self) -> float:
        loss, _, _ = self.trainer._train_step()
        self.trainer.step += 1
        return loss


def flops_per_token(model_type, shape) -> float:
    """Training FLOPs per token: 3 x forward matmul FLOPs (weights, plus the (T, T) attention
    matmuls counted as the full square, 2 matmuls of 2*T*d each per layer: the usual MFU convention,
    as in PaLM and nanoGPT, although qtoy's blocked kernel skips most of the zero upper triangle)."""
    from qtoy_core.config import parse_model_type

    n_layers, mlp = parse_model_type(model_type)
    d, v, t = shape["d_model"], shape["vocab_size"], shape["n_ctx"]
    weights = n_layers * (4 * d * d + (3 * d * 4 * d if mlp else 0)) + d * v
    attn = n_layers * 2 * (2 * t * d)
    return 3 * (2 * weights + attn)


def token_stream(shape, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randint(0, shape["vocab_size"], (shape["batch"], shape["n_ctx"] + 1), generator=g).to(DEVICE)
            for _ in range(n)]
    return itertools.cycle(pool)


def bench_model(model_type, shape_name, variants, *, repeats, steps, warmup, peaks, shape=None) -> dict:
    shape = shape or SHAPES[shape_name]
    tokens_per_step = shape["batch"] * shape["n_ctx"]
    built = {}
    for impl, precision, compiled in variants:
        key = f"{impl}/{precision}{'+compile' if compiled else ''}"
        t0 = time.perf_counter()
        batches = token_stream(shape)
        if impl == "qtoy":
            v = QtoyStep(model_type, shape, batches, precision, compiled)
        elif impl == "qtoy_softmax":
            v = QtoyStep(model_type, shape, batches, precision, compiled, attn="softmax")
        else:
            v = RefStep(model_type, shape, batches, precision, compiled, softmax=impl == "sdpa")
        for _ in range(warmup):
            v.step()
        built[key] = v
        log(f"  {model_type} {shape_name} {key}: ready in {time.perf_counter() - t0:.1f} s")
    # the reference is the identical network: same weights -> same logits
    check = {}
    if "qtoy/fp32" in built and "ref/fp32" in built:
        q, r = built["qtoy/fp32"].model, built["ref/fp32"].model
        r2 = RefModel(shape["vocab_size"], shape["d_model"], shape["n_head"], len(q.blocks), q.config.has_mlp)
        r2.load_state_dict(q.state_dict())  # same names and shapes
        r2.to(DEVICE)
        toks = next(token_stream(shape))[:2, :-1]
        with torch.no_grad():
            check["ref_vs_qtoy_max_abs_logit_diff"] = float((q(toks) - r2(toks)).abs().max())
    times: dict[str, list[float]] = {k: [] for k in built}
    faults = {k: 0 for k in built}
    for _ in range(repeats):
        for key, v in built.items():
            f0 = machine.page_faults()
            t0 = time.perf_counter()
            for _ in range(steps):
                v.step()
            times[key].append((time.perf_counter() - t0) / steps)
            faults[key] += machine.page_faults() - f0
    fpt = flops_per_token(model_type, shape)
    rows = {}
    for key, ts in times.items():
        s = statistics.median(ts)
        tps = tokens_per_step / s
        rows[key] = {"step_s": round(s, 4), "tokens_per_s": round(tps), "gflops": round(tps * fpt / 1e9, 1),
                     "mfu_fp32_peak": round(tps * fpt / 1e9 / peaks["fp32"], 3),
                     "mfu_bf16_peak": round(tps * fpt / 1e9 / peaks["bf16"], 3),
                     "mfu_card_bf16_peak": round(tps * fpt / 1e9 / peaks["card_bf16"], 3) if peaks.get("card_bf16") else None,
                     "spread": round((max(ts) - min(ts)) / s, 2),
                     # pages faulted in (and zeroed by the kernel) per step: fresh memory for its tensors
                     "page_faults_per_step": round(faults[key] / (repeats * steps))}
    out = {"model_type": model_type, "shape": shape_name, **shape, "tokens_per_step": tokens_per_step,
           "flops_per_token": fpt, "variants": rows, **check}
    # what `qtoy train` does by itself for a default-length run
    from qtoy_core.training.precision import cpu_supports_fast_bf16
    from qtoy_core.training.trainer import should_compile

    if DEVICE.type == "cuda":
        auto_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    else:
        auto_precision = "bf16" if cpu_supports_fast_bf16() else "fp32"
    eager_key = f"qtoy/{auto_precision}"
    if eager_key in rows:
        compiles = should_compile(None, seconds_per_step=rows[eager_key]["step_s"], steps_left=DEFAULT_RUN_STEPS - 3)
        default_key = eager_key + ("+compile" if compiles else "")
        out["default"] = {"precision": auto_precision, "compile": compiles, "variant": default_key,
                          "measured": default_key in rows}
    ratios = {}

    def ratio(name, a, b):
        if a in rows and b in rows:
            ratios[name] = round(rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"], 3)

    for mode in ("fp32", "bf16", "bf16+compile"):
        ratio(f"qtoy/ref {mode}", f"qtoy/{mode}", f"ref/{mode}")
        ratio(f"ref quadratic/sdpa {mode}", f"ref/{mode}", f"sdpa/{mode}")
        ratio(f"qtoy quadratic/qtoy softmax {mode}", f"qtoy/{mode}", f"qtoy_softmax/{mode}")
        ratio(f"qtoy {mode}/ref fp32", f"qtoy/{mode}", "ref/fp32")
    best_sdpa = max((k for k in rows if k.startswith("sdpa/")), key=lambda k: rows[k]["tokens_per_s"], default=None)
    best_qtoy = max((k for k in rows if k.startswith("qtoy/")), key=lambda k: rows[k]["tokens_per_s"], default=None)
    if best_sdpa and best_qtoy:
        ratios["qtoy best/sdpa best"] = round(rows[best_qtoy]["tokens_per_s"] / rows[best_sdpa]["tokens_per_s"], 3)
    d = out.get("default")
    if d and d["measured"]:
        ratio("qtoy default/ref fp32", d["variant"], "ref/fp32")
        out["default"]["tokens_per_s"] = rows[d["variant"]]["tokens_per_s"]
        out["default"]["mfu_bf16_peak"] = rows[d["variant"]]["mfu_bf16_peak"]
    out["ratios"] = ratios
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="< 1 minute: attention_only_1L and transformer_2L, qtoy and ref, eager only")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (nothing else)")
    p.add_argument("--models", default=None, help="comma-separated model types")
    p.add_argument("--shapes", default=None, help="comma-separated: base, large (large: transformer_2L only)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    p.add_argument("--compile-models", default=None,
                   help="comma-separated model types that also get compiled variants (default: all measured)")
    p.add_argument("--impls", default=None, help="comma-separated subset of qtoy,ref,sdpa,qtoy_softmax")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per timed repeat")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="run every variant (and the matmul peak) on this device")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 variants: auto (default) measures them only where bf16 matmuls are native "
                        "(AVX512-BF16/AMX CPUs, bf16 GPUs): emulated, one --quick run would take > 15 min")
    p.add_argument("--shape", default=None, metavar="KEY=VALUE,...",
                   help="override the shape(s) measured, e.g. d_model=512,n_head=8,n_ctx=512,batch=64")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="measure each shape once per value of one of its keys, e.g. batch=32,64,128 (the batch that "
                        "fills the card), reporting tokens/s and MFU per configuration")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated subset of {','.join(MODES)}: the precision / compile variants to time")
    machine.add_malloc_option(p)
    args = p.parse_args(argv)
    malloc_kept = machine.apply_malloc(args.malloc)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")

    torch._dynamo.config.cache_size_limit = 64  # many models compiled in one process
    emulated = bf16_is_emulated()
    with_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and not emulated)
    if args.shape:
        for name in SHAPES:
            SHAPES[name] = {**SHAPES[name], **{k: int(v) for k, v in (kv.split("=") for kv in args.shape.split(","))}}
    sweep_key, sweep_values = None, [None]
    if args.sweep:
        sweep_key, _, values = args.sweep.partition("=")
        if sweep_key not in SHAPES["base"] or not values:
            raise SystemExit(f"--sweep {args.sweep!r}: give KEY=V1,V2,... with KEY one of {', '.join(SHAPES['base'])}")
        sweep_values = [int(v) for v in values.split(",")]
    modes = args.modes.split(",") if args.modes else None
    if modes and not set(modes) <= set(MODES):
        raise SystemExit(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    quick = args.quick
    models = args.models.split(",") if args.models else (["attention_only_1L", "transformer_2L"] if quick else list(MODEL_TYPES))
    shapes = args.shapes.split(",") if args.shapes else (["base"] if quick else ["base", "large"])
    compile_ok = not (args.no_compile or quick)
    repeats = args.repeats or (3 if quick else 5)
    steps = args.steps or (1 if quick else 3)
    if quick and not args.impls:  # qtoy against the reference: the ratio that matters, in < 1 min on AVX2
        args.impls = "qtoy,ref"
    warmup = 1 if quick else 2

    meta = {"machine": machine.describe(), "device": str(DEVICE), "malloc": args.malloc, "malloc_kept_block_bytes": malloc_kept,
            "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "quick": quick, "repeats": repeats,
            "steps_per_repeat": steps, "bf16_emulated": emulated, "bf16_variants": with_bf16,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if not with_bf16:
        log(f"bf16 variants skipped: bf16 matmuls are emulated on this "
            f"{'GPU' if DEVICE.type == 'cuda' else 'CPU'} ({meta['torch_cpu_capability']}, no AVX512-BF16 or AMX); "
            f"--bf16 on measures them anyway (tens of times slower than fp32)")
    log("measuring matmul peaks ...")
    peaks = measure_peaks(quick, bf16_emulated=emulated)
    meta["peak_gflops_start"] = dict(peaks)
    card = card_bf16_peak(meta["gpu"])
    if card:
        peaks["card_bf16"] = card[1]
    meta["card_bf16_peak"] = {"matched": card[0], "gflops": card[1]} if card else None

    results = []
    for shape_name in shapes:
        for model_type in models:
            if shape_name == "large" and model_type != "transformer_2L":
                continue
            # the compiled (and softmax) variants use the precision the default path uses: bf16 where
            # it is native, else fp32
            fast = "bf16" if with_bf16 else "fp32"
            variants = [("qtoy", "fp32", False), ("ref", "fp32", False), ("sdpa", "fp32", False)]
            if with_bf16:
                variants += [("qtoy", "bf16", False), ("ref", "bf16", False), ("sdpa", "bf16", False)]
            if not quick:
                variants.append(("qtoy_softmax", fast, False))
            if compile_ok:
                variants += [("qtoy", fast, True), ("ref", fast, True), ("sdpa", fast, True)]
                if not quick and shape_name == "base":
                    variants.append(("qtoy_softmax", fast, True))
            if modes:
                want = {(m.split("+")[0], m.endswith("+compile")) for m in modes}
                variants += [(impl, prec, True) for impl in ("qtoy", "ref", "sdpa") for prec, c in want
                             if c and (impl, prec, True) not in variants and (prec != "bf16" or with_bf16)]
                variants = [v for v in variants if (v[1], v[2]) in want]
            if args.impls:
                variants = [v for v in variants if v[0] in args.impls.split(",")]
            if args.compile_models and model_type not in args.compile_models.split(","):
                variants = [v for v in variants if not v[2]]
            for value in sweep_values:
                shape = SHAPES[shape_name] if value is None else {**SHAPES[shape_name], sweep_key: value}
                label = shape_name if value is None else f"{shape_name}, {sweep_key}={value}"
                log(f"{model_type} ({label})")
                results.append(bench_model(model_type, label, variants, repeats=repeats, steps=steps,
                                           warmup=warmup, peaks=peaks, shape=shape))
                for key, row in results[-1]["variants"].items():  # now, in case a time limit cuts the run
                    log(f"    {key}: {row['tokens_per_s']:,} tokens/s, MFU bf16 (measured peak) {row['mfu_bf16_peak']:.1%}"
                        + (f", MFU card {row['mfu_card_bf16_peak']:.1%}" if row.get("mfu_card_bf16_peak") else ""))
    # the peak again at the end (the best of both counts; MFU rows were computed with the first)
    end_peaks = measure_peaks(quick, bf16_emulated=emulated)
    meta["peak_gflops_end"] = end_peaks
    for k in end_peaks:
        peaks[k] = max(peaks[k], end_peaks[k])
    meta["peak_gflops"] = peaks
    for r in results:
        for row in r["variants"].values():
            for k in ("fp32", "bf16"):
                row[f"mfu_{k}_peak"] = round(row["gflops"] / peaks[k], 3)
        if "default" in r and r["default"]["measured"]:
            r["default"]["mfu_bf16_peak"] = r["variants"][r["default"]["variant"]]["mfu_bf16_peak"]
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    if args.json:
        print(json.dumps({"meta": meta, "results": results}))
        return
    print(f"training throughput (tokens/s, median of {repeats} x {steps} steps; torch {meta['torch']}, "
          f"{meta['threads']} threads; load avg {meta['loadavg_start'][0]} -> {meta['loadavg_end'][0]})")
    print(f"machine: {machine.one_line(meta['machine'])}" + (f"; device: {meta['gpu']}" if meta["gpu"] else "")
          + f"; malloc: {meta['malloc']}" + (f" (freed blocks up to {meta['malloc_kept_block_bytes'] >> 20} MiB kept for reuse)"
             if meta["malloc_kept_block_bytes"] else ""))
    print(f"matmul peak (best of start and end): fp32 {peaks['fp32']} GFLOP/s, bf16 {peaks['bf16']} GFLOP/s"
          + (" (bf16 emulated: measured at n=256 only; MFU bf16 is against that)" if emulated else ""))
    if DEVICE.type == "cuda":
        card = meta["card_bf16_peak"]
        print(f"bf16 peak used: {meta['gpu']}: " + (
            f"datasheet dense bf16 {card['gflops'] / 1000:.0f} TFLOP/s (table entry {card['matched']!r}), column MFU card"
            if card else f"no datasheet entry for this card in CARD_BF16_TFLOPS: MFU against the measured bf16 "
                         f"matmul peak {peaks['bf16'] / 1000:.0f} TFLOP/s only"))
    if not with_bf16:
        print(f"bf16 variants skipped: bf16 matmuls are emulated here ({meta['torch_cpu_capability']}, no "
              f"AVX512-BF16 or AMX), {peaks['fp32'] / max(peaks['bf16'], 1e-9):.0f}x slower than fp32; --bf16 on "
              f"measures them anyway")
    for r in results:
        print(f"\n{r['model_type']} [{r['shape']}: vocab {r['vocab_size']}, d_model {r['d_model']}, "
              f"{r['n_head']} heads, n_ctx {r['n_ctx']}, batch {r['batch']}]"
              + (f"  ref-vs-qtoy max |dlogit| {r['ref_vs_qtoy_max_abs_logit_diff']:.1e}"
                 if "ref_vs_qtoy_max_abs_logit_diff" in r else ""))
        card_col = any(row.get("mfu_card_bf16_peak") is not None for row in r["variants"].values())
        print(f"  {'variant':<24}{'tokens/s':>11}{'step s':>9}{'GFLOP/s':>10}{'MFU fp32':>9}{'MFU bf16':>9}"
              + (f"{'MFU card':>9}" if card_col else "") + f"{'spread':>8}{'faults/step':>12}")
        for key, row in r["variants"].items():
            print(f"  {key:<24}{row['tokens_per_s']:>11,}{row['step_s']:>9.4f}{row['gflops']:>10.0f}"
                  f"{row['mfu_fp32_peak']:>9.0%}{row['mfu_bf16_peak']:>9.1%}"
                  + (f"{row['mfu_card_bf16_peak']:>9.1%}" if card_col else "")
                  + f"{row['spread']:>8.2f}{row['page_faults_per_step']:>12,}")
        if "default" in r:
            d = r["default"]
            print(f"  default path (600-step run): {d['variant']}"
                  + (f" = {d['tokens_per_s']:,} tokens/s, {d['mfu_bf16_peak']:.1%} of bf16 peak" if d["measured"] else " (not measured here)"))
        print("  ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()))


if __name__ == "__main__":
    main()
