"""The fused Triton kernel against the plain form, run under Triton's interpreter on CPU.

Run as a script with TRITON_INTERPRET=1 in the environment (tests/test_fused_quadratic.py starts it
in a subprocess: Triton reads the variable when the kernels are decorated, and setting it in the test
process would also switch every other Triton kernel of that process, torch.compile's included, to
the interpreter). Prints one JSON object: case name -> {tensor name: [max |fused - reference|,
max |reference|]} for the output and every input gradient, or {"error": traceback}.

Importing this module (for CASES) imports neither torch nor Triton.
"""

from __future__ import annotations

import json
import sys
import traceback

# name -> settings. b, h, tq, tk, d; blocks of 16 query rows and 16 keys (so every T below spans
# several blocks and ends mid-block); "docs": document lengths per batch row (packed, covering tk);
# "key_mask": padded key positions; dtype "f64" (exact up to summation order) or "f32" / "bf16"
# (compared, like the plain form, against float64 on the same rounded inputs)
CASES: dict[str, dict] = {
    "quadratic_self": dict(tq=40, tk=40),
    "quadratic_prefix": dict(tq=13, tk=37),
    "quadratic_one_query": dict(tq=1, tk=29),
    "quadratic_d_head_not_power_of_two": dict(tq=21, tk=21, d=12),
    "bilinear_self": dict(tq=40, tk=40, bilinear=True),
    "bilinear_prefix": dict(tq=9, tk=30, bilinear=True),
    "quadratic_key_mask": dict(tq=24, tk=33, key_mask=[[0, 1, 2, 17, 32], [5, 6, 20]]),
    "bilinear_key_mask": dict(tq=33, tk=33, bilinear=True, key_mask=[[3, 4, 30], [0, 16, 31, 32]]),
    "quadratic_doc_ids": dict(tq=40, tk=40, docs=[[7, 1, 15, 17], [40]]),
    "quadratic_doc_ids_prefix": dict(tq=18, tk=35, docs=[[10, 12, 13], [16, 1, 18]]),
    "bilinear_doc_ids": dict(tq=37, tk=37, bilinear=True, docs=[[1, 20, 16], [18, 19]]),
    "bilinear_doc_ids_prefix_and_key_mask": dict(tq=20, tk=31, bilinear=True, docs=[[9, 22], [30, 1]],
                                                 key_mask=[[2, 12], [29]]),
    "quadratic_float32": dict(tq=40, tk=40, dtype="f32"),
    "bilinear_float32_prefix": dict(tq=17, tk=34, bilinear=True, dtype="f32"),
    "quadratic_bfloat16": dict(tq=40, tk=40, dtype="bf16"),
}


def _inputs(case, seed=0):
    import torch

    b, h, tq, tk, d = case.get("b", 2), case.get("h", 2), case["tq"], case["tk"], case.get("d", 16)
    g = torch.Generator().manual_seed(seed)
    n = 5 if case.get("bilinear") else 3
    shapes = [(b, h, tq, d), (b, h, tk, d), (b, h, tk, d), (b, h, tq, d), (b, h, tk, d)][:n]
    xs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    dz = torch.randn(b, h, tq, d, generator=g, dtype=torch.float64)
    key_mask = doc_ids = None
    if "key_mask" in case:
        key_mask = torch.ones(b, tk, dtype=torch.bool)
        for row, padded in enumerate(case["key_mask"]):
            key_mask[row, padded] = False
    if "docs" in case:
        doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
                               for lens in case["docs"]])
        assert doc_ids.shape == (b, tk), case
    return xs, dz, key_mask, doc_ids


def _per_document(xs, key_mask, doc_ids, scale):
    """The definition of document masking: each document through the plain form on its own."""
    import torch

    from qtoy_core.ops.quadratic import quadratic_attention

    q, k, v = xs[:3]
    q2, k2 = (xs[3], xs[4]) if len(xs) == 5 else (None, None)
    b, h, tq, _ = q.shape
    tk = k.shape[-2]
    z = q.new_zeros(b, h, tq, v.shape[-1])
    for row in range(b):
        for doc in doc_ids[row].unique():
            keys = (doc_ids[row] == doc).nonzero().flatten()
            queries = keys[keys >= tk - tq]  # the document's queries are the last of its keys
            if len(queries) == 0:
                continue
            pick_k = lambda x: x[row:row + 1, :, keys]  # noqa: E731
            pick_q = lambda x: x[row:row + 1, :, queries - (tk - tq)]  # noqa: E731
            zd = quadratic_attention(pick_q(q), pick_k(k), pick_k(v), scale=scale,
                                     q2=None if q2 is None else pick_q(q2), k2=None if k2 is None else pick_k(k2),
                                     key_mask=None if key_mask is None else key_mask[row:row + 1, keys], impl="plain")
            z[row:row + 1, :, queries - (tk - tq)] = zd
    return z


def run_case(name: str) -> dict:
    import torch

    from qtoy_core.ops.fused_quadratic import fused_quadratic_attention
    from qtoy_core.ops.quadratic import quadratic_attention

    case = CASES[name]
    scale = 0.3
    xs64, dz64, key_mask, doc_ids = _inputs(case)
    dtype = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}[case.get("dtype", "f64")]
    xs = [x.to(dtype).requires_grad_() for x in xs64]
    q, k, v = xs[:3]
    q2, k2 = (xs[3], xs[4]) if len(xs) == 5 else (None, None)
    z = fused_quadratic_attention(q, k, v, scale=scale, q2=q2, k2=k2, key_mask=key_mask, doc_ids=doc_ids,
                                  block_m=16, block_n=16)
    grads = torch.autograd.grad(z, xs, dz64.to(dtype))
    # the reference: float64 on the same (rounded) inputs, by the plain form (per document with doc_ids)
    ref_xs = [x.detach().double().requires_grad_() for x in xs]
    if doc_ids is None:
        rq, rk, rv = ref_xs[:3]
        rq2, rk2 = (ref_xs[3], ref_xs[4]) if len(ref_xs) == 5 else (None, None)
        ref = quadratic_attention(rq, rk, rv, scale=scale, q2=rq2, k2=rk2, key_mask=key_mask, impl="plain")
    else:
        ref = _per_document(ref_xs, key_mask, doc_ids, scale)
    ref_grads = torch.autograd.grad(ref, ref_xs, dz64.to(dtype).double())
    names = ["z", "dq", "dk", "dv", "dq2", "dk2"]
    out = {}
    for n, a, r in zip(names, [z, *grads], [ref, *ref_grads]):
        out[n] = [(a.double() - r).abs().max().item(), r.abs().max().item()]
    if dtype != torch.float64:
        # the plain form in the same dtype, against the same float64 reference: the accuracy to match
        pq, pk, pv = (x.detach().requires_grad_() for x in xs[:3])
        p2 = [x.detach().requires_grad_() for x in xs[3:]]
        plain_xs = [pq, pk, pv, *p2]
        zp = quadratic_attention(pq, pk, pv, scale=scale, q2=p2[0] if p2 else None, k2=p2[1] if p2 else None,
                                 key_mask=key_mask, impl="plain")
        plain_grads = torch.autograd.grad(zp, plain_xs, dz64.to(dtype))
        for n, a, r in zip(names, [zp, *plain_grads], [ref, *ref_grads]):
            out[n].append((a.double() - r).abs().max().item())
    return out


def _double_backward() -> dict:
    """create_graph=True through the fused form (its gradients then come from the dense autograd
    form) against the plain form's second derivatives, float64."""
    import torch

    from qtoy_core.ops.quadratic import quadratic_attention

    xs64, _, _, doc_ids = _inputs(dict(tq=9, tk=20, bilinear=True, docs=[[20], [20]]))
    out = {}
    results = []
    for impl in ("fused", "plain"):
        xs = [x.clone().requires_grad_() for x in xs64]
        z = quadratic_attention(xs[0], xs[1], xs[2], scale=0.3, q2=xs[3], k2=xs[4], impl=impl)
        first = torch.autograd.grad(z.square().sum(), xs, create_graph=True)
        results.append(torch.autograd.grad(sum((g * g).sum() for g in first), xs))
    for n, a, r in zip(["ddq", "ddk", "ddv", "ddq2", "ddk2"], *results):
        out[n] = [(a - r).abs().max().item(), r.abs().max().item()]
    return out


def _dispatch() -> dict:
    """quadratic_attention(impl="fused") on CPU tensors (interpreter) with a key mask equals the plain
    form, eager and under torch.compile(fullgraph=True); impl="auto" on CPU stays with plain/chunked."""
    import torch

    from qtoy_core.ops import fused_quadratic
    from qtoy_core.ops.quadratic import quadratic_attention

    xs, _, key_mask, _ = _inputs(dict(tq=19, tk=19, key_mask=[[4], [18]]))
    z = quadratic_attention(*xs, scale=0.3, key_mask=key_mask, impl="fused")
    ref = quadratic_attention(*xs, scale=0.3, key_mask=key_mask, impl="plain")
    assert not fused_quadratic.fused_supports(*xs), "impl='auto' must not pick the fused kernel for CPU tensors"
    # document masking reaches the kernel through quadratic_attention (what the model calls)
    docs = torch.tensor([[0] * 7 + [1] * 5 + [2] * 7, [0] * 12 + [1] * 7])
    zd = quadratic_attention(*xs, scale=0.3, doc_ids=docs, impl="fused")
    refd = quadratic_attention(*xs, scale=0.3, doc_ids=docs, impl="plain")
    # torch.compile traces the wrapper whole (the kernels are one opaque custom op) and its backward
    xs = [x.clone().requires_grad_() for x in xs]
    step = torch.compile(lambda q, k, v: quadratic_attention(q, k, v, scale=0.3, key_mask=key_mask, impl="fused"),
                         fullgraph=True, backend="aot_eager")
    zc = step(*xs)
    grads = torch.autograd.grad(zc, xs, torch.ones_like(zc))
    ref_xs = [x.detach().clone().requires_grad_() for x in xs]
    ref_c = quadratic_attention(*ref_xs, scale=0.3, key_mask=key_mask, impl="plain")
    ref_grads = torch.autograd.grad(ref_c, ref_xs, torch.ones_like(ref_c))
    out = {"z": [(z - ref).abs().max().item(), ref.abs().max().item()],
           "doc_ids_z": [(zd - refd).abs().max().item(), refd.abs().max().item()],
           "compiled_z": [(zc - ref).abs().max().item(), ref.abs().max().item()]}
    for n, a, r in zip(["compiled_dq", "compiled_dk", "compiled_dv"], grads, ref_grads):
        out[n] = [(a - r).abs().max().item(), r.abs().max().item()]
    return out


def _empty() -> dict:
    """No query, or an empty batch: empty outputs, zero gradients of the right shapes."""
    import torch

    from qtoy_core.ops.fused_quadratic import fused_quadratic_attention

    out = {}
    for b, tq, tk in ((2, 0, 6), (0, 5, 5)):
        xs = [torch.randn(b, 2, t, 4, dtype=torch.float64, requires_grad=True) for t in (tq, tk, tk)]
        z = fused_quadratic_attention(*xs, scale=0.5)
        assert z.shape == (b, 2, tq, 4), z.shape
        z.sum().backward()
        assert all(x.grad is not None and x.grad.shape == x.shape and not x.grad.any() for x in xs)
        out[f"b{b}_tq{tq}_tk{tk}"] = [0.0, 1.0]
    return out


def _opcheck() -> dict:
    """torch.library.opcheck on the custom op: schema, fake (meta) kernel, autograd registration and
    torch.compile tracing (AOT dispatch) agree with the real kernel."""
    import torch

    import qtoy_core.ops.fused_quadratic  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(3)
    q, k, v, q2, k2 = (torch.randn(1, 2, t, 16, generator=g, dtype=torch.float64, requires_grad=True)
                       for t in (16, 24, 24, 16, 24))
    doc = torch.tensor([[0] * 10 + [1] * 14])
    for args in ((q, k, v, None, None, None, 0.5, 16, 16), (q, k, v, q2, k2, doc, 0.5, 16, 16)):
        torch.library.opcheck(torch.ops.qtoy.fused_quadratic_fwd.default, args)
    return {"opcheck": [0.0, 1.0]}


SPECIAL = {"double_backward": _double_backward, "dispatch_impl_fused": _dispatch, "empty_inputs": _empty,
           "opcheck": _opcheck}


def main(names) -> None:
    results = {}
    for name in names:
        try:
            results[name] = SPECIAL[name]() if name in SPECIAL else run_case(name)
        except Exception:  # reported per case, so one failure does not hide the others
            results[name] = {"error": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or [*CASES, *SPECIAL])
