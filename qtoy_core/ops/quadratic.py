"""Causal quadratic and bilinear attention kernels.

Quadratic attention replaces the softmax of ordinary attention by a square::

    scores  = (q . k) * scale
    pattern = scores ** 2            (causal: zero above the diagonal, no normalisation)
    z       = pattern @ v

Bilinear attention uses two query/key pairs, ``pattern = ((q1.k1)*scale) * ((q2.k2)*scale)``;
quadratic attention is the special case ``q1 = q2, k1 = k2``.

Three equivalent implementations:

* ``plain``: materialises the (Tq, Tk) pattern, in blocks of query rows that skip the zero upper
  triangle (:class:`_CausalBlocked`). Cost O(Tq Tk D), memory O(Tq Tk).
* ``chunked``: the linear-attention form. Since ``(q.k)^2 = <phi(q), phi(k)>`` with
  ``phi(x) = x (x) x`` restricted to its symmetric part (``F = D(D+1)/2`` features, see
  :func:`symmetric_features`), causal quadratic attention is causal *linear* attention with feature
  map ``phi``. The sequence is cut into chunks of ``C`` positions; inside a chunk the exact masked
  (C x C) quadratic form is used, and the contribution of all earlier chunks comes from a running
  state ``S = sum_j phi(k_j) v_j^T`` of shape (B, H, F, D). Cost O(T (F D + C D)), memory
  O(T F + (T/C) F D); it never builds a (T, T) tensor. For the bilinear form ``phi(q1, q2) = q1 (x) q2``
  (``D^2`` features, no symmetry to exploit).
* ``fused`` (CUDA, Triton): the plain form's maths in one flash-style kernel that never writes the
  pattern to memory (:mod:`qtoy_core.ops.fused_quadratic`).

The running state is accumulated in float32 when the inputs are bfloat16/float16 (and in the input
dtype otherwise), so long prefixes do not lose the small late contributions to bf16 rounding.

:class:`QuadraticAttentionState` carries the same state token by token for generation: constant time
and memory per token, whatever the prefix length.

Performance note (CPU): the chunked form runs many more, smaller kernels than the plain one. When the
cores are shared with other busy processes, OpenMP's default spin-waiting makes every parallel region
stall while one of its threads is descheduled, which hits the chunked form far harder (measured 4-6x
slower at load average ~4-7 on 2 cores); ``OMP_WAIT_POLICY=PASSIVE`` in the environment, or fewer
torch threads, avoids it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .masks import causal_pattern

__all__ = [
    "CHUNKED_FROM_T",
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNKED_FEATURES",
    "QuadraticAttentionState",
    "feature_dim",
    "quadratic_attention",
    "symmetric_feature_pairs",
    "symmetric_features",
]

# ---------------------------------------------------------------------------------------------
# Dispatch constants, measured with benchmarks/attention_scaling.py on the development machine
# (2-core AMD EPYC with AVX-512 BF16, no AMX; torch 2.13 CPU; batch 1, 4 heads, forward + backward,
# median wall time of 3, 2 threads, quiet machine; 2026-11-27, after the plain form became the
# blocked kernel below).
#
# Crossover T (chunked faster from there on; log-interpolated between the measured powers of two,
# plain/chunked ratio in brackets):
#
#   form       d_head   F      fp32                          bf16
#   quadratic  32       528    ~2420 (0.79 @2048, 2.09 @4096) ~1540 (0.76 @1024, 1.22 @2048)
#   bilinear   32       1024   ~2390 (0.81 @2048, 2.10 @4096) ~1770 (0.69 @1024, 1.10 @2048)
#   quadratic  64       2080   ~5870 (0.60 @4096, 1.61 @8192) ~6100 (0.67 @4096, 1.34 @8192)
#   bilinear   64       4096   ~6970 (0.54 @4096, 1.20 @8192) ~7430 (0.57 @4096, 1.10 @8192)
#
# Why the crossover sits near T ~ D^2 for d_head 64: per token, the chunked form costs ~2 F D ~ D^3
# multiply-adds whatever T, while the blocked plain form costs ~T D (it skips the masked half), so
# the linear form only pulls ahead once T exceeds ~D^2 (4096 for D = 64, 1024 for D = 32). Against the
# textbook plain form (autograd ops over the full square, what qtoy ran before) the chunked form is
# 10-11x (d_head 32) and 2.2-2.9x (d_head 64) faster at T = 4096.
#
# These ran with glibc's malloc defaults, where the plain form's O(T^2) saved tensors are faulted in
# afresh on every call. With freed memory kept (what the qtoy command sets, qtoy_core.host_memory) the
# plain form gains most: crossovers ~2260 fp32 / < 2048 bf16 at d_head 32, ~6210 fp32 / ~7030 bf16 at
# d_head 64 (benchmarks/README.md). The table below stays: within ~15% of the faster form either way.
# ---------------------------------------------------------------------------------------------

#: ``impl="auto"`` crossover, keyed by the feature dimension F (D(D+1)/2 quadratic, D^2 bilinear):
#: the chunked form is used once the effective length ``2*Tq*Tk/(Tq+Tk)`` (= T for self-attention;
#: plain costs ~Tq*Tk, chunked ~(Tq+Tk)*F) reaches the value. The larger of the fp32 and bf16
#: crossovers above, rounded up to a multiple of 128; linear interpolation in F between the entries,
#: proportional below the first.
CHUNKED_FROM_T: dict[int, int] = {528: 2432, 1024: 2432, 2080: 6144, 4096: 7552}

#: ``impl="auto"`` uses the plain form whenever the feature dimension exceeds this (the chunked cost
#: grows like F*D per token, and larger F, e.g. bilinear d_head 128 with F = 16384, were not measured).
MAX_CHUNKED_FEATURES = 4096

#: Default chunk length of the chunked form (``chunk_size=None``): 256 measured best or within noise
#: of the best among 64/128/256/512 for d_head 32 and 64 at T = 4096, fp32 and bf16 (re-measured with
#: the blocked kernel inside the chunks: 64 is 1.4-1.6x slower, 128 and 512 within ~10%, either way).
DEFAULT_CHUNK_SIZE = 256

_SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------
# Feature maps
# ---------------------------------------------------------------------------------------------


def feature_dim(d_head: int, *, bilinear: bool = False) -> int:
    """Number of linear-attention features: D(D+1)/2 (quadratic) or D^2 (bilinear)."""
    return d_head * d_head if bilinear else d_head * (d_head + 1) // 2


def symmetric_feature_pairs(d: int, device=None) -> tuple[Tensor, Tensor]:
    """Index pairs ``(i, j)`` of the features of :func:`symmetric_features`, each a LongTensor (F,).

    Feature ``f`` equals ``x[i[f]] * x[j[f]]``, times ``sqrt(2)`` when ``i[f] != j[f]``. The order is by
    cyclic offset: first the diagonal ``(i, i)``, then ``(i, (i+s) mod d)`` for ``s = 1, 2, ...``
    (for even ``d`` the last offset ``s = d/2`` only for ``i < d/2``). Every unordered pair appears
    exactly once. To turn a feature vector ``f`` back into a symmetric matrix ``M`` with
    ``x^T M x = <f, phi(x)>``: ``M[i, j] = M[j, i] = f * (1 if i == j else 1/sqrt(2))``.
    """
    h = d // 2
    ii, jj = [], []
    ar = torch.arange(d)
    n_full = h if d % 2 else h - 1  # offsets 1..n_full use all d positions
    ii.append(ar)
    jj.append(ar)
    for s in range(1, n_full + 1):
        ii.append(ar)
        jj.append((ar + s) % d)
    if d % 2 == 0 and d >= 2:
        ii.append(ar[:h])
        jj.append(ar[:h] + h)
    i = torch.cat(ii)
    j = torch.cat(jj)
    return i.to(device), j.to(device)


def _sym_layout(d: int) -> tuple[int, int, bool]:
    """(h, number of full off-diagonal offsets, has a half last offset)."""
    h = d // 2
    even = d % 2 == 0 and d >= 2
    return h, (h - 1 if even else h), even


class _SymmetricFeatures(torch.autograd.Function):
    """phi(x) for the cyclic-offset layout of :func:`symmetric_feature_pairs`, with a hand-written
    backward (a handful of strided ops instead of autograd's gather/scatter, which is several times
    slower on CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        d = x.shape[-1]
        h, m, even = _sym_layout(d)
        f_dim = d * (d + 1) // 2
        out = x.new_empty(x.shape[:-1] + (f_dim,))
        torch.mul(x, x, out=out[..., :d])
        xs = x * _SQRT2
        if m > 0:
            xx = torch.cat([x, x], dim=-1)
            win = xx.unfold(-1, d, 1)[..., 1 : m + 1, :]  # win[..., s-1, i] = x[(i+s) % d]
            mid = out[..., d : d + m * d].unflatten(-1, (m, d))
            torch.mul(xs.unsqueeze(-2), win, out=mid)
        if even:
            torch.mul(xs[..., :h], x[..., h:], out=out[..., d + m * d :])
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        # phi[0, i] = x_i^2, phi[s, i] = sqrt2 x_i x_{(i+s) % d} (s = 1..m), last half row (even d)
        # phi[h, i] = sqrt2 x_i x_{i+h} (i < h). d/dx_i collects g[s, i] x_{i+s} (i is the first
        # factor, "aligned") and g[s, i-s] x_{i-s} (i is the second factor, "skewed").
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiable ops (the kernels below work in place)
            with torch.enable_grad():
                return torch.autograd.grad(_symmetric_features_functional(x), x, g, create_graph=True)[0]
        d = x.shape[-1]
        h, m, even = _sym_layout(d)
        xs = x * _SQRT2
        dx = 2.0 * g[..., :d] * x
        if m > 0:
            gm = g[..., d : d + m * d].unflatten(-1, (m, d))  # gm[..., s-1, i]: pair (i, i+s)
            # pp = [P | P] with P[s-1, i] = g[s, i] sqrt2 x_i; the skewed view
            # skew[s-1, j] = pp[s-1, j - s + d] = P[s-1, (j - s) % d] sums over s to the skewed part
            pp = x.new_empty(x.shape[:-1] + (m, 2 * d))
            torch.mul(gm, xs.unsqueeze(-2), out=pp[..., :d])
            pp[..., d:].copy_(pp[..., :d])
            skew = pp.as_strided(pp.shape[:-2] + (m, d), pp.stride()[:-2] + (2 * d - 1, 1), d - 1)
            # add the aligned part in place (no temporary): skew[s-1, i] += g[s, i] sqrt2 x_{i+s}
            xx = torch.cat([xs, xs], dim=-1)
            win = xx.unfold(-1, d, 1)[..., 1 : m + 1, :]  # win[..., s-1, i] = sqrt2 x_{(i+s) % d}
            skew.addcmul_(gm, win)
            dx = dx + skew.sum(-2)
        if even:
            gh = g[..., d + m * d :]
            dx[..., :h].addcmul_(gh, xs[..., h:])
            dx[..., h:].addcmul_(gh, xs[..., :h])
        return dx


def symmetric_features(x: Tensor) -> Tensor:
    """Symmetric outer-product feature map, last dim D -> D(D+1)/2.

    ``<symmetric_features(a), symmetric_features(b)> == (a . b) ** 2`` exactly: the features are the
    products ``x_i x_j`` over unordered pairs, with ``sqrt(2)`` on the off-diagonal ones. The feature
    order is given by :func:`symmetric_feature_pairs`. Differentiable (hand-written backward).
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # out= into strided views graph-breaks dynamo, and torch.func transforms tensor ops: a
        # functional version instead, whose backward autograd derives (and the compiler fuses)
        return _symmetric_features_functional(x)
    return _SymmetricFeatures.apply(x)


def _symmetric_features_functional(x: Tensor) -> Tensor:
    """Same values and layout as :class:`_SymmetricFeatures`, from differentiable tensor ops only."""
    d = x.shape[-1]
    h, m, even = _sym_layout(d)
    xs = x * _SQRT2
    parts = [x * x]
    if m > 0:
        win = torch.cat([x, x], dim=-1).unfold(-1, d, 1)[..., 1 : m + 1, :]
        parts.append((xs.unsqueeze(-2) * win).flatten(-2))
    if even:
        parts.append(xs[..., :h] * x[..., h:])
    return torch.cat(parts, dim=-1)


def _bilinear_features(x1: Tensor, x2: Tensor) -> Tensor:
    """phi(x1, x2) = x1 (x) x2, flattened (feature f = i*D + j is x1_i x2_j)."""
    return (x1.unsqueeze(-1) * x2.unsqueeze(-2)).flatten(-2)


def _features(x: Tensor, x2: Tensor | None) -> Tensor:
    return symmetric_features(x) if x2 is None else _bilinear_features(x, x2)


# ---------------------------------------------------------------------------------------------
# Plain (materialised) form, in blocks of query rows
# ---------------------------------------------------------------------------------------------


def _plain(q, k, v, scale, q2, k2, docs=None) -> Tensor:
    """``docs``: None, or (query docs, key docs) with q's and k's shapes minus the last axis, where
    any leading axis may be 1 (broadcast, e.g. over heads): a key is seen only by the queries of its
    document."""
    doc_q, doc_k = (None, None) if docs is None else docs
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vmap, jacrev, ...) transforms tensor ops, not a hand-written backward
        return _plain_autograd(q, k, v, scale, q2, k2, docs)
    device = q.device.type
    if _autocast_enabled(device):
        # autocast's rule for matmuls (run them in its lower precision), applied to the kernel's
        # inputs once; inside, the kernel keeps its own dtypes
        low = torch.get_autocast_dtype(device)
        q, k, v, q2, k2 = (_autocast_cast(x, low) for x in (q, k, v, q2, k2))
        with torch.autocast(device, enabled=False):
            return _CausalBlocked.apply(q, k, v, q2, k2, scale, doc_q, doc_k)
    return _CausalBlocked.apply(q, k, v, q2, k2, scale, doc_q, doc_k)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        return False


def _autocast_cast(x: Tensor | None, low: torch.dtype) -> Tensor | None:
    """What autocast does to a matmul input: floating tensors other than float64 go to ``low``."""
    if x is None or not x.is_floating_point() or x.dtype == torch.float64:
        return x
    return x.to(low)


def _plain_autograd(q, k, v, scale, q2, k2, docs=None) -> Tensor:
    """The plain form as differentiable tensor ops over the full (Tq, Tk) square: slower than the
    blocked kernel, but its gradients are differentiable again (``create_graph=True``) and
    torch.func can transform it. ``impl="autograd"``."""
    scores = (q @ k.transpose(-1, -2)) * scale
    pattern = scores.square() if q2 is None else scores * ((q2 @ k2.transpose(-1, -2)) * scale)
    pattern = causal_pattern(pattern)
    if docs is not None:
        pattern = pattern.masked_fill(docs[0][..., :, None] != docs[1][..., None, :], 0.0)
    return pattern @ v


#: Query rows per block of the plain form (see :class:`_CausalBlocked`), by input dtype: the fastest,
#: or within noise of it, of 32/64/128/256 in benchmarks/attention_scaling.py --blocks (T 256-1024,
#: d_head 32/64, 2 threads, three runs).
BLOCK_ROWS = {torch.float32: 64, torch.float64: 64, torch.bfloat16: 128, torch.float16: 128}


def _row_blocks(tq: int, tk: int, rows: int) -> list[tuple[int, int, int]]:
    """(first row, end row, keys seen) per block of query rows: rows [a, b) see keys [0, e)."""
    return [(a, min(a + rows, tq), tk - tq + min(a + rows, tq)) for a in range(0, tq, rows)]


class _CausalBlocked(torch.autograd.Function):
    """Plain causal quadratic/bilinear attention in blocks of query rows, with a hand-written backward.

    Block ``[a, b)`` of query rows only multiplies the keys it can see (``[0, e)``), so the score and
    pattern matmuls skip the zero upper triangle (about 5/8 of the FLOPs of the full square at 4
    blocks), and only the lower blocks are kept for the backward. The scale is folded into the
    matmuls (``alpha``), the causal mask is one in-place ``tril_`` of the scores, and the backward
    multiplies ``dP`` by the saved (masked) scores in place: autograd's version of the same maths
    made ~6 extra passes over (T, T) tensors. Measured forward+backward at n_ctx 256, d_head 64:
    ~1.9x faster than autograd's form in fp32 and ~1.5x in bf16, and faster than softmax SDPA
    (benchmarks/README.md). Gradients of half-precision inputs are accumulated over blocks in
    float32. torch.compile traces it without a graph break (tested) and the compiled training
    step was 4-9% faster with it than with the same maths written as autograd ops.
    """

    @staticmethod
    def forward(ctx, q, k, v, q2, k2, scale, doc_q=None, doc_k=None):  # type: ignore[override]
        tq, tk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
        lead = q.shape[:-2]
        # leading dims (batch, heads[, chunks]) -> one batch dim; flatten (not reshape(-1, ...)) so
        # that an empty batch works too
        q3, k3, v3 = q.flatten(0, -3), k.flatten(0, -3), v.flatten(0, -3)
        bilinear = q2 is not None
        q23 = q2.flatten(0, -3) if bilinear else None
        k23 = k2.flatten(0, -3) if bilinear else None
        # z is returned whole (not a view of the kernel's buffer), so hooks may edit it in place
        z = q.new_empty(*q.shape[:-1], dv)
        z3 = z.flatten(0, -3)
        blocks = _row_blocks(tq, tk, BLOCK_ROWS.get(q.dtype, 64))
        keep = any(ctx.needs_input_grad[:5])  # without a backward, each block is freed at once
        saved = []
        for a, b, e in blocks:
            # documents: the scores of keys in another document are zeroed like those above the
            # diagonal, so the pattern, and the backward (which multiplies by the saved scores), skip them
            other = None if doc_q is None else doc_q[..., a:b, None] != doc_k[..., None, :e]
            s1 = _masked_scores(q3[:, a:b], k3[:, :e], scale, e - (b - a), lead, other)
            if bilinear:
                s2 = _masked_scores(q23[:, a:b], k23[:, :e], scale, e - (b - a), lead, other)
                p = s1 * s2
                blk = [s1, s2, p]
            else:
                p = s1.square()
                blk = [s1, p]
            z3[:, a:b].baddbmm_(p, v3[:, :e], beta=0)
            if keep:
                saved += blk
        ctx.save_for_backward(q, k, v, q2, k2, doc_q, doc_k, *saved)
        ctx.scale, ctx.blocks = scale, blocks
        return z

    @staticmethod
    def backward(ctx, dz):  # type: ignore[override]
        q, k, v, q2, k2, doc_q, doc_k, *saved = ctx.saved_tensors
        docs = None if doc_q is None else (doc_q, doc_k)
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must be differentiable again, so they are taken
            # through the autograd form on the saved inputs instead of the in-place kernels below
            return (*_differentiable_grads((q, k, v, q2, k2), ctx.needs_input_grad[:5], dz, ctx.scale, docs),
                    None, None, None)
        q3, k3, v3 = q.flatten(0, -3), k.flatten(0, -3), v.flatten(0, -3)
        bilinear = q2 is not None
        q23 = q2.flatten(0, -3) if bilinear else None
        k23 = k2.flatten(0, -3) if bilinear else None
        dz3 = dz.reshape(q3.shape[0], q3.shape[1], v3.shape[-1])
        acc = _acc_dtype(q3.dtype)
        dq, dk, dv = torch.empty_like(q3), torch.zeros_like(k3, dtype=acc), torch.zeros_like(v3, dtype=acc)
        dq2 = torch.empty_like(q3) if bilinear else None
        dk2 = torch.zeros_like(k3, dtype=acc) if bilinear else None
        per = 3 if bilinear else 2
        for i, (a, b, e) in enumerate(ctx.blocks):
            if bilinear:
                s1, s2, p = saved[per * i: per * i + per]
            else:
                s1, p = saved[per * i: per * i + per]
            dzb = dz3[:, a:b]
            _accumulate(dv[:, :e], p.transpose(1, 2), dzb, 1.0)
            dp = torch.bmm(dzb, v3[:, :e].transpose(1, 2))
            if bilinear:
                # d pattern / d s1 = s2 and vice versa; both are masked, so both products are too
                ds1 = dp * s2
                dp.mul_(s1)
                _write_grads(dq, dk, a, b, e, ds1, q3, k3, ctx.scale)
                _write_grads(dq2, dk2, a, b, e, dp, q23, k23, ctx.scale)
            else:
                dp.mul_(s1)  # d s^2 = 2 s ds: the 2 goes into the matmul's alpha
                _write_grads(dq, dk, a, b, e, dp, q3, k3, 2.0 * ctx.scale)
        out = [dq.view(q.shape), dk.to(k.dtype).view(k.shape), dv.to(v.dtype).view(v.shape)]
        out += [dq2.view(q.shape), dk2.to(k.dtype).view(k.shape)] if bilinear else [None, None]
        return (*out, None, None, None)


def _differentiable_grads(inputs, needs_grad, dz, scale, docs=None) -> list[Tensor | None]:
    """Gradients of the plain form's inputs for ``dz``, built from differentiable ops (for
    ``create_graph=True``); None for inputs that need none."""
    wanted = [x for x, need in zip(inputs, needs_grad) if x is not None and need]
    with torch.enable_grad():
        z = _plain_autograd(inputs[0], inputs[1], inputs[2], scale, inputs[3], inputs[4], docs)
        grads = iter(torch.autograd.grad(z, wanted, dz, create_graph=True, allow_unused=True))
    return [next(grads) if x is not None and need else None for x, need in zip(inputs, needs_grad)]


def _masked_scores(q: Tensor, k: Tensor, scale: float, diagonal: int, lead=None, other: Tensor | None = None) -> Tensor:
    """scale * q @ k^T with the entries above ``diagonal`` zeroed, (n, rows, keys); also those where
    ``other`` (broadcast over the leading dims ``lead`` that flatten into n) is True."""
    s = torch.baddbmm(q.new_empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(1, 2), beta=0, alpha=scale)
    s.tril_(diagonal)
    if other is not None:
        s.view(*lead, s.shape[1], s.shape[2]).masked_fill_(other, 0.0)
    return s


def _accumulate(out: Tensor, a: Tensor, b: Tensor, alpha: float) -> None:
    """out += alpha * a @ b (batched); through a temporary when ``out`` is a wider accumulator."""
    if out.dtype == a.dtype:
        out.baddbmm_(a, b, alpha=alpha)
    else:
        out.add_(torch.bmm(a, b), alpha=alpha)


def _write_grads(dq, dk, a, b, e, ds, q, k, alpha) -> None:
    """``dq[a:b] = alpha * ds @ k[:e]`` and ``dk[:e] += alpha * ds^T @ q[a:b]``, where ``ds`` is the
    gradient of the block's scores without its constant factor ``alpha`` (the scale, times 2 for a
    square)."""
    dq[:, a:b].baddbmm_(ds, k[:, :e], beta=0, alpha=alpha)
    _accumulate(dk[:, :e], ds.transpose(1, 2), q[:, a:b], alpha)


# ---------------------------------------------------------------------------------------------
# Chunked (linear-time) form
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _exclusive_prefix_matrix(n: int, m: int, dtype, device) -> Tensor:
    """(n, m) with entry [i, j] = 1 for j < i: ``L @ states`` sums the states of earlier chunks."""
    return torch.ones(n, m, dtype=dtype, device=device).tril_(-1)


def _chunk_states(phik: Tensor, v: Tensor, acc: torch.dtype) -> Tensor:
    """Transposed state of a chunk, sum_j v_j phi(k_j)^T: (..., c, F), (..., c, D) -> (..., D, F), in
    ``acc``. (States are kept as (D, F) internally: then the gradients of the features come out of
    the matmuls contiguous, which the feature backward wants.)"""
    return (v.transpose(-1, -2) @ phik).to(acc)


def _group(qc, q2c, kc, k2c, vc, state, acc, need_state: bool, carry: str):
    """Chunked attention for n chunks at once; inputs (B, H, n, c, D), already scaled queries.

    ``state`` (B, H, D, F) (transposed) or None: keys before the first chunk. Returns z (B, H, n, c, D)
    and the (transposed) state after the last chunk (None unless ``need_state``).
    """
    n = qc.shape[2]
    c = qc.shape[3]
    # exact masked quadratic form inside each chunk (queries already scaled)
    z = _plain(qc, kc, vc, 1.0, q2c, k2c)
    if n == 1 and state is None and not need_state:
        return z, None
    # per-chunk states; the last chunk's own state is only needed for the state after the group
    n_st = n if need_state else n - 1
    st = None
    if n_st > 0:
        st = _chunk_states(_features(kc[:, :, :n_st], None if k2c is None else k2c[:, :, :n_st]), vc[:, :, :n_st], acc)
    # state seen by each chunk: initial state + all earlier chunks of the group
    if st is None:
        prev = state.unsqueeze(2)
    else:
        b, h, _, d_v, f_dim = st.shape
        if carry == "cumsum":
            prev = torch.nn.functional.pad(st[:, :, : n - 1].cumsum(2), (0, 0, 0, 0, 1, 0))
        else:  # "matmul": one (n, n_st) triangular matmul, a single pass over the states
            lmat = _exclusive_prefix_matrix(n, n_st, acc, st.device)
            with torch.autocast(st.device.type, enabled=False):  # keep the sum in ``acc``
                prev = (lmat @ st.flatten(-2)).unflatten(-1, (d_v, f_dim))
        if state is not None:
            prev = prev + state.unsqueeze(2)
    phiq = _features(qc, q2c)
    z = z + phiq @ prev.to(phiq.dtype).transpose(-1, -2)
    new_state = None
    if need_state:
        new_state = prev[:, :, -1] + st[:, :, -1]
    return z, new_state


#: The chunked form processes several chunks at once (vectorised), as many as keep the feature tensor
#: of a group (batch * heads * tokens * F elements) under this many bytes: fewer, larger kernels
#: (which matters when the 2 cores are shared), while each temporary stays small enough to be served
#: from the allocator's free lists and caches (larger groups measured slower on this CPU).
GROUP_BYTES = 16 * 2**20


def _group_chunks(batch_heads: int, chunk: int, f_dim: int, itemsize: int) -> int:
    return max(1, GROUP_BYTES // max(1, batch_heads * chunk * f_dim * itemsize))


def _chunked(q, k, v, scale, q2, k2, chunk_size: int, state: Tensor | None = None, *,
             need_state: bool = False, carry: str = "matmul", group_chunks: int | None = None,
             doc: Tensor | None = None, state_doc: Tensor | None = None):
    """Chunked causal quadratic/bilinear attention.

    Chunks are aligned on absolute positions (multiples of ``chunk_size`` from key 0). Chunks that hold
    no query only feed the state. The others are processed ``group_chunks`` at a time, all chunks of
    a group at once (the state seen by each chunk is the initial state plus an exclusive prefix sum
    of the chunk states, by a triangular matmul or a cumsum: ``carry``); ``carry="loop"`` processes
    one chunk at a time instead. ``state`` (B, H, F, D): keys that precede ``k``. Returns
    ``(z, final_state)`` (final_state None unless ``need_state``; in the accumulation dtype, float32
    for half-precision inputs).
    """
    if doc is not None:
        return _chunked_docs(q, k, v, scale, q2, k2, int(chunk_size), state, doc, state_doc,
                             need_state=need_state, group_chunks=1 if carry == "loop" else group_chunks)
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    prefix = tk - tq
    c = int(chunk_size)
    acc = _acc_dtype(torch.promote_types(q.dtype, v.dtype))
    if state is not None:
        acc = torch.promote_types(acc, state.dtype)
    f_dim = feature_dim(d, bilinear=q2 is not None)
    if carry == "loop":
        group = 1
    elif group_chunks:
        group = int(group_chunks)
    else:
        group = _group_chunks(b * h, c, f_dim, q.element_size())
    if state is not None:
        state = state.transpose(-1, -2).to(acc)  # internal layout (B, H, D, F)
    if tq == 0:
        # no query: an empty output, still connected to the inputs (their gradients are zeros)
        z = q.new_zeros(b, h, 0, v.shape[-1]) + 0 * sum(x.sum() for x in (q, k, v, q2, k2) if x is not None)
        return z, None if state is None else state.transpose(-1, -2)
    # keys before the first chunk holding a query: state only
    pre = (prefix // c) * c
    for g0 in range(0, pre, c * group):
        g1 = min(g0 + c * group, pre)
        k2s = None if k2 is None else k2[:, :, g0:g1]
        st = _chunk_states(_features(k[:, :, g0:g1], k2s), v[:, :, g0:g1], acc)
        state = st if state is None else state + st
    # the rest, chunked; queries front-padded so that row r of the padded block is position pre + r
    lead = prefix - pre
    length = tk - pre
    n = -(-length // c)
    pad_end = n * c - length

    def blocks(x, front=0):
        x = torch.nn.functional.pad(x, (0, 0, front, pad_end)) if (front or pad_end) else x
        return x.unflatten(-2, (n, c))

    qb = blocks(q * scale, lead)
    q2b = None if q2 is None else blocks(q2 * scale, lead)
    kb, vb = blocks(k[:, :, pre:]), blocks(v[:, :, pre:])
    k2b = None if k2 is None else blocks(k2[:, :, pre:])
    outs = []
    for g0 in range(0, n, group):
        g1 = min(g0 + group, n)
        last = g1 == n
        zg, new_state = _group(
            qb[:, :, g0:g1], None if q2b is None else q2b[:, :, g0:g1],
            kb[:, :, g0:g1], None if k2b is None else k2b[:, :, g0:g1], vb[:, :, g0:g1],
            state, acc, need_state or not last, carry,
        )
        outs.append(zg)
        state = new_state
    z = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    z = z.flatten(2, 3)
    if lead or pad_end:
        z = z[:, :, lead : lead + tq]
    return z, None if state is None else state.transpose(-1, -2)


def _chunked_docs(q, k, v, scale, q2, k2, c: int, state: Tensor | None, doc: Tensor, state_doc: Tensor | None, *,
                  need_state: bool, group_chunks: int | None):
    """`_chunked` with documents: ``doc`` (B, Tk) int, nondecreasing along each row (every document
    one run of positions), the queries' documents the last Tq entries; ``state`` holds keys of
    document ``state_doc`` (B,) (default: the first key's).

    The state carried into chunk n is the state of the document open at the chunk's first position
    (its keys before the chunk); a query of the chunk reads it only if it belongs to that document,
    and inside the chunk the exact masked form sees only keys of the query's own document. Chunk m
    passes on its "tail" state, the keys of the document of its last position (all its keys when it
    holds no boundary). Since documents are runs, the keys before chunk n that belong to the
    document ``t`` open at its start are the incoming state (when ``t`` is its document) plus the
    tails of the earlier chunks whose last position lies in ``t``: one gated (n, m) sum per group,
    so a chunk holding a boundary restarts the state from the keys after its last boundary.
    """
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    prefix = tk - tq
    acc = _acc_dtype(torch.promote_types(q.dtype, v.dtype))
    if state is not None:
        acc = torch.promote_types(acc, state.dtype)
    doc = torch.as_tensor(doc, device=k.device).to(torch.int64)
    if doc.shape != (b, tk):
        raise ValueError(f"doc_ids must be (batch, Tk) = {(b, tk)}, got {tuple(doc.shape)}")
    f_dim = feature_dim(d, bilinear=q2 is not None)
    group = int(group_chunks) if group_chunks else _group_chunks(b * h, c, f_dim, q.element_size())
    if state is not None:
        state = state.transpose(-1, -2).to(acc)  # internal layout (B, H, D, F)
    if state_doc is None:
        state_doc = doc[:, 0] if tk else doc.new_zeros(b)
    if tq == 0:
        z = q.new_zeros(b, h, 0, v.shape[-1]) + 0 * sum(x.sum() for x in (q, k, v, q2, k2) if x is not None)
        return z, None if state is None else state.transpose(-1, -2)
    n = -(-tk // c)
    if n == 1 and state is None and not need_state:  # one chunk, nothing carried: the masked exact form
        return _plain(q * scale, k, v, 1.0, None if q2 is None else q2 * scale, k2,
                      docs=(doc[:, None, prefix:], doc[:, None])), None
    pad_end = n * c - tk
    # padded keys have zero keys and values (they add nothing) and the last key's document (so a
    # chunk's last position is in the document of its last real key)
    docb = torch.cat([doc, doc[:, -1:].expand(b, pad_end)], 1).unflatten(1, (n, c))  # (B, n, c)
    first, last = docb[:, :, 0], docb[:, :, -1]

    def blocks(x, front=0):
        x = torch.nn.functional.pad(x, (0, 0, front, pad_end)) if (front or pad_end) else x
        return x.unflatten(-2, (n, c))

    kb, vb = blocks(k), blocks(v)
    k2b = None if k2 is None else blocks(k2)
    first_q = prefix // c  # chunks before this one hold no query: they only feed the state
    lead = prefix - first_q * c
    qb = blocks(q * scale, prefix)[:, :, first_q:]
    q2b = None if q2 is None else blocks(q2 * scale, prefix)[:, :, first_q:]

    def tails(g0: int, g1: int) -> Tensor:
        """(B, H, g, D, F): each chunk's keys in the document of its last position."""
        own = (docb[:, g0:g1] == last[:, g0:g1, None]).to(vb.dtype)[:, None, :, :, None]
        phik = _features(kb[:, :, g0:g1], None if k2b is None else k2b[:, :, g0:g1])
        return _chunk_states(phik, vb[:, :, g0:g1] * own, acc)

    def seen(target: Tensor, g0: int, g1: int, st: Tensor, strict: bool) -> Tensor:
        """(B, H, t, D, F): the incoming state plus the tails of chunks g0..g1-1 whose last document
        is ``target`` (B, t) (``strict``: only chunks before the target chunk, target t = chunk g0 + t)."""
        gate = last[:, None, g0:g1] == target[:, :, None]  # (B, t, m)
        if strict:
            gate = gate & torch.ones(gate.shape[1], gate.shape[2], dtype=torch.bool, device=gate.device).tril_(-1)
        with torch.autocast(st.device.type, enabled=False):  # keep the sum in ``acc``
            out = torch.einsum("btm,bhmx->bhtx", gate.to(acc), st.flatten(-2)).unflatten(-1, st.shape[-2:])
        if state is not None:
            keep = (target == state_doc[:, None]).to(acc)[:, None, :, None, None]
            out = out + keep * state.unsqueeze(2)
        return out

    # keys before the first chunk holding a query: state only
    for g0 in range(0, first_q, group):
        g1 = min(g0 + group, first_q)
        target = first[:, g1:g1 + 1]
        state, state_doc = seen(target, g0, g1, tails(g0, g1), strict=False)[:, :, 0], target[:, 0]
    outs = []
    for g0 in range(first_q, n, group):
        g1 = min(g0 + group, n)
        sl = slice(g0 - first_q, g1 - first_q)
        qc, q2c = qb[:, :, sl], None if q2b is None else q2b[:, :, sl]
        kc, k2c, vc = kb[:, :, g0:g1], None if k2b is None else k2b[:, :, g0:g1], vb[:, :, g0:g1]
        dc = docb[:, None, g0:g1]  # (B, 1, g, c): queries sit at the keys' positions
        z = _plain(qc, kc, vc, 1.0, q2c, k2c, docs=(dc, dc))
        st = tails(g0, g1)
        prev = seen(first[:, g0:g1], g0, g1, st, strict=True)
        reads = (dc == first[:, None, g0:g1, None]).to(z.dtype)[..., None]  # the query is in the open document
        phiq = _features(qc, q2c)
        z = z + reads * (phiq @ prev.to(phiq.dtype).transpose(-1, -2))
        outs.append(z)
        if g1 < n or need_state:
            target = first[:, g1:g1 + 1] if g1 < n else last[:, -1:]
            state, state_doc = seen(target, g0, g1, st, strict=False)[:, :, 0], target[:, 0]
    z = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    z = z.flatten(2, 3)[:, :, lead:lead + tq]
    return z, None if (state is None or not need_state) else state.transpose(-1, -2)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, q2, k2):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (batch, heads, time, d_head)")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v disagree on time: {k.shape[-2]} vs {v.shape[-2]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k disagree on d_head: {q.shape[-1]} vs {k.shape[-1]}")
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(f"Tq={q.shape[-2]} > Tk={k.shape[-2]}: queries need their keys")
    if (q2 is None) != (k2 is None):
        raise ValueError("q2 and k2 must be given together (bilinear form) or not at all")
    if q2 is not None and (q2.shape != q.shape or k2.shape != k.shape):
        raise ValueError("q2/k2 must have the shapes of q/k")


def _apply_key_mask(v: Tensor, key_mask) -> Tensor:
    if key_mask is None:
        return v
    key_mask = torch.as_tensor(key_mask, device=v.device)
    if key_mask.shape != (v.shape[0], v.shape[-2]):
        raise ValueError(f"key_mask must be (batch, Tk) = {(v.shape[0], v.shape[-2])}, got {tuple(key_mask.shape)}")
    keep = key_mask.to(torch.bool)[:, None, :, None]
    # a padded key multiplies a zero value: it contributes nothing (and no gradient flows to it)
    return v.masked_fill(~keep, 0.0)


def _check_doc_ids(doc_ids, k: Tensor) -> Tensor:
    doc_ids = torch.as_tensor(doc_ids, device=k.device)
    if doc_ids.shape != (k.shape[0], k.shape[-2]):
        raise ValueError(f"doc_ids must be (batch, Tk) = {(k.shape[0], k.shape[-2])}, got {tuple(doc_ids.shape)}")
    if doc_ids.is_floating_point() or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be integer document indices, not {doc_ids.dtype}")
    return doc_ids


def _crossover_t(f_dim: int) -> float:
    """Effective length from which ``impl="auto"`` picks the chunked form (see CHUNKED_FROM_T)."""
    table = sorted(CHUNKED_FROM_T.items())
    f0, t0 = table[0]
    if f_dim <= f0:
        return t0 * f_dim / f0
    for (fa, ta), (fb, tb) in zip(table, table[1:]):
        if f_dim <= fb:
            return ta + (tb - ta) * (f_dim - fa) / (fb - fa)
    fl, tl = table[-1]
    return tl * f_dim / fl


def _use_chunked(tq: int, tk: int, d: int, bilinear: bool) -> bool:
    f_dim = feature_dim(d, bilinear=bilinear)
    if f_dim > MAX_CHUNKED_FEATURES:
        return False
    effective = 2 * tq * tk / max(tq + tk, 1)
    return effective >= _crossover_t(f_dim)


def _fused_fits(q, k, v, q2, k2) -> bool:
    """``impl="auto"`` on CUDA: whether the fused kernel takes these inputs (Triton present, dtype,
    head size; see :func:`qtoy_core.ops.fused_quadratic.fused_supports`)."""
    from .fused_quadratic import fused_supports

    return fused_supports(q, k, v, q2, k2)


def quadratic_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    q2: Tensor | None = None,
    k2: Tensor | None = None,
    key_mask: Tensor | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    doc_ids: Tensor | None = None,
) -> Tensor:
    """Causal quadratic (or, with ``q2``/``k2``, bilinear) attention.

    Args:
        q: (B, H, Tq, D) queries; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k, v: (B, H, Tk, D) keys/values, key ``j`` at position ``j``. Causal: a query at position
            ``p`` sees the keys ``j <= p``.
        scale: multiplies each ``q.k`` before squaring (typically ``1/d_head``).
        q2, k2: second query/key pair (same shapes as q/k): bilinear pattern
            ``((q.k)*scale) * ((q2.k2)*scale)``.
        key_mask: optional (B, Tk) bool or 0/1; False/0 marks a padding key that contributes nothing.
        impl: ``"plain"`` (materialise the pattern, blocked kernel), ``"chunked"`` (linear time),
            ``"fused"`` (the Triton kernel of :mod:`qtoy_core.ops.fused_quadratic`: CUDA tensors, or
            CPU ones under ``TRITON_INTERPRET=1``), or ``"auto"``: on CUDA the fused kernel wherever
            Triton imports and it takes the inputs (fp16/bf16/fp32, d_head <= 128; a rule from the
            design, not yet measured: it awaits the GPU figures of benchmarks/gpu_check.sh); else
            chunked once the effective length ``2*Tq*Tk/(Tq+Tk)`` (T for self-attention)
            reaches the crossover measured for this feature dimension (:data:`CHUNKED_FROM_T`), plain
            otherwise and whenever F > :data:`MAX_CHUNKED_FEATURES`. ``"autograd"``: the plain form
            as tensor ops over the full square, slower. All forms support ``create_graph=True``
            (higher-order gradients go through the autograd form) and torch.func transforms (which
            switch ``plain`` to the autograd form by themselves).
        chunk_size: chunk length of the chunked form (default :data:`DEFAULT_CHUNK_SIZE`).
        doc_ids: optional (B, Tk) int, the document of every key (the queries' are the last Tq
            entries): key ``j`` is visible to query ``i`` iff ``j <= i`` and both are in one
            document, so attention never crosses a document boundary (packed rows). Each row's ids
            must be nondecreasing (every document one run, as `qtoy_core.ops.masks.document_ids`
            gives): the chunked form resets its running state where they change.

    Returns:
        z: (B, H, Tq, D).
    """
    _check_inputs(q, k, v, q2, k2)
    v = _apply_key_mask(v, key_mask)
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    docs = None
    if doc_ids is not None:
        doc_ids = _check_doc_ids(doc_ids, k)
        docs = (doc_ids[:, None, tk - tq:], doc_ids[:, None])  # broadcast over heads
    if impl == "auto":
        if q.is_cuda and _fused_fits(q, k, v, q2, k2):
            impl = "fused"
        else:
            impl = "chunked" if _use_chunked(tq, tk, d, q2 is not None) else "plain"
    if impl == "fused":
        from .fused_quadratic import fused_quadratic_attention  # imports Triton: only when asked for

        return fused_quadratic_attention(q, k, v, scale=scale, q2=q2, k2=k2, doc_ids=doc_ids)
    if impl == "plain":
        return _plain(q, k, v, scale, q2, k2, docs)
    if impl == "autograd":
        return _plain_autograd(q, k, v, scale, q2, k2, docs)
    if impl == "chunked":
        c = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
        if c < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        z, _ = _chunked(q, k, v, scale, q2, k2, c, doc=doc_ids)
        return z
    raise ValueError(f"impl must be 'auto', 'plain', 'chunked', 'fused' or 'autograd', got {impl!r}")


# ---------------------------------------------------------------------------------------------
# Recurrent state for generation
# ---------------------------------------------------------------------------------------------


class QuadraticAttentionState:
    """Running state of causal quadratic (or bilinear) attention for token-by-token generation.

    Holds ``S = sum_j phi(k_j) v_j^T`` (B, H, F, D) over every key seen so far; a new query reads
    ``z = phi(q)^T S * scale^2``. Time and memory per token are constant (F*D per head) whatever the
    prefix length. ``S`` is kept in ``dtype`` (float32 by default, also for bf16 models); outputs
    come back in the dtype of ``v``.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        d_head: int,
        *,
        bilinear: bool = False,
        dtype=torch.float32,
        device=None,
    ):
        self.batch, self.heads, self.d_head = batch, heads, d_head
        self.bilinear = bilinear
        self.dtype = dtype
        self.features = feature_dim(d_head, bilinear=bilinear)
        self.state_size: int = self.features * d_head
        # kept transposed, (B, H, D, F), like the chunked kernel; ``S`` is the (B, H, F, D) view
        self._st = torch.zeros(batch, heads, d_head, self.features, dtype=dtype, device=device)
        self.length = 0  # number of keys absorbed
        # with documents: the document (B,) whose keys the state holds; a row whose next token opens
        # another document starts again from zero (None: no document given yet)
        self.doc: Tensor | None = None

    @property
    def S(self) -> Tensor:
        """The state ``sum_j phi(k_j) v_j^T``, (B, H, F, D) (a view)."""
        return self._st.transpose(-1, -2)

    @S.setter
    def S(self, value: Tensor) -> None:
        self._st = value.transpose(-1, -2).to(self.dtype).contiguous()

    def reset(self) -> None:
        self._st = torch.zeros_like(self._st)
        self.length = 0
        self.doc = None

    def _check(self, q, k, v, q2, k2):
        _check_inputs(q, k, v, q2, k2)
        if (q2 is not None) != self.bilinear:
            raise ValueError("q2/k2 must be given exactly when the state is bilinear")
        want = (self.batch, self.heads, self.d_head)
        got = (k.shape[0], k.shape[1], k.shape[-1])
        if got != want or v.shape[-1] != self.d_head:
            raise ValueError(f"expected (batch, heads, d_head) = {want}, got {got}")

    def prefill(self, q, k, v, *, scale, q2=None, k2=None, key_mask=None, doc_ids=None) -> Tensor:
        """Process a whole prompt (B, H, T, D) on top of the current state; returns z for every
        position (as :func:`quadratic_attention`) and leaves the state after the last position.
        ``doc_ids`` (B, T): the new tokens' documents, numbered on from those of earlier calls; a
        row's state restarts where a new document begins, and afterwards holds the keys of the
        document of its last token."""
        self._check(q, k, v, q2, k2)
        v = _apply_key_mask(v, key_mask)
        if doc_ids is not None:
            doc_ids = _check_doc_ids(doc_ids, k).to(torch.int64)
            state_doc = self.doc if self.doc is not None else doc_ids[:, 0]
            z, state = _chunked(q, k, v, scale, q2, k2, DEFAULT_CHUNK_SIZE, state=self.S, need_state=True,
                                doc=doc_ids, state_doc=state_doc)
            if k.shape[-2]:
                self.doc = doc_ids[:, -1]
        else:
            z, state = _chunked(q, k, v, scale, q2, k2, DEFAULT_CHUNK_SIZE, state=self.S, need_state=True)
        self.S = state
        self.length += k.shape[-2]
        return z.to(v.dtype)

    def step(self, q, k, v, *, scale, q2=None, k2=None, doc_ids=None) -> Tensor:
        """One token: q, k, v (B, H, 1, D). Adds ``phi(k) v^T`` to the state and returns
        ``z = phi(q)^T S * scale^2`` for this position (the token sees itself). ``doc_ids`` (B, 1):
        the token's document; a row whose token opens a new document first empties its state."""
        self._check(q, k, v, q2, k2)
        if q.shape[-2] != 1 or k.shape[-2] != 1:
            return self.prefill(q, k, v, scale=scale, q2=q2, k2=k2, doc_ids=doc_ids)
        if doc_ids is not None:
            doc = _check_doc_ids(doc_ids, k).to(torch.int64)[:, 0]
            if self.doc is not None:
                self._st = self._st * (doc == self.doc).to(self._st.dtype)[:, None, None, None]
            self.doc = doc
        sd = self._st.dtype
        phik = _features(k.to(sd), None if k2 is None else k2.to(sd))
        st = self._st  # one fused pass over the state (no (D, F) temporary for the outer product)
        self._st = torch.baddbmm(st.flatten(0, 1), v.to(sd).transpose(-1, -2).flatten(0, 1),
                                 phik.flatten(0, 1)).view_as(st)
        phiq = _features(q.to(sd) * scale, None if q2 is None else q2.to(sd) * scale)
        self.length += 1
        return (phiq @ self._st.transpose(-1, -2)).to(v.dtype)
