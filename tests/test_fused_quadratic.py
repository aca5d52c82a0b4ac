"""The fused Triton kernel for causal quadratic / bilinear attention (qtoy_core.ops.fused_quadratic).

On CPU it runs under Triton's interpreter, in one subprocess for the whole file
(tests/helpers/fused_interpret_cases.py): Triton reads TRITON_INTERPRET when the kernels are
decorated, and setting it in this process would also switch torch.compile's own Triton kernels to
the interpreter for every later test. Tiny shapes (T <= 40, blocks of 16 so every case spans several
blocks and ends mid-block): ~15 s on 2 cores. Everything that needs Triton skips where it is absent.

Tolerances (max |error| / max |reference|, each against float64 on the same rounded inputs):
float64 1e-12 (the same sums in another order: the worst-case rounding bound is (D + T) * 1.1e-16 ~
7e-15, while a missing or extra term changes results by O(1)); float32 1e-5 and bfloat16 3e-2, the
bounds the plain form itself meets in tests/test_quadratic_ops.py (measured: float32 ~3e-7; bfloat16
~9e-3 under the interpreter, which rounds fp32 -> bf16 toward zero where a GPU rounds to nearest,
so the bf16 comparison with the plain form is a cuda test).

The cuda-marked tests at the end run on a GPU (benchmarks/gpu_check.sh): the compiled kernel
against the plain form, what impl="auto" picks, and torch.compile over it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.fused_interpret_cases import CASES, SPECIAL

from qtoy_core.ops import fused_quadratic as fq
from qtoy_core.ops.quadratic import quadratic_attention

HAVE_TRITON = fq.fused_available()
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (pip install triton): the fused "
                                                          "kernel and its interpreter tests need it")
TOLERANCE = {"f64": 1e-12, "f32": 1e-5, "bf16": 3e-2}
HELPER = Path(__file__).parent / "helpers" / "fused_interpret_cases.py"


@pytest.fixture(scope="module")
def interpreted():
    """Every case of the helper, run once under TRITON_INTERPRET=1 in a subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(HELPER)], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(result, tol):
    assert "error" not in result, result.get("error")
    for name, (err, scale, *_) in result.items():
        assert err <= tol * scale, f"{name}: max |error| {err:.3g} > {tol:g} x max |reference| {scale:.3g}"


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_fused_forward_and_backward_equal_the_plain_form(interpreted, case):
    """Output and every input gradient (q, k, v; q2, k2 bilinear) against the plain form (per document
    with doc_ids), for self-attention and a cached prefix (Tq < Tk), key masks, d_head 12, one query."""
    _check(interpreted[case], TOLERANCE[CASES[case].get("dtype", "f64")])


@needs_triton
@pytest.mark.parametrize("case", list(SPECIAL))
def test_fused_double_backward_dispatch_empty_inputs_and_opcheck(interpreted, case):
    """create_graph=True gives the plain form's second derivatives; impl="fused" through
    quadratic_attention (with a key mask) equals plain, also compiled (fullgraph, its backward too),
    while auto never picks it for CPU tensors;
    empty inputs give empty outputs and zero gradients; torch.library.opcheck passes on the op."""
    _check(interpreted[case], TOLERANCE["f64"])


def test_auto_on_cpu_never_imports_triton():
    """CPU training must not pay Triton's import (or meet its absence): impl="auto" dispatches on
    the device before looking at the fused kernel."""
    code = ("import sys, torch; from qtoy_core.ops.quadratic import quadratic_attention as qa; "
            "x = torch.randn(1, 2, 8, 4, requires_grad=True); qa(x, x, x, scale=0.5).sum().backward(); "
            "print('triton' in sys.modules, 'qtoy_core.ops.fused_quadratic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@needs_triton
@pytest.mark.skipif(HAVE_TRITON and fq._interpreted(), reason="this process runs Triton's interpreter")
def test_fused_on_cpu_without_the_interpreter_is_refused_clearly():
    x = torch.randn(1, 1, 4, 16)
    with pytest.raises(fq.FusedKernelError) as err:
        quadratic_attention(x, x, x, scale=0.5, impl="fused")
    assert "CUDA" in str(err.value) and "TRITON_INTERPRET=1" in str(err.value) and "impl='plain'" in str(err.value)
    assert not fq.fused_supports(x, x, x)


def test_fused_without_triton_names_the_install(monkeypatch):
    monkeypatch.setattr(fq, "triton", None)
    x = torch.randn(1, 1, 4, 16)
    with pytest.raises(fq.FusedKernelError, match="pip install triton"):
        fq.fused_quadratic_attention(x, x, x, scale=0.5)
    assert not fq.fused_available() and not fq.fused_supports(x, x, x)


@needs_triton
def test_bad_inputs_are_refused_in_one_paragraph(monkeypatch):
    """Checked before any kernel runs (here as if the interpreter were on, so CPU tensors pass the
    device check)."""
    monkeypatch.setattr(fq, "_interpreted", lambda: True)
    x = torch.randn(2, 1, 6, 16)
    bad = [
        (dict(doc_ids=torch.zeros(2, 5, dtype=torch.long)), "doc_ids must be \\(batch, Tk\\)"),
        (dict(doc_ids=torch.zeros(2, 6)), "integer tensor"),
        (dict(block_m=24), "power of two"),
    ]
    for kwargs, match in bad:
        with pytest.raises(fq.FusedKernelError, match=match):
            fq.fused_quadratic_attention(x, x, x, scale=0.5, **kwargs)
    with pytest.raises(fq.FusedKernelError, match="one dtype"):
        fq.fused_quadratic_attention(x, x, x.double(), scale=0.5)
    big = torch.randn(1, 1, 4, 300)
    with pytest.raises(fq.FusedKernelError, match="head size"):
        fq.fused_quadratic_attention(big, big, big, scale=0.5)
    with pytest.raises(ValueError, match="Tq=6 > Tk=4"):  # the plain form's shape checks
        fq.fused_quadratic_attention(x, x[:, :, :4], x[:, :, :4], scale=0.5)


def test_dense_reference_document_mask():
    """The dense form (the fused kernel's create_graph / torch.func fallback) with doc_ids equals
    running each document separately, float64."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2]])
    z = fq.dense_quadratic_attention(q, k, v, scale=0.5, doc_ids=doc)
    parts = [quadratic_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=0.5, impl="plain")
             for a, b in ((0, 4), (4, 6), (6, 9))]
    torch.testing.assert_close(z, torch.cat(parts, dim=2), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh runs these)
# ---------------------------------------------------------------------------------------------


def _gpu_inputs(dtype, b=2, h=4, tq=300, tk=300, d=64, bilinear=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, tq, d), (b, h, tk, d), (b, h, tk, d)] + ([(b, h, tq, d), (b, h, tk, d)] if bilinear else [])
    return [(torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to("cuda", dtype).requires_grad_()
            for s in shapes]


def _run(xs, impl, **kw):
    q, k, v = xs[:3]
    q2, k2 = (xs[3], xs[4]) if len(xs) == 5 else (None, None)
    z = quadratic_attention(q, k, v, scale=1 / q.shape[-1], q2=q2, k2=k2, impl=impl, **kw)
    dz = torch.ones_like(z) / z.shape[-2] ** 0.5
    return [z, *torch.autograd.grad(z, xs, dz)]


def _rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("tq,tk", [(300, 300), (77, 1000)])
def test_cuda_fused_equals_plain_fp32_and_is_as_accurate_in_bf16(bilinear, tq, tk):
    xs32 = _gpu_inputs(torch.float32, tq=tq, tk=tk, bilinear=bilinear)
    ref = _run([x.detach().double().requires_grad_() for x in xs32], "plain")
    for a, r in zip(_run(xs32, "fused"), ref):
        assert _rel(a, r) < 1e-5
    xs16 = [x.detach().bfloat16().requires_grad_() for x in xs32]
    ref16 = _run([x.detach().double().requires_grad_() for x in xs16], "plain")
    for fused, plain, r in zip(_run(xs16, "fused"), _run(xs16, "plain"), ref16):
        # the fused kernel keeps scores and pattern in fp32 registers: no less accurate than plain bf16
        assert _rel(fused, r) <= 1.5 * _rel(plain, r) + 1e-3


@pytest.mark.cuda
@needs_triton
def test_cuda_auto_picks_fused_and_compile_traces_it(monkeypatch):
    calls = []
    real = fq.fused_quadratic_attention
    monkeypatch.setattr(fq, "fused_quadratic_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    xs = _gpu_inputs(torch.bfloat16, tq=128, tk=128)
    out = _run(xs, "auto")
    assert calls, "impl='auto' did not use the fused kernel on CUDA"
    assert not fq.fused_supports(*[x.double() for x in xs[:3]])  # fp64 stays with the plain form

    def step(q, k, v):
        return quadratic_attention(q, k, v, scale=1 / 64, impl="fused")

    compiled = torch.compile(step, fullgraph=True)
    z = compiled(*xs)
    grads = torch.autograd.grad(z, xs, torch.ones_like(z) / 128 ** 0.5)
    for a, r in zip([z, *grads], out):
        torch.testing.assert_close(a, r)


@pytest.mark.cuda
@needs_triton
def test_cuda_fused_doc_ids_equal_per_document():
    xs = _gpu_inputs(torch.float32, b=1, tq=200, tk=200, bilinear=True)
    doc = torch.tensor([[0] * 70 + [1] * 1 + [2] * 129], device="cuda")
    q, k, v, q2, k2 = xs
    z = fq.fused_quadratic_attention(q, k, v, scale=1 / 64, q2=q2, k2=k2, doc_ids=doc)
    parts = [quadratic_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=1 / 64, q2=q2[:, :, a:b],
                                 k2=k2[:, :, a:b], impl="plain") for a, b in ((0, 70), (70, 71), (71, 200))]
    torch.testing.assert_close(z, torch.cat(parts, dim=2), rtol=1e-5, atol=1e-5)
