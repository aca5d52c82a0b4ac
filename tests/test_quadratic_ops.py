"""Tests of the quadratic/bilinear attention kernels (qtoy_core.ops.quadratic).

Small float64 shapes throughout: the whole file runs in a few seconds on 2 cores.
"""

from __future__ import annotations

import math

import pytest
import torch

from qtoy_core.ops import quadratic as qa
from qtoy_core.ops.quadratic import (
    QuadraticAttentionState,
    feature_dim,
    quadratic_attention,
    symmetric_feature_pairs,
    symmetric_features,
)

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def qkv(b=2, h=3, tq=11, tk=None, d=5, *, bilinear=False, seed=0, dtype=F64):
    tk = tq if tk is None else tk
    q = rand(b, h, tq, d, seed=seed, dtype=dtype)
    k = rand(b, h, tk, d, seed=seed + 1, dtype=dtype)
    v = rand(b, h, tk, d, seed=seed + 2, dtype=dtype)
    if not bilinear:
        return q, k, v, None, None
    return q, k, v, rand(b, h, tq, d, seed=seed + 3, dtype=dtype), rand(b, h, tk, d, seed=seed + 4, dtype=dtype)


def naive(q, k, v, scale, q2=None, k2=None, key_mask=None):
    """Per-position python loop straight from the definition."""
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    z = torch.zeros(b, h, tq, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                pos = tk - tq + i
                for j in range(pos + 1):
                    if key_mask is not None and not bool(key_mask[bi, j]):
                        continue
                    s1 = (q[bi, hi, i] @ k[bi, hi, j]) * scale
                    s2 = s1 if q2 is None else (q2[bi, hi, i] @ k2[bi, hi, j]) * scale
                    z[bi, hi, i] += s1 * s2 * v[bi, hi, j]
    return z


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------------------------
# feature map
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8, 9])
def test_symmetric_features_inner_product_identity(d):
    a, b = rand(7, d, seed=1), rand(6, d, seed=2)
    fa, fb = symmetric_features(a), symmetric_features(b)
    assert fa.shape == (7, d * (d + 1) // 2) == (7, feature_dim(d))
    torch.testing.assert_close(fa @ fb.T, (a @ b.T) ** 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 5, 6])
def test_symmetric_feature_pairs_describe_the_features(d):
    x = rand(4, d, seed=3)
    i, j = symmetric_feature_pairs(d)
    w = torch.where(i == j, 1.0, math.sqrt(2.0)).to(F64)
    torch.testing.assert_close(symmetric_features(x), x[:, i] * x[:, j] * w)
    pairs = {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())}
    assert len(pairs) == len(i) == d * (d + 1) // 2  # every unordered pair exactly once


def test_symmetric_features_gradcheck():
    x = rand(2, 3, 6, seed=4, requires_grad=True)
    assert torch.autograd.gradcheck(symmetric_features, (x,))
    x = rand(2, 5, seed=5, requires_grad=True)  # odd d
    assert torch.autograd.gradcheck(symmetric_features, (x,))


@pytest.mark.parametrize("d", [1, 2, 5, 8])
def test_symmetric_features_functional_version_matches(d):
    """The version used under torch.compile has the same values and gradients."""
    x = rand(3, 4, d, seed=6, requires_grad=True)
    g = rand(3, 4, d * (d + 1) // 2, seed=7)
    a = symmetric_features(x)
    (ga,) = torch.autograd.grad(a, x, g)
    b = qa._symmetric_features_functional(x)
    (gb,) = torch.autograd.grad(b, x, g)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_state_size_formula():
    for d in (1, 4, 16, 32, 64):
        assert QuadraticAttentionState(1, 2, d).state_size == d * (d + 1) // 2 * d
        assert QuadraticAttentionState(1, 2, d, bilinear=True).state_size == d * d * d
    st = QuadraticAttentionState(2, 3, 8)
    assert st.S.shape == (2, 3, 36, 8) and st.S[0, 0].numel() == st.state_size


# --------------------------------------------------------------------------------------------
# plain vs naive, chunked vs plain
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("tq,tk", [(7, 7), (4, 9), (1, 6)])
def test_plain_equals_naive_loop(bilinear, tq, tk):
    q, k, v, q2, k2 = qkv(b=2, h=2, tq=tq, tk=tk, d=3, bilinear=bilinear, seed=10)
    key_mask = torch.ones(2, tk, dtype=torch.bool)
    key_mask[1, :2] = False
    for km in (None, key_mask):
        z = quadratic_attention(q, k, v, scale=0.4, q2=q2, k2=k2, key_mask=km, impl="plain")
        assert rel(z, naive(q, k, v, 0.4, q2, k2, km)) < 1e-12


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize(
    "tq,tk,chunk",
    [(13, 13, 4), (29, 29, 8), (16, 16, 8), (5, 5, 8), (9, 30, 8), (1, 21, 4), (8, 19, 8), (17, 40, 16)],
)
def test_chunked_equals_plain(bilinear, tq, tk, chunk):
    q, k, v, q2, k2 = qkv(tq=tq, tk=tk, d=4, bilinear=bilinear, seed=20)
    a = quadratic_attention(q, k, v, scale=0.25, q2=q2, k2=k2, impl="plain")
    b = quadratic_attention(q, k, v, scale=0.25, q2=q2, k2=k2, impl="chunked", chunk_size=chunk)
    assert rel(b, a) < 1e-10


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("carry,group", [("matmul", 2), ("cumsum", 3), ("cumsum", None), ("loop", None)])
def test_chunked_carry_variants_equal_plain(bilinear, carry, group):
    """State carried by triangular matmul / cumsum within groups of chunks, group to group, or a loop."""
    for tq, tk, c in [(13, 13, 4), (9, 30, 4), (1, 21, 4), (26, 27, 3)]:
        q, k, v, q2, k2 = qkv(tq=tq, tk=tk, d=4, bilinear=bilinear, seed=25)
        a = quadratic_attention(q, k, v, scale=0.25, q2=q2, k2=k2, impl="plain")
        z, state = qa._chunked(q, k, v, 0.25, q2, k2, c, need_state=True, carry=carry, group_chunks=group)
        assert rel(z, a) < 1e-10
        torch.testing.assert_close(state, qa._features(k, k2).transpose(-1, -2) @ v)


def test_chunked_never_materialises_time_by_time():
    """Record every tensor produced (forward and backward): none is as large as (T, T), and the
    elements produced grow linearly with T (the plain form's grow quadratically)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Produced(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.biggest = self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.biggest = max(self.biggest, o.numel())
                    self.total += o.numel()
            return out

    def produced(t, impl):
        q, k, v, _, _ = qkv(b=1, h=1, tq=t, d=4, seed=35, dtype=torch.float32)
        xs = [x.requires_grad_() for x in (q, k, v)]
        with Produced() as seen:
            z = quadratic_attention(*xs, scale=0.5, impl=impl, chunk_size=32)
            z.sum().backward()
        return seen

    t = 400
    chunked, chunked2 = produced(t, "chunked"), produced(2 * t, "chunked")
    assert chunked.biggest < t * t / 4
    assert chunked2.total < 2.5 * chunked.total
    plain, plain2 = produced(t, "plain"), produced(2 * t, "plain")
    assert plain.total > t * t / 2  # (the check does see the plain form's (blocked) pattern)
    assert plain2.total > 3.5 * plain.total


@pytest.mark.parametrize("bilinear", [False, True])
def test_key_mask(bilinear):
    q, k, v, q2, k2 = qkv(b=3, tq=10, tk=23, d=4, bilinear=bilinear, seed=30)
    key_mask = torch.rand(3, 23, generator=torch.Generator().manual_seed(0)) > 0.3
    key_mask[2] = True
    ref = naive(q, k, v, 0.3, q2, k2, key_mask)
    for impl in ("plain", "chunked"):
        z = quadratic_attention(q, k, v, scale=0.3, q2=q2, k2=k2, key_mask=key_mask, impl=impl, chunk_size=8)
        assert rel(z, ref) < 1e-10
        z01 = quadratic_attention(q, k, v, scale=0.3, q2=q2, k2=k2, key_mask=key_mask.long(), impl=impl, chunk_size=8)
        torch.testing.assert_close(z01, z)
    # a padded key may hold garbage: it changes nothing
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~key_mask[:, None, :, None].expand_as(k)] = 1e3
    v_bad[~key_mask[:, None, :, None].expand_as(v)] = -7.0
    k2_bad = None if k2 is None else k2.clone()
    for impl in ("plain", "chunked"):
        z = quadratic_attention(q, k_bad, v_bad, scale=0.3, q2=q2, k2=k2_bad, key_mask=key_mask, impl=impl, chunk_size=8)
        assert rel(z, ref) < 1e-10


def test_auto_dispatch(monkeypatch):
    q, k, v, _, _ = qkv(b=1, h=1, tq=12, d=4)
    monkeypatch.setattr(qa, "CHUNKED_FROM_T", {10: 10, 20: 30})
    assert qa._crossover_t(5) == 5 and qa._crossover_t(15) == 20 and qa._crossover_t(40) == 60
    assert qa._use_chunked(12, 12, 4, False)  # F = 10
    assert not qa._use_chunked(1, 12, 4, False)  # one query: plain
    assert not qa._use_chunked(12, 12, 4, True)  # F = 16 needs T >= 22
    monkeypatch.setattr(qa, "MAX_CHUNKED_FEATURES", 12)
    assert not qa._use_chunked(1000, 1000, 4, True)  # F = 16 > 12
    a = quadratic_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(a, quadratic_attention(q, k, v, scale=0.5, impl="plain"))
    with pytest.raises(ValueError):
        quadratic_attention(q, k, v, scale=0.5, impl="nope")


def test_auto_dispatch_measured_constants():
    assert not qa._use_chunked(2048, 2048, 32, False) and qa._use_chunked(4096, 4096, 32, False)
    assert not qa._use_chunked(4096, 4096, 64, False) and qa._use_chunked(8192, 8192, 64, False)
    assert not qa._use_chunked(4096, 4096, 64, True) and qa._use_chunked(8192, 8192, 64, True)
    assert not qa._use_chunked(1, 100_000, 64, False)  # decoding one token: plain
    assert not qa._use_chunked(10**6, 10**6, 128, False)  # F = 8256 > MAX_CHUNKED_FEATURES


def test_input_validation():
    q, k, v, _, _ = qkv(tq=6, tk=4)
    with pytest.raises(ValueError):
        quadratic_attention(q, k, v, scale=1.0)  # Tq > Tk
    q, k, v, q2, _ = qkv(tq=4, bilinear=True)
    with pytest.raises(ValueError):
        quadratic_attention(q, k, v, scale=1.0, q2=q2)  # q2 without k2


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bilinear", [False, True])
def test_chunked_gradcheck(bilinear):
    q, k, v, q2, k2 = qkv(b=1, h=1, tq=4, tk=7, d=4, bilinear=bilinear, seed=40)
    inputs = [x.requires_grad_() for x in (q, k, v, q2, k2) if x is not None]

    def f(*xs):
        q2_, k2_ = (xs[3], xs[4]) if bilinear else (None, None)
        return quadratic_attention(xs[0], xs[1], xs[2], scale=0.7, q2=q2_, k2=k2_, impl="chunked", chunk_size=2)

    # full Jacobian check for the quadratic form (hand-written feature backward); the bilinear one
    # (autograd-derived backward, twice the inputs) takes the faster random-projection check
    assert torch.autograd.gradcheck(f, tuple(inputs), fast_mode=bilinear)


@pytest.mark.parametrize("bilinear", [False, True])
def test_chunked_grads_equal_plain(bilinear):
    q, k, v, q2, k2 = qkv(b=2, h=2, tq=14, tk=21, d=4, bilinear=bilinear, seed=50)
    key_mask = torch.ones(2, 21, dtype=torch.bool)
    key_mask[0, 3:6] = False
    grads = {}
    for impl in ("plain", "chunked"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, q2, k2) if x is not None]
        q2_, k2_ = (xs[3], xs[4]) if bilinear else (None, None)
        z = quadratic_attention(xs[0], xs[1], xs[2], scale=0.3, q2=q2_, k2=k2_, key_mask=key_mask, impl=impl, chunk_size=4)
        (z * rand(*z.shape, seed=51)).sum().backward()
        grads[impl] = [x.grad for x in xs]
    for gp, gc in zip(grads["plain"], grads["chunked"]):
        assert rel(gc, gp) < 1e-10


@pytest.mark.parametrize("bilinear", [False, True])
def test_plain_blocked_kernel_gradcheck_across_blocks(bilinear, monkeypatch):
    """The eager plain form's hand-written backward, with blocks of 3 query rows (several blocks,
    a ragged last one, queries after a prefix of keys, a padded key) against finite differences."""
    monkeypatch.setitem(qa.BLOCK_ROWS, torch.float64, 3)
    q, k, v, q2, k2 = qkv(b=2, h=1, tq=8, tk=11, d=3, bilinear=bilinear, seed=45)
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[1, 2] = False
    inputs = [x.requires_grad_() for x in (q, k, v, q2, k2) if x is not None]

    def f(*xs):
        q2_, k2_ = (xs[3], xs[4]) if bilinear else (None, None)
        return quadratic_attention(xs[0], xs[1], xs[2], scale=0.6, q2=q2_, k2=k2_, key_mask=key_mask, impl="plain")

    torch.testing.assert_close(f(*inputs), naive(q, k, v, 0.6, q2, k2, key_mask), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("impl", ["plain", "chunked"])
@pytest.mark.parametrize("b,tq,tk", [(0, 5, 5), (2, 0, 6), (1, 0, 0)])
def test_empty_inputs_give_empty_outputs_and_gradients(impl, b, tq, tk):
    q, k, v, _, _ = qkv(b=b, h=2, tq=tq, tk=tk, d=3, seed=46)
    xs = [x.requires_grad_() for x in (q, k, v)]
    z = quadratic_attention(*xs, scale=0.5, impl=impl, chunk_size=2)
    assert z.shape == (b, 2, tq, 3)
    z.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape and not x.grad.any() for x in xs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_plain_blocked_gradients_in_low_precision_close_to_float64(dtype, tol):
    """At n_ctx 300 (several blocks of the real size), the gradients of float32/bf16 inputs stay
    within their precision of float64 (bf16 ones are accumulated over blocks in float32)."""
    q, k, v, q2, k2 = qkv(b=1, h=2, tq=300, d=8, bilinear=True, seed=47)
    weight = rand(1, 2, 300, 8, seed=48)
    for pair in (None, (q2, k2)):
        grads = {}
        for dt in (F64, dtype):
            xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v, *(pair or ()))]
            q2_, k2_ = (xs[3], xs[4]) if pair else (None, None)
            z = quadratic_attention(xs[0], xs[1], xs[2], scale=1 / 8, q2=q2_, k2=k2_, impl="plain")
            (z.double() * weight).sum().backward()
            grads[dt] = [x.grad for x in xs]
        for g_low, g_ref in zip(grads[dtype], grads[F64]):
            assert g_low.dtype == dtype
            assert ((g_low.double() - g_ref).norm() / g_ref.norm()).item() < tol


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func's batching of unfold_backward
@pytest.mark.parametrize("impl", ["plain", "chunked"])
@pytest.mark.parametrize("bilinear", [False, True])
def test_higher_order_gradients_and_torch_func(impl, bilinear):
    """create_graph=True (e.g. Hessian-vector products) and torch.func transforms work through the
    fast kernels: the first by taking differentiable gradients, the second by switching to tensor ops."""
    q, k, v, q2, k2 = qkv(b=1, h=1, tq=5, tk=7, d=3, bilinear=bilinear, seed=44)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, q2, k2) if x is not None)

    def f(*xs):
        q2_, k2_ = (xs[3], xs[4]) if bilinear else (None, None)
        return quadratic_attention(xs[0], xs[1], xs[2], scale=0.6, q2=q2_, k2=k2_, impl=impl, chunk_size=2)

    assert torch.autograd.gradgradcheck(f, inputs)
    jac = torch.func.jacrev(lambda x: f(x, *inputs[1:]))(inputs[0])
    reference = torch.func.jacrev(lambda x: quadratic_attention(
        x, inputs[1], inputs[2], scale=0.6, q2=inputs[3] if bilinear else None, k2=inputs[4] if bilinear else None,
        impl="autograd"))(inputs[0])
    torch.testing.assert_close(jac, reference)


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_output_can_be_edited_in_place(impl):
    """Hooks ablate heads by writing into z: the output must not be a view the kernel owns."""
    q, k, v, _, _ = qkv(b=2, h=2, tq=6, d=3, seed=49)
    grads = []
    for edit in ("in place", "out of place"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        z = quadratic_attention(*xs, scale=0.5, impl=impl, chunk_size=8)
        if edit == "in place":
            z[:, 0] = 0.0
        else:
            z = z * torch.tensor([0.0, 1.0], dtype=z.dtype)[None, :, None, None]
        (z * rand(*z.shape, seed=50)).sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert not grads[0][0][:, 0].any() and grads[0][0][:, 1].any()


def test_autocast_keeps_float64_and_meta_tensors_work():
    q, k, v, _, _ = qkv(b=1, h=1, tq=4, d=3, seed=52)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert quadratic_attention(q, k, v, scale=0.5, impl="plain").dtype == F64  # autocast never casts float64
        assert quadratic_attention(q.float(), k.float(), v.float(), scale=0.5, impl="plain").dtype == torch.bfloat16
    meta = [torch.empty(2, 3, 5, 4, device="meta") for _ in range(3)]
    assert quadratic_attention(*meta, scale=0.5, impl="plain").shape == (2, 3, 5, 4)


# --------------------------------------------------------------------------------------------
# causality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["plain", "chunked"])
@pytest.mark.parametrize("bilinear", [False, True])
def test_causality(impl, bilinear):
    tq, tk = 12, 15
    q, k, v, q2, k2 = qkv(b=1, h=2, tq=tq, tk=tk, d=4, bilinear=bilinear, seed=60)
    base = quadratic_attention(q, k, v, scale=0.5, q2=q2, k2=k2, impl=impl, chunk_size=4)
    for j in (3, 7, 14):  # change key/value at absolute position j
        k_, v_ = k.clone(), v.clone()
        k_[:, :, j] += 3.0
        v_[:, :, j] -= 2.0
        k2_ = None if k2 is None else k2.clone()
        if k2_ is not None:
            k2_[:, :, j] *= -1.5
        z = quadratic_attention(q, k_, v_, scale=0.5, q2=q2, k2=k2_, impl=impl, chunk_size=4)
        first_seeing = j - (tk - tq)  # query index whose position is j
        n_unchanged = max(first_seeing, 0)
        torch.testing.assert_close(z[:, :, :n_unchanged], base[:, :, :n_unchanged], rtol=0, atol=0)
        assert not torch.allclose(z[:, :, n_unchanged:], base[:, :, n_unchanged:])


# --------------------------------------------------------------------------------------------
# recurrent state
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bilinear", [False, True])
def test_recurrent_prefill_and_steps_equal_plain(bilinear):
    t, prompt = 19, 7
    q, k, v, q2, k2 = qkv(b=2, h=2, tq=t, d=4, bilinear=bilinear, seed=70)
    full = quadratic_attention(q, k, v, scale=0.3, q2=q2, k2=k2, impl="plain")
    st = QuadraticAttentionState(2, 2, 4, bilinear=bilinear, dtype=F64)
    sl = lambda x, a, b: None if x is None else x[:, :, a:b]  # noqa: E731
    z = st.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], scale=0.3,
                   q2=sl(q2, 0, prompt), k2=sl(k2, 0, prompt))
    assert rel(z, full[:, :, :prompt]) < 1e-10
    assert st.length == prompt
    for i in range(prompt, t):
        zi = st.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], scale=0.3,
                     q2=sl(q2, i, i + 1), k2=sl(k2, i, i + 1))
        assert zi.shape == (2, 2, 1, 4)
        assert rel(zi, full[:, :, i : i + 1]) < 1e-10, i
    # the state is the sum of phi(k) v^T over all keys
    phi = qa._features(k, k2)
    torch.testing.assert_close(st.S, phi.transpose(-1, -2) @ v)


def test_recurrent_steps_from_scratch_and_prefill_with_mask():
    t = 9
    q, k, v, _, _ = qkv(b=2, h=1, tq=t, d=3, seed=80)
    key_mask = torch.ones(2, t, dtype=torch.bool)
    key_mask[1, :3] = False
    full = quadratic_attention(q, k, v, scale=0.5, key_mask=key_mask, impl="plain")
    st = QuadraticAttentionState(2, 1, 3, dtype=F64)
    z = st.prefill(q, k, v, scale=0.5, key_mask=key_mask)
    assert rel(z, full) < 1e-10
    st2 = QuadraticAttentionState(2, 1, 3, dtype=F64)
    for i in range(t):
        zi = st2.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], scale=0.5)
        ref = quadratic_attention(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], scale=0.5, impl="plain")
        assert rel(zi, ref[:, :, -1:]) < 1e-10


def test_recurrent_state_bf16_inputs_float32_state():
    q, k, v, _, _ = qkv(b=1, h=2, tq=6, d=8, seed=90, dtype=torch.bfloat16)
    st = QuadraticAttentionState(1, 2, 8)  # float32 state
    z = st.prefill(q, k, v, scale=1 / 8)
    assert z.dtype == torch.bfloat16 and st.S.dtype == torch.float32
    ref = quadratic_attention(q.double(), k.double(), v.double(), scale=1 / 8, impl="plain")
    assert rel(z.double(), ref) < 3e-2


# --------------------------------------------------------------------------------------------
# dtypes, autocast, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    q, k, v, _, _ = qkv(b=1, h=2, tq=40, d=8, seed=100)
    ref = quadratic_attention(q, k, v, scale=1 / 8, impl="plain")
    for impl in ("plain", "chunked"):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        z = quadratic_attention(*xs, scale=1 / 8, impl=impl, chunk_size=16)
        assert z.dtype == dtype
        assert ((z.double() - ref).norm() / ref.norm()).item() < tol
        z.float().sum().backward()
        assert all(x.grad is not None and x.grad.dtype == dtype for x in xs)


def test_autocast_bf16():
    q, k, v, _, _ = qkv(b=1, h=2, tq=40, d=8, seed=110, dtype=torch.float32)
    ref = quadratic_attention(q.double(), k.double(), v.double(), scale=1 / 8, impl="plain")
    for impl in ("plain", "chunked"):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = quadratic_attention(*xs, scale=1 / 8, impl=impl, chunk_size=16)
        assert ((z.double() - ref).norm() / ref.norm()).item() < 3e-2
        z.float().sum().backward()
        assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in xs)


def test_torch_compile_fullgraph(monkeypatch):
    """Plain (quadratic and bilinear, several row blocks) and chunked paths compile without graph
    breaks (fullgraph=True raises on any), forward and backward, with the eager values and gradients;
    one compile for all three to keep the test short."""
    monkeypatch.setitem(qa.BLOCK_ROWS, torch.float32, 4)
    q, k, v, q2, k2 = qkv(b=1, h=2, tq=10, d=4, bilinear=True, seed=120, dtype=torch.float32)

    def f(q, k, v, q2, k2):
        return (quadratic_attention(q, k, v, scale=0.5, impl="plain")
                + quadratic_attention(q, k, v, scale=0.5, q2=q2, k2=k2, impl="plain")
                + quadratic_attention(q, k, v, scale=0.5, impl="chunked", chunk_size=4))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xs = [x.clone().requires_grad_() for x in (q, k, v, q2, k2)]
    out = compiled(*xs)
    eager_xs = [x.clone().requires_grad_() for x in (q, k, v, q2, k2)]
    eager_out = f(*eager_xs)
    torch.testing.assert_close(out, eager_out)
    weight = rand(*out.shape, seed=121, dtype=torch.float32)
    (out * weight).sum().backward()
    (eager_out * weight).sum().backward()
    for x, e in zip(xs, eager_xs):
        torch.testing.assert_close(x.grad, e.grad)
