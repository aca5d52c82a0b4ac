"""Functional similarity (qtoy_core.analysis.similarity): the exact estimator against brute-force
enumeration and Monte Carlo, its identities, the data estimator's error bar, and the refusals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import qtoy_core
from qtoy_core.analysis.similarity import SimilarityError, exact_inner_products, similarity, similarity_matrix

TINY = dict(d_model=8, n_head=2, vocab_size=5, n_ctx=3)


def randomised(model, std=0.4, seed=0):
    """Every weight random (output projections start at zero), so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def make(model_type="attention_only_1L", seed=0, sizes=TINY, **options):
    return randomised(qtoy_core.build_model(model_type, **{**sizes, **options}), seed=seed).double()


def brute_force(a, b, T, positions):
    """<f_a, f_b> by enumerating all vocab^T sequences (float64 forward passes)."""
    V = a.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    with torch.no_grad():
        la, lb = a(seqs).double(), b(seqs).double()
    if positions == "last":
        la, lb = la[:, -1], lb[:, -1]
    return float((la * lb).sum(dim=tuple(range(1, la.ndim))).mean())


CASES = {
    "quadratic_rope_1L": ("attention_only_1L", dict(attn="quadratic")),
    "bilinear_learned_1L": ("attention_only_1L", dict(attn="bilinear", pos="learned")),
    "quadratic_2L": ("attention_only_2L", dict(attn="quadratic")),
    "transformer_1L_bilinear_mlp": ("transformer_1L", dict(attn="quadratic", mlp="bilinear")),
}


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_matches_enumeration(case, positions):
    model_type, options = CASES[case]
    T = 2 if model_type.endswith("2L") or model_type.startswith("transformer") else 3
    a, b = make(model_type, seed=0, **options), make(model_type, seed=1, **options)
    G = exact_inner_products([a, b], n_ctx=T, positions=positions)
    for i, j in [(0, 0), (0, 1), (1, 1)]:
        ref = brute_force([a, b][i], [a, b][j], T, positions)
        assert abs(G[i, j] - ref) <= 1e-10 * max(1.0, abs(ref)), (i, j, G[i, j], ref)
    sim = similarity(a, b, "exact", n_ctx=T, positions=positions)
    ref = brute_force(a, b, T, positions) / math.sqrt(brute_force(a, a, T, positions) * brute_force(b, b, T, positions))
    assert abs(sim.value - ref) < 1e-10


def test_hyper_optimized_path_gives_the_same_exact_value(monkeypatch):
    import qtoy_core.analysis.similarity as sim_mod

    monkeypatch.setattr(sim_mod, "HYPER_REPEATS", 4)  # the search's breadth, not its correctness, is at stake
    a, b = make("attention_only_2L", seed=0), make("attention_only_2L", seed=1)
    G = exact_inner_products([a, b], n_ctx=2, optimize="hyper")
    for i, j in [(0, 0), (0, 1), (1, 1)]:
        ref = brute_force([a, b][i], [a, b][j], 2, "last")
        assert abs(G[i, j] - ref) <= 1e-10 * max(1.0, abs(ref)), (i, j, G[i, j], ref)
    assert sim_mod.path_optimizer("hyper") is sim_mod.path_optimizer("hyper")  # one optimizer: paths cached
    assert sim_mod.path_optimizer("greedy") == "greedy"


def test_exact_identities():
    a, b = make(seed=0), make(seed=1)
    assert abs(similarity(a, a, "exact").value - 1.0) < 1e-12
    ab, ba = similarity(a, b, "exact").value, similarity(b, a, "exact").value
    assert abs(ab - ba) < 1e-12 and -1 <= ab <= 1 and abs(ab) < 0.999
    values, errs = similarity_matrix([a, b, a], "exact")
    assert np.allclose(np.diag(values), 1.0) and np.allclose(values, values.T) and np.all(errs == 0)
    assert abs(values[0, 2] - 1.0) < 1e-12 and abs(values[0, 1] - ab) < 1e-12


def test_exact_within_three_standard_errors_of_monte_carlo():
    for positions, sizes in (("last", dict(d_model=8, n_head=2, vocab_size=7, n_ctx=4)),
                             ("all", dict(d_model=8, n_head=2, vocab_size=6, n_ctx=3))):
        a, b = make(seed=0, sizes=sizes), make(seed=1, sizes=sizes)
        exact = similarity(a, b, "exact", positions=positions)
        mc = similarity(a, b, "data", positions=positions, samples=4000, seed=3)
        assert mc.stderr > 0 and mc.samples == 4000
        assert abs(mc.value - exact.value) < 3 * mc.stderr, (positions, exact.value, mc.value, mc.stderr)


def test_data_error_bar_is_calibrated_for_a_softmax_model():
    """z = (estimate - truth) / stderr over many independent small estimates has mean ~0, std ~1;
    the truth of a softmax model with RMSNorm comes from enumerating every sequence."""
    from qtoy_core.analysis.similarity import _cosine_with_error, _data_products

    sizes = dict(d_model=8, n_head=2, vocab_size=6, n_ctx=3)
    a = make("transformer_1L", seed=0, sizes=sizes, attn="softmax", mlp="gelu", norm="rmsnorm")
    b = make("transformer_1L", seed=1, sizes=sizes, attn="softmax", mlp="gelu", norm="rmsnorm")
    truth = brute_force(a, b, 3, "last") / math.sqrt(brute_force(a, a, 3, "last") * brute_force(b, b, 3, "last"))
    n, repeats = 50, 400
    P = _data_products([a, b], None, 3, "last", n * repeats, 4096, seed=0)  # independent uniform sequences
    z = []
    for r in range(repeats):
        chunk = P[:, :, r * n:(r + 1) * n]
        value, stderr, *_ = _cosine_with_error(chunk[0, 1], chunk[0, 0], chunk[1, 1])
        z.append((value - truth) / stderr)
    z = np.array(z)
    assert abs(z.mean()) < 0.25 and 0.8 < z.std() < 1.25, (z.mean(), z.std())
    assert 0.9 < np.mean(np.abs(z) < 1.96) <= 1.0
    full = similarity(a, b, "data", samples=n * repeats, batch_size=4096)  # the public call: same estimator
    assert abs(full.value - truth) < 4 * full.stderr


def test_data_reads_batches_of_a_stream():
    a, b = make(seed=0), make(seed=1)
    rows = torch.randint(0, 5, (40, 4), generator=torch.Generator().manual_seed(0))  # n_ctx + 1 columns
    batches = [(rows[:20], None), (rows[20:], None)]
    est = similarity(a, b, "data", batches=batches, samples=0)
    la, lb = a(rows[:, :3]).double()[:, -1], b(rows[:, :3]).double()[:, -1]
    ref = float((la * lb).sum(-1).mean() / ((la * la).sum(-1).mean() * (lb * lb).sum(-1).mean()).sqrt())
    assert est.samples == 40 and abs(est.value - ref) < 1e-12


def test_errors_are_one_clear_message():
    a = make(seed=0)
    with pytest.raises(SimilarityError, match="different vocabularies"):
        similarity(a, make(seed=1, sizes={**TINY, "vocab_size": 6}))
    with pytest.raises(SimilarityError, match="different contexts"):
        similarity(a, make(seed=1, sizes={**TINY, "n_ctx": 4}))
    soft = make(seed=1, attn="softmax")
    with pytest.raises(SimilarityError, match="method='data'") as info:
        similarity(a, soft, "exact")
    assert "polynomial" in str(info.value)
    assert abs(similarity(a, soft, "data", samples=64).value) <= 1  # data works for any model
    with pytest.raises(SimilarityError, match="positions"):
        similarity(a, a, positions="first")
    with pytest.raises(SimilarityError, match="method"):
        similarity(a, a, "sampled")
