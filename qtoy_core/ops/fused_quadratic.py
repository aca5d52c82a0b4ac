"""Fused causal quadratic and bilinear attention: one Triton kernel, flash-style tiling.

The same maths as :func:`qtoy_core.ops.quadratic.quadratic_attention`::

    scores  = (q . k) * scale                       (bilinear: a second pair, (q2 . k2) * scale)
    pattern = scores ** 2                           (bilinear: scores * scores2)
    z       = causal(pattern) @ v                   (no normalisation)

q is (B, H, Tq, D) and sits at the last Tq of the Tk key positions; a query at position p sees the
keys j <= p, and with ``doc_ids`` (B, Tk) only those of its own document (``doc[b, p] == doc[b, j]``).

Each program of the forward owns a block of query rows and walks the key blocks it can see,
computing the (rows x keys) scores, squaring them and multiplying by V in registers: the (T, T)
pattern is never written to memory, and the blocks above the diagonal are never visited. Without a
softmax there is no running maximum or row sum to carry (unlike FlashAttention), so the backward
needs nothing from the forward but its inputs. It recomputes the scores tile by tile in two
kernels: one per key block (``dv = P^T dz``, ``dk = dS^T q * scale``), one per query block
(``dq = dS k * scale``), where ``dP = dz v^T`` and ``dS = 2 S dP`` (bilinear: ``dS1 = dP S2``,
``dS2 = dP S1``). Every output block belongs to one program, so there are no atomics. Products
accumulate in float32 for bf16/fp16 inputs (float64 for float64 inputs); fp32 inputs multiply
in full fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set, the rule torch's own
matmuls follow.

Why qtoy has its own kernel: flash-linear-attention's squared-score kernel (``fla.ops.rebased``,
``parallel_rebased``) computes ``((q*scale) . k)^2`` causally with an optional normalisation, but
only for Tq == Tk, with no bilinear form, no document mask, and a scale its public function fixes
to ``d^-0.5`` or 1; wrapping it would cover one of the cases qtoy runs.

The kernels are wrapped as torch custom ops (``qtoy::fused_quadratic_fwd`` / ``_bwd``) with their
autograd formula registered, so torch.compile sees one opaque call instead of tracing into Triton.
Gradients of gradients (``create_graph=True``) and torch.func transforms go through the dense
autograd form (:func:`dense_quadratic_attention`), as the plain form of quadratic.py does.

CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before
this module is first imported, since Triton reads it when the kernels are decorated): slow, for the
tests. On CUDA, block sizes are autotuned once per (head size, form, mask, dtype, length bucket).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtoy_registry import QtoyError

try:  # Triton is optional: without it (macOS, Windows, a CPU-only install) the plain/chunked forms run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = [
    "FusedKernelError",
    "dense_quadratic_attention",
    "fused_available",
    "fused_quadratic_attention",
    "fused_supports",
]

#: dtypes the kernel takes; ``impl="auto"`` uses it for the first three only (fp64 is no faster than
#: the plain form on a GPU and keeps its exactness role there)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: largest head size the kernel takes (one (block, d_head) tile of q, k, v per operand in registers)
MAX_D_HEAD = 256
#: largest head size ``impl="auto"`` sends to it (the bilinear backward holds six such tiles)
AUTO_MAX_D_HEAD = 128
#: block sizes under the interpreter (CPU) when none are given: small, the interpreter is slow
INTERPRET_BLOCKS = (16, 16)


class FusedKernelError(QtoyError, ValueError):
    """The fused kernel cannot run these inputs here (no Triton, CPU without the interpreter, an
    unsupported dtype or head size); the message names the fix."""


# ---------------------------------------------------------------------------------------------
# The dense reference (autograd ops over the full square)
# ---------------------------------------------------------------------------------------------


def visible_keys(tq: int, tk: int, doc_ids: Tensor | None, device) -> Tensor:
    """Bool mask of the keys each query sees: (Tq, Tk), or (B, 1, Tq, Tk) with ``doc_ids``."""
    causal = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
    if doc_ids is None:
        return causal
    doc = doc_ids.to(device)
    same = doc[:, tk - tq:, None] == doc[:, None, :]
    return (causal & same)[:, None]


def dense_quadratic_attention(q, k, v, *, scale, q2=None, k2=None, doc_ids=None) -> Tensor:
    """The kernel's maths as differentiable tensor ops over the full (Tq, Tk) square: what the
    fused form falls back to for higher-order gradients and torch.func, O(T^2) memory."""
    scores = (q @ k.transpose(-1, -2)) * scale
    pattern = scores.square() if q2 is None else scores * ((q2 @ k2.transpose(-1, -2)) * scale)
    keep = visible_keys(q.shape[-2], k.shape[-2], doc_ids, q.device)
    return pattern.masked_fill(~keep, 0.0) @ v


# ---------------------------------------------------------------------------------------------
# Availability and the shapes the kernel takes
# ---------------------------------------------------------------------------------------------


def fused_available() -> bool:
    """True where Triton imported (the kernel can run on CUDA tensors)."""
    return triton is not None


def _interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return triton is not None and type(_fwd_kernel).__name__ == "InterpretedFunction"


def _unsupported(q, k, v, q2, k2, doc_ids, *, auto: bool) -> str | None:
    """Why the fused kernel cannot (or, for ``auto``, should not) take these inputs; None if it can."""
    if triton is None:
        return ("Triton is not installed (the fused kernel is written in Triton): `pip install triton` on Linux "
                "with a CUDA GPU, or use impl='plain' / 'chunked'")
    devices = {x.device.type for x in (q, k, v, q2, k2) if x is not None}
    if devices != {"cuda"}:
        if auto or devices != {"cpu"} or not _interpreted():
            return (f"the fused kernel runs on CUDA tensors (got {'/'.join(sorted(devices))}); on CPU it runs only under "
                    f"Triton's interpreter, TRITON_INTERPRET=1 set before qtoy_core.ops.fused_quadratic is first "
                    f"imported (slow: for tests). Use impl='plain' or 'chunked' on CPU")
    dtypes = {x.dtype for x in (q, k, v, q2, k2) if x is not None}
    allowed = AUTO_DTYPES if auto else DTYPES
    if len(dtypes) != 1 or next(iter(dtypes)) not in allowed:
        return (f"the fused kernel needs q, k, v (and q2, k2) of one dtype among "
                f"{', '.join(str(d).removeprefix('torch.') for d in allowed)}; got "
                f"{', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}")
    d, dv = q.shape[-1], v.shape[-1]
    limit = AUTO_MAX_D_HEAD if auto else MAX_D_HEAD
    if dv != d or not 1 <= d <= limit:
        return (f"the fused kernel needs one head size 1..{limit} for q, k and v; got d_head {d} (v: {dv}). "
                f"Use impl='plain'")
    if doc_ids is not None:
        if doc_ids.shape != (k.shape[0], k.shape[-2]):
            return f"doc_ids must be (batch, Tk) = {(k.shape[0], k.shape[-2])}, got {tuple(doc_ids.shape)}"
        if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
            return f"doc_ids must be an integer tensor (a document number per position), got {doc_ids.dtype}"
    return None


def fused_supports(q, k, v, q2=None, k2=None, doc_ids=None) -> bool:
    """What ``impl="auto"`` asks: Triton present, CUDA tensors, fp16/bf16/fp32, d_head <= 128, and no
    torch.func transform active (those need the autograd form)."""
    if torch._C._are_functorch_transforms_active():
        return False
    return _unsupported(q, k, v, q2, k2, doc_ids, auto=True) is None


# ---------------------------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------------------------


def fused_quadratic_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    q2: Tensor | None = None,
    k2: Tensor | None = None,
    key_mask: Tensor | None = None,
    doc_ids: Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Causal quadratic (bilinear with ``q2``/``k2``) attention by the fused Triton kernel.

    Same arguments and result as :func:`qtoy_core.ops.quadratic.quadratic_attention` (q (B, H, Tq, D)
    at the last Tq of the Tk positions, k/v (B, H, Tk, D), ``key_mask`` (B, Tk) zeroes padded keys,
    ``scale`` multiplies each q.k before the square), plus ``doc_ids`` (B, Tk) integers: key j is
    visible to the query at position p iff ``j <= p`` and ``doc_ids[b, p] == doc_ids[b, j]``.
    ``block_m`` / ``block_n``: query rows / keys per tile (powers of two >= 16); by default
    autotuned on CUDA and 16 under the interpreter.
    """
    from .quadratic import _apply_key_mask, _check_inputs  # the plain form's checks and key masking

    _check_inputs(q, k, v, q2, k2)
    if doc_ids is not None:
        doc_ids = torch.as_tensor(doc_ids, device=k.device)
    device = q.device.type
    if _autocast_enabled(device):
        # autocast's rule for matmuls applied once to the kernel's inputs (as the plain form does)
        low = torch.get_autocast_dtype(device)
        q, k, v, q2, k2 = (_autocast_cast(x, low) for x in (q, k, v, q2, k2))
    why = _unsupported(q, k, v, q2, k2, doc_ids, auto=False)
    if why:
        raise FusedKernelError(f"impl='fused' cannot run here: {why}.")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size is not None and (size < 16 or size & (size - 1)):
            raise FusedKernelError(f"{name} must be a power of two >= 16 (tl.dot's smallest tile), got {size}.")
    v = _apply_key_mask(v, key_mask)  # a padded key multiplies a zero value, as in the plain form
    if torch._C._are_functorch_transforms_active():
        return dense_quadratic_attention(q, k, v, scale=scale, q2=q2, k2=k2, doc_ids=doc_ids)
    if doc_ids is not None:
        doc_ids = doc_ids.to(torch.int64).contiguous()
    q, k, v, q2, k2 = (_last_dim_contiguous(x) for x in (q, k, v, q2, k2))
    with torch.autocast(device, enabled=False):
        return torch.ops.qtoy.fused_quadratic_fwd(q, k, v, q2, k2, doc_ids, float(scale), block_m or 0, block_n or 0)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        return False


def _autocast_cast(x: Tensor | None, low: torch.dtype) -> Tensor | None:
    if x is None or not x.is_floating_point() or x.dtype == torch.float64:
        return x
    return x.to(low)


def _last_dim_contiguous(x: Tensor | None) -> Tensor | None:
    """The kernels index (batch, head, time) by stride and the head dimension contiguously."""
    if x is None or x.stride(-1) == 1:
        return x
    return x.contiguous()


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rows(ptr, base, stride_t, offs_t, t_len, offs_d, D: tl.constexpr):
        """Tile (len(offs_t), BLOCK_D) of a (time, d_head) matrix; zeros outside it."""
        return tl.load(ptr + base + offs_t[:, None] * stride_t + offs_d[None, :],
                       mask=(offs_t[:, None] < t_len) & (offs_d[None, :] < D), other=0.0)

    @triton.jit
    def _cols(ptr, base, stride_t, offs_t, t_len, offs_d, D: tl.constexpr):
        """The transposed tile (BLOCK_D, len(offs_t)); zeros outside it."""
        return tl.load(ptr + base + offs_t[None, :] * stride_t + offs_d[:, None],
                       mask=(offs_t[None, :] < t_len) & (offs_d[:, None] < D), other=0.0)

    @triton.jit
    def _mm(a, b, acc, PRECISION: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr):
        """a @ b (+ acc) accumulated in ACC. WIDEN (interpreter with bf16 only): the operands go to fp32
        first, since Triton's interpreter multiplies bf16 bit patterns as integers (triton-lang/triton
        #11584); the products of bf16 numbers are exact in fp32, as on the tensor cores."""
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)

    @triton.jit
    def _fwd_tile(acc, q, q2, pos, doc_q, start_n, K, K2, V, DOC, k_base, k2_base, v_base, doc_base,
                  sk_t, sk2_t, sv_t, t_k, scale, offs_d,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BILINEAR: tl.constexpr, HAS_DOC: tl.constexpr,
                  CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                  WIDEN: tl.constexpr):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = _cols(K, k_base, sk_t, offs_n, t_k, offs_d, D)
        s = _mm(q, kt, None, PRECISION, ACC, WIDEN) * scale
        if BILINEAR:
            k2t = _cols(K2, k2_base, sk2_t, offs_n, t_k, offs_d, D)
            p = s * (_mm(q2, k2t, None, PRECISION, ACC, WIDEN) * scale)
        else:
            p = s * s
        if CAUSAL:
            p = tl.where(offs_n[None, :] <= pos[:, None], p, 0.0)
        if HAS_DOC:
            doc_k = tl.load(DOC + doc_base + offs_n, mask=offs_n < t_k, other=-1)
            p = tl.where(doc_k[None, :] == doc_q[:, None], p, 0.0)
        v = _rows(V, v_base, sv_t, offs_n, t_k, offs_d, D)
        return _mm(p.to(v.dtype), v, acc, PRECISION, ACC, WIDEN)

    @triton.jit
    def _fwd_kernel(Q, K, V, Q2, K2, DOC, Z,
                    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                    sq2_b, sq2_h, sq2_t, sk2_b, sk2_h, sk2_t, sz_b, sz_h, sz_t, sdoc_b,
                    n_heads, t_q, t_k, scale, T_BUCKET,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BILINEAR: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                    WIDEN: tl.constexpr):
        # the blocks nearest the end see the most keys: launch them first
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // n_heads).to(tl.int64)
        h = (bh % n_heads).to(tl.int64)
        offset = t_k - t_q  # position of query 0
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        pos = offset + offs_m
        q = _rows(Q, b * sq_b + h * sq_h, sq_t, offs_m, t_q, offs_d, D)
        q2 = q
        if BILINEAR:
            q2 = _rows(Q2, b * sq2_b + h * sq2_h, sq2_t, offs_m, t_q, offs_d, D)
        doc_q = pos
        if HAS_DOC:
            doc_q = tl.load(DOC + b * sdoc_b + pos, mask=offs_m < t_q, other=-1)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        first = offset + pid_m * BLOCK_M  # position of the block's first query
        below = (first // BLOCK_N) * BLOCK_N  # keys [0, below) are visible to every row: no causal mask
        end = tl.minimum(t_k, first + BLOCK_M)
        k_base, k2_base, v_base = b * sk_b + h * sk_h, b * sk2_b + h * sk2_h, b * sv_b + h * sv_h
        doc_base = b * sdoc_b
        for start_n in range(0, below, BLOCK_N):
            acc = _fwd_tile(acc, q, q2, pos, doc_q, start_n, K, K2, V, DOC, k_base, k2_base, v_base, doc_base,
                            sk_t, sk2_t, sv_t, t_k, scale, offs_d, D, BLOCK_N, BILINEAR, HAS_DOC, False,
                            PRECISION, ACC, WIDEN)
        for start_n in range(below, end, BLOCK_N):
            acc = _fwd_tile(acc, q, q2, pos, doc_q, start_n, K, K2, V, DOC, k_base, k2_base, v_base, doc_base,
                            sk_t, sk2_t, sv_t, t_k, scale, offs_d, D, BLOCK_N, BILINEAR, HAS_DOC, True,
                            PRECISION, ACC, WIDEN)
        z_ptr = Z + b * sz_b + h * sz_h + offs_m[:, None] * sz_t + offs_d[None, :]
        tl.store(z_ptr, acc.to(Z.dtype.element_ty), mask=(offs_m[:, None] < t_q) & (offs_d[None, :] < D))

    @triton.jit
    def _dq_tile(dq, dq2, q, q2, dz, pos, doc_q, start_n, K, K2, V, DOC, k_base, k2_base, v_base, doc_base,
                 sk_t, sk2_t, sv_t, t_k, scale, offs_d,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, BILINEAR: tl.constexpr, HAS_DOC: tl.constexpr,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                  WIDEN: tl.constexpr):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _rows(K, k_base, sk_t, offs_n, t_k, offs_d, D)
        vt = _cols(V, v_base, sv_t, offs_n, t_k, offs_d, D)
        s1 = _mm(q, tl.trans(k), None, PRECISION, ACC, WIDEN) * scale
        dp = _mm(dz, vt, None, PRECISION, ACC, WIDEN)  # dP = dz V^T
        keep = offs_n[None, :] < t_k
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= pos[:, None])
        if HAS_DOC:
            doc_k = tl.load(DOC + doc_base + offs_n, mask=offs_n < t_k, other=-1)
            keep = keep & (doc_k[None, :] == doc_q[:, None])
        if BILINEAR:
            k2 = _rows(K2, k2_base, sk2_t, offs_n, t_k, offs_d, D)
            s2 = _mm(q2, tl.trans(k2), None, PRECISION, ACC, WIDEN) * scale
            ds1 = tl.where(keep, dp * s2, 0.0)
            ds2 = tl.where(keep, dp * s1, 0.0)
            dq = _mm(ds1.to(k.dtype), k, dq, PRECISION, ACC, WIDEN)
            dq2 = _mm(ds2.to(k2.dtype), k2, dq2, PRECISION, ACC, WIDEN)
        else:
            ds = tl.where(keep, 2.0 * dp * s1, 0.0)  # d s^2 = 2 s ds
            dq = _mm(ds.to(k.dtype), k, dq, PRECISION, ACC, WIDEN)
        return dq, dq2

    @triton.jit
    def _dq_kernel(Q, K, V, Q2, K2, DOC, DZ, DQ, DQ2,
                   sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                   sq2_b, sq2_h, sq2_t, sk2_b, sk2_h, sk2_t, sdz_b, sdz_h, sdz_t, sdoc_b,
                   n_heads, t_q, t_k, scale, T_BUCKET,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BILINEAR: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                    WIDEN: tl.constexpr):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // n_heads).to(tl.int64)
        h = (bh % n_heads).to(tl.int64)
        offset = t_k - t_q
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        pos = offset + offs_m
        q = _rows(Q, b * sq_b + h * sq_h, sq_t, offs_m, t_q, offs_d, D)
        dz = _rows(DZ, b * sdz_b + h * sdz_h, sdz_t, offs_m, t_q, offs_d, D)
        q2 = q
        if BILINEAR:
            q2 = _rows(Q2, b * sq2_b + h * sq2_h, sq2_t, offs_m, t_q, offs_d, D)
        doc_q = pos
        if HAS_DOC:
            doc_q = tl.load(DOC + b * sdoc_b + pos, mask=offs_m < t_q, other=-1)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        first = offset + pid_m * BLOCK_M
        below = (first // BLOCK_N) * BLOCK_N
        end = tl.minimum(t_k, first + BLOCK_M)
        k_base, k2_base, v_base = b * sk_b + h * sk_h, b * sk2_b + h * sk2_h, b * sv_b + h * sv_h
        doc_base = b * sdoc_b
        for start_n in range(0, below, BLOCK_N):
            dq, dq2 = _dq_tile(dq, dq2, q, q2, dz, pos, doc_q, start_n, K, K2, V, DOC, k_base, k2_base, v_base,
                               doc_base, sk_t, sk2_t, sv_t, t_k, scale, offs_d, D, BLOCK_N, BILINEAR, HAS_DOC,
                               False, PRECISION, ACC, WIDEN)
        for start_n in range(below, end, BLOCK_N):
            dq, dq2 = _dq_tile(dq, dq2, q, q2, dz, pos, doc_q, start_n, K, K2, V, DOC, k_base, k2_base, v_base,
                               doc_base, sk_t, sk2_t, sv_t, t_k, scale, offs_d, D, BLOCK_N, BILINEAR, HAS_DOC,
                               True, PRECISION, ACC, WIDEN)
        out_mask = (offs_m[:, None] < t_q) & (offs_d[None, :] < D)
        # DQ/DQ2 are contiguous (B, H, Tq, D) buffers made by the wrapper
        out = (b * n_heads + h) * t_q * D + offs_m[:, None] * D + offs_d[None, :]
        tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=out_mask)
        if BILINEAR:
            tl.store(DQ2 + out, (dq2 * scale).to(DQ2.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _dkv_tile(dk, dk2, dv, k, k2, v, offs_n, doc_k, start_m, Q, Q2, DZ, q_base, q2_base, dz_base,
                  sq_t, sq2_t, sdz_t, t_q, offset, scale, offs_d, DOC, doc_base,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BILINEAR: tl.constexpr, HAS_DOC: tl.constexpr,
                  CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                  WIDEN: tl.constexpr):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        pos = offset + offs_m
        q = _rows(Q, q_base, sq_t, offs_m, t_q, offs_d, D)
        dz = _rows(DZ, dz_base, sdz_t, offs_m, t_q, offs_d, D)
        st = _mm(k, tl.trans(q), None, PRECISION, ACC, WIDEN) * scale  # S^T (keys, rows)
        dpt = _mm(v, tl.trans(dz), None, PRECISION, ACC, WIDEN)  # dP^T = v dz^T
        keep = offs_m[None, :] < t_q
        if CAUSAL:
            keep = keep & (offs_n[:, None] <= pos[None, :])
        if HAS_DOC:
            doc_q = tl.load(DOC + doc_base + pos, mask=offs_m < t_q, other=-1)
            keep = keep & (doc_k[:, None] == doc_q[None, :])
        if BILINEAR:
            q2 = _rows(Q2, q2_base, sq2_t, offs_m, t_q, offs_d, D)
            s2t = _mm(k2, tl.trans(q2), None, PRECISION, ACC, WIDEN) * scale
            pt = tl.where(keep, st * s2t, 0.0)
            ds1t = tl.where(keep, dpt * s2t, 0.0)
            ds2t = tl.where(keep, dpt * st, 0.0)
            dk = _mm(ds1t.to(q.dtype), q, dk, PRECISION, ACC, WIDEN)
            dk2 = _mm(ds2t.to(q2.dtype), q2, dk2, PRECISION, ACC, WIDEN)
        else:
            pt = tl.where(keep, st * st, 0.0)
            dst = tl.where(keep, 2.0 * dpt * st, 0.0)
            dk = _mm(dst.to(q.dtype), q, dk, PRECISION, ACC, WIDEN)
        dv = _mm(pt.to(dz.dtype), dz, dv, PRECISION, ACC, WIDEN)  # dv = P^T dz
        return dk, dk2, dv

    @triton.jit
    def _dkv_kernel(Q, K, V, Q2, K2, DOC, DZ, DK, DK2, DV,
                    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                    sq2_b, sq2_h, sq2_t, sk2_b, sk2_h, sk2_t, sdz_b, sdz_h, sdz_t, sdoc_b,
                    n_heads, t_q, t_k, scale, T_BUCKET,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BILINEAR: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                    WIDEN: tl.constexpr):
        # one program per block of keys (the first blocks are seen by the most queries: launched first)
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // n_heads).to(tl.int64)
        h = (bh % n_heads).to(tl.int64)
        offset = t_k - t_q
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = _rows(K, b * sk_b + h * sk_h, sk_t, offs_n, t_k, offs_d, D)
        v = _rows(V, b * sv_b + h * sv_h, sv_t, offs_n, t_k, offs_d, D)
        k2 = k
        if BILINEAR:
            k2 = _rows(K2, b * sk2_b + h * sk2_h, sk2_t, offs_n, t_k, offs_d, D)
        doc_k = offs_n
        if HAS_DOC:
            doc_k = tl.load(DOC + b * sdoc_b + offs_n, mask=offs_n < t_k, other=-1)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        first_key = pid_n * BLOCK_N
        # queries i see key j iff offset + i >= j: the first query that sees the block's first key,
        # and the first that sees all of its keys (from there on no causal mask)
        lo = tl.maximum(first_key - offset, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        full = tl.maximum(first_key + BLOCK_N - 1 - offset, 0)
        full = tl.maximum(((full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
        mid = tl.minimum(full, t_q)
        q_base, q2_base, dz_base = b * sq_b + h * sq_h, b * sq2_b + h * sq2_h, b * sdz_b + h * sdz_h
        doc_base = b * sdoc_b
        for start_m in range(lo, mid, BLOCK_M):
            dk, dk2, dv = _dkv_tile(dk, dk2, dv, k, k2, v, offs_n, doc_k, start_m, Q, Q2, DZ, q_base, q2_base,
                                    dz_base, sq_t, sq2_t, sdz_t, t_q, offset, scale, offs_d, DOC, doc_base,
                                    D, BLOCK_M, BILINEAR, HAS_DOC, True, PRECISION, ACC, WIDEN)
        for start_m in range(mid, t_q, BLOCK_M):
            dk, dk2, dv = _dkv_tile(dk, dk2, dv, k, k2, v, offs_n, doc_k, start_m, Q, Q2, DZ, q_base, q2_base,
                                    dz_base, sq_t, sq2_t, sdz_t, t_q, offset, scale, offs_d, DOC, doc_base,
                                    D, BLOCK_M, BILINEAR, HAS_DOC, False, PRECISION, ACC, WIDEN)
        out_mask = (offs_n[:, None] < t_k) & (offs_d[None, :] < D)
        out = (b * n_heads + h) * t_k * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=out_mask)
        if BILINEAR:
            tl.store(DK2 + out, (dk2 * scale).to(DK2.dtype.element_ty), mask=out_mask)

    def _configs(pairs):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]

    # candidate tiles for CUDA, measured once per key by triton.autotune (no GPU was at hand to narrow
    # them: FlashAttention-2's Triton tiles for d_head 64-128, few enough that the first call per key
    # tunes in seconds)
    _TUNE_KEY = ["D", "BILINEAR", "HAS_DOC", "T_BUCKET"]
    _FWD_CONFIGS = _configs([(64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3)])
    _DQ_CONFIGS = _configs([(64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 4, 3)])
    _DKV_CONFIGS = _configs([(64, 64, 4, 2), (32, 128, 4, 3), (64, 128, 8, 3)])
    _fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY)(_fwd_kernel)
    _dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY)(_dq_kernel)
    _dkv_tuned = triton.autotune(_DKV_CONFIGS, key=_TUNE_KEY)(_dkv_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers and the custom ops
# ---------------------------------------------------------------------------------------------


def _common(q, k, v, q2, k2, doc):
    """Kernel arguments shared by the three kernels (strides of (batch, head, time), sizes, flags)."""
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    q2_, k2_ = (q, k) if q2 is None else (q2, k2)
    doc_ = doc if doc is not None else k  # any pointer: unread without HAS_DOC
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *q2_.stride()[:3], *k2_.stride()[:3]]
    interpreted = _interpreted()
    if q.dtype == torch.float32:  # torch's rule for its own fp32 matmuls
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and q.is_cuda and not interpreted else "ieee"
    elif q.dtype in (torch.float16, torch.bfloat16) and not interpreted:
        precision = "tf32"  # Triton's default: for half-precision operands it names the tensor-core path
    else:  # float64, and the interpreter's widened bf16 operands: exact fp32/fp64 products
        precision = "ieee"
    consts = dict(D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BILINEAR=q2 is not None, HAS_DOC=doc is not None,
                  PRECISION=precision,
                  ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
                  WIDEN=q.dtype == torch.bfloat16 and interpreted)
    sizes = (h, tq, tk)
    bucket = triton.next_power_of_2(max(tq, tk, 1))
    return b, h, tq, tk, d, q2_, k2_, doc_, strides, consts, sizes, bucket


def _pick(kernel, tuned, x, block_m, block_n):
    """The autotuned kernel on CUDA unless block sizes are given; the plain one with fixed blocks else."""
    if x.is_cuda and not _interpreted() and not block_m and not block_n:
        return tuned, {}
    bm, bn = INTERPRET_BLOCKS if not x.is_cuda or _interpreted() else (64, 64)
    return kernel, dict(BLOCK_M=block_m or bm, BLOCK_N=block_n or bn)


def _forward(q, k, v, q2, k2, doc, scale, block_m, block_n) -> Tensor:
    b, h, tq, tk, d, q2_, k2_, doc_, strides, consts, sizes, bucket = _common(q, k, v, q2, k2, doc)
    z = torch.empty(b, h, tq, d, dtype=q.dtype, device=q.device)
    if z.numel() == 0:
        return z
    kernel, blocks = _pick(_fwd_kernel, _fwd_tuned, q, block_m, block_n)
    grid = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * h)  # noqa: E731
    kernel[grid](q, k, v, q2_, k2_, doc_, z, *strides, *z.stride()[:3], doc.stride(0) if doc is not None else 0,
                 *sizes, scale, bucket, **consts, **blocks)
    return z


def _backward(dz, q, k, v, q2, k2, doc, scale, block_m, block_n):
    b, h, tq, tk, d, q2_, k2_, doc_, strides, consts, sizes, bucket = _common(q, k, v, q2, k2, doc)
    dz = _last_dim_contiguous(dz)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    bilinear = q2 is not None
    dq2 = torch.empty(q.shape, dtype=q.dtype, device=q.device) if bilinear else q.new_empty(0)
    dk2 = torch.empty(k.shape, dtype=k.dtype, device=k.device) if bilinear else k.new_empty(0)
    if dz.numel() == 0 or k.numel() == 0:
        for g in (dq, dk, dv, dq2, dk2):
            g.zero_()
        return dq, dk, dv, dq2, dk2
    doc_stride = doc.stride(0) if doc is not None else 0
    args = (*strides, *dz.stride()[:3], doc_stride, *sizes, scale, bucket)
    kernel, blocks = _pick(_dq_kernel, _dq_tuned, q, block_m, block_n)
    grid = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * h)  # noqa: E731
    kernel[grid](q, k, v, q2_, k2_, doc_, dz, dq, dq2 if bilinear else dq, *args, **consts, **blocks)
    kernel, blocks = _pick(_dkv_kernel, _dkv_tuned, q, block_m, block_n)
    grid = lambda meta: (triton.cdiv(tk, meta["BLOCK_N"]), b * h)  # noqa: E731
    kernel[grid](q, k, v, q2_, k2_, doc_, dz, dk, dk2 if bilinear else dk, dv, *args, **consts, **blocks)
    return dq, dk, dv, dq2, dk2


@torch.library.custom_op("qtoy::fused_quadratic_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, q2: Tensor | None, k2: Tensor | None, doc: Tensor | None,
            scale: float, block_m: int, block_n: int) -> Tensor:
    return _forward(q, k, v, q2, k2, doc, scale, block_m, block_n)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, q2, k2, doc, scale, block_m, block_n):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("qtoy::fused_quadratic_bwd", mutates_args=())
def _bwd_op(dz: Tensor, q: Tensor, k: Tensor, v: Tensor, q2: Tensor | None, k2: Tensor | None, doc: Tensor | None,
            scale: float, block_m: int, block_n: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(dz, q, k, v, q2, k2, doc, scale, block_m, block_n)


@_bwd_op.register_fake
def _bwd_fake(dz, q, k, v, q2, k2, doc, scale, block_m, block_n):
    bilinear = q2 is not None
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(q) if bilinear else q.new_empty(0), torch.empty_like(k) if bilinear else k.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, q2, k2, doc, scale, block_m, block_n = inputs
    ctx.save_for_backward(q, k, v, q2, k2, doc)
    ctx.scale, ctx.blocks = scale, (block_m, block_n)


def _grads(ctx, dz):
    q, k, v, q2, k2, doc = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: gradients that are differentiable again, from the dense autograd form
        xs = (q, k, v, q2, k2)
        wanted = [x for x, need in zip(xs, ctx.needs_input_grad[:5]) if x is not None and need]
        with torch.enable_grad():
            z = dense_quadratic_attention(q, k, v, scale=ctx.scale, q2=q2, k2=k2, doc_ids=doc)
            grads = iter(torch.autograd.grad(z, wanted, dz, create_graph=True, allow_unused=True))
        out = [next(grads) if x is not None and need else None for x, need in zip(xs, ctx.needs_input_grad[:5])]
        out = [torch.zeros_like(x) if g is None and x is not None and need else g
               for g, x, need in zip(out, xs, ctx.needs_input_grad[:5])]
        return (*out, None, None, None, None)
    dq, dk, dv, dq2, dk2 = torch.ops.qtoy.fused_quadratic_bwd(dz, q, k, v, q2, k2, doc, ctx.scale, *ctx.blocks)
    if q2 is None:
        dq2 = dk2 = None
    return dq, dk, dv, dq2, dk2, None, None, None, None


_fwd_op.register_autograd(_grads, setup_context=_setup_context)

