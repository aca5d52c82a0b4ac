"""Weight views, factored circuits and the activation cache against dense computations and the model."""

import json

import pytest
import torch

from qtoy_core import build_model
from qtoy_core.analysis import (
    FactoredMatrix,
    analyze_model,
    composition_baseline,
    composition_scores,
    direct_path,
    direct_path_top,
    hook_names,
    mlp_eigen,
    mlp_interaction,
    model_weights,
    ov_circuit,
    positional_qk,
    qk_circuit,
    qk_kernel,
    qk_matrix,
    rank_head_pairs,
    search_topk,
    spectrum,
)
from qtoy_core.analysis.weights import relative_rotations

V, D, H, T = 48, 32, 4, 12


def small(model_type="attention_only_1L", seed=0, std=0.3, **options):
    """A small model with every weight random (out_proj included, which starts at zero)."""
    torch.manual_seed(seed)
    opts = dict(vocab_size=V, d_model=D, n_head=H, n_ctx=T, positional="none")
    opts.update(options)
    model = build_model(model_type, **opts)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def head_rows(linear, h, d):
    return linear.weight[h * d:(h + 1) * d]  # (d_head, d_model) rows of head h


# ------------------------------------------------------------------------------------- views
def test_weight_views_reproduce_the_attention_and_mlp():
    model = small("transformer_1L", attn="bilinear")
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    views = attn.weight_views()
    d = attn.d_head
    assert views["W_Q"].shape == (H, D, d) and views["W_O"].shape == (H, d, D)
    assert views["W_Q2"].shape == (H, D, d) and views["qk"] == [("W_Q", "W_K", 1 / d), ("W_Q2", "W_K2", 1 / d)]
    x = torch.randn(5, D)
    for name, proj in (("W_Q", attn.q_proj), ("W_K", attn.k_proj), ("W_V", attn.v_proj), ("W_K2", attn.k2_proj)):
        torch.testing.assert_close(torch.einsum("nm,hmd->nhd", x, views[name]), proj(x).view(5, H, d))
    z = torch.randn(5, H, d)
    torch.testing.assert_close(torch.einsum("nhd,hdm->nm", z, views["W_O"]), attn.out_proj(z.reshape(5, H * d)))
    mv = mlp.weight_views()
    torch.testing.assert_close(mv["W_out"] @ ((mv["W_l"] @ x.T) * (mv["W_r"] @ x.T)), mlp(x).T)
    quad = small().blocks[0].attn.weight_views()
    assert quad["qk"] == [("W_Q", "W_K", 1 / d)] * 2 and quad["pattern"] == "product"
    assert small(attn="softmax").blocks[0].attn.weight_views()["pattern"] == "other"


def test_plugin_views_are_used_and_checked(monkeypatch):
    model = small()
    attn = model.blocks[0].attn
    base = attn.weight_views()
    doubled = dict(base, W_V=2 * base["W_V"])
    monkeypatch.setattr(attn, "weight_views", lambda: doubled, raising=False)
    torch.testing.assert_close(ov_circuit(model, 0).AB, 2 * ov_circuit(small(), 0).AB)
    monkeypatch.setattr(attn, "weight_views", lambda: dict(base, qk=[("W_Q", "W_Z", 1.0)]), raising=False)
    with pytest.raises(KeyError, match="W_Z"):
        model_weights(model)
    learned = small(positional="learned")
    assert model_weights(learned).W_pos.shape == (T, D)  # no weight_views: its W_* parameters


# ---------------------------------------------------------------------------------- circuits
def test_direct_path_qk_and_ov_match_dense_products():
    for tie in (True, False):
        model = small("attention_only_2L", tie_embeddings=tie)
        W_E, W_U = model.embed.weight, model.unembed.weight.T
        torch.testing.assert_close(direct_path(model).AB, W_E @ W_U)
        for layer in range(2):
            attn = model.blocks[layer].attn
            d = attn.d_head
            qk, ov = qk_circuit(model, layer), ov_circuit(model, layer)
            assert qk.shape == (H, V, V) and ov.shape == (H, V, V)
            for h in range(H):
                Wq, Wk, Wv = (head_rows(p, h, d) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
                Wo = attn.out_proj.weight[:, h * d:(h + 1) * d]
                torch.testing.assert_close(qk.AB[h], (W_E @ Wq.T @ Wk @ W_E.T) / d)
                torch.testing.assert_close(ov.AB[h], W_E @ Wv.T @ Wo.T @ W_U)


def test_quadratic_pattern_is_the_squared_qk_form():
    model = small()
    tokens = torch.randperm(V)[:T][None]
    _, cache = model.run_with_cache(tokens)
    pattern, scores = cache["blocks.0.attn.hook_pattern"][0], cache["blocks.0.attn.hook_scores"][0]
    assert torch.all(pattern.triu(1) == 0)
    form = qk_circuit(model, 0).AB[:, tokens[0]][:, :, tokens[0]]  # (H, T, T): query, key tokens
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    torch.testing.assert_close(pattern, torch.where(causal, form.square(), torch.zeros(())))
    torch.testing.assert_close(scores, form)


def test_bilinear_attention_score_is_the_product_of_its_two_qk_circuits():
    model = small(attn="bilinear")
    tokens = torch.randint(0, V, (1, T))
    _, cache = model.run_with_cache(tokens, ["blocks.0.attn.hook_scores"])
    t = tokens[0]
    f0 = qk_circuit(model, 0, factor=0).AB[:, t][:, :, t]
    f1 = qk_circuit(model, 0, factor=1).AB[:, t][:, :, t]
    torch.testing.assert_close(cache["blocks.0.attn.hook_scores"][0], f0 * f1)
    with pytest.raises(ValueError, match="factor 2"):
        qk_circuit(model, 0, factor=2)


def test_rope_kernel_matches_the_model_q_k_path_at_every_offset():
    model = small(positional="rope", std=0.2)
    tokens = torch.randint(0, V, (1, T))
    _, cache = model.run_with_cache(tokens, "blocks.0.attn.hook_scores")
    scores = cache["blocks.0.attn.hook_scores"][0]  # (H, T, T) scaled q.k after rotation
    t = tokens[0].tolist()
    pairs = [(t[i], t[j]) for i in range(T) for j in range(i + 1)]
    for h in (0, H - 1):
        kern = qk_kernel(model, 0, h, pairs)  # (P, n_ctx)
        assert kern.shape == (len(pairs), T)
        got = torch.stack([kern[p, i - j] for p, (i, j) in enumerate((i, j) for i in range(T) for j in range(i + 1))])
        want = torch.stack([scores[h, i, j] for i in range(T) for j in range(i + 1)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the factored circuit at an offset is the same form; offset 0 is the unrotated circuit
    for offset in (0, 3, T - 1):
        fm = qk_circuit(model, 0, offset=offset)
        torch.testing.assert_close(fm.AB[1, [p[0] for p in pairs], [p[1] for p in pairs]],
                                   qk_kernel(model, 0, 1, pairs, offsets=[offset])[:, 0], rtol=1e-4, atol=1e-6)
    assert torch.equal(relative_rotations(model.positional, [0], D // H)[0], torch.eye(D // H))
    assert qk_kernel(model, 0, 0, pairs[:3]).std(1).min() > 0  # RoPE: it does depend on the offset
    torch.testing.assert_close(qk_matrix(model, 0, offset=2).AB[0],
                               model_weights(model).layers[0].attn["W_Q"][0] / (D // H)
                               @ relative_rotations(model.positional, [2], D // H)[0]
                               @ model_weights(model).layers[0].attn["W_K"][0].T)


def test_norm_gains_are_folded():
    model = small("transformer_1L", norm="rmsnorm", tie_embeddings=False)
    blk = model.blocks[0]
    with torch.no_grad():
        for norm in (blk.ln1, blk.ln2, model.ln_final):
            norm.weight.normal_(1.0, 0.5)
    w = model_weights(model)
    assert any("rms" in n.lower() or "RMSNorm" in n for n in w.notes)
    g1, gf = blk.ln1.weight, model.ln_final.weight
    torch.testing.assert_close(direct_path(model).AB, model.embed.weight @ (gf[:, None] * model.unembed.weight.T))
    d = blk.attn.d_head
    Wq, Wk = head_rows(blk.attn.q_proj, 0, d), head_rows(blk.attn.k_proj, 0, d)
    E = model.embed.weight * g1
    torch.testing.assert_close(qk_circuit(model, 0).AB[0], E @ Wq.T @ Wk @ E.T / d)


def test_spectra_and_copying_scores_match_dense():
    model = small("attention_only_1L", std=0.5)
    ov = ov_circuit(model, 0)
    specs = spectrum(ov)
    for h in range(H):
        dense = torch.linalg.eigvals(ov.AB[h].double())
        dense = dense[dense.abs().argsort(descending=True)][: D // H]
        got = specs[h].eigenvalues.to(torch.complex128)
        assert got.shape == dense.shape
        gap = (got[:, None] - dense[None, :]).abs().min(0).values  # same multiset (conjugate pairs in any order)
        assert float(gap.max()) < 1e-3 * float(dense.abs().max())
        want = float(dense.real.sum() / dense.abs().sum())
        assert specs[h].copying_score == pytest.approx(want, rel=1e-3, abs=1e-5)
    # a positive-definite circuit copies perfectly, a negative-definite one anti-copies
    E = torch.randn(V, 6)
    assert spectrum(FactoredMatrix(E, E.T))[0].copying_score == pytest.approx(1.0, abs=1e-5)
    assert spectrum(FactoredMatrix(E, -E.T))[0].copying_score == pytest.approx(-1.0, abs=1e-5)


@torch.no_grad()
def test_composition_scores_match_the_dense_formula():
    model = small("attention_only_2L", positional="rope", attn="bilinear")
    cs = composition_scores(model, 0, 1)
    assert cs.q.shape == (2, H, H) and cs.k.shape == (2, H, H) and cs.v.shape == (H, H)
    a0, a1 = model.blocks[0].attn, model.blocks[1].attn
    d = a0.d_head

    def fro(x):
        return torch.linalg.matrix_norm(x)

    for h1 in range(H):
        ov1 = head_rows(a0.v_proj, h1, d).T @ a0.out_proj.weight[:, h1 * d:(h1 + 1) * d].T  # (D, D) row form
        for h2 in range(H):
            ov2 = head_rows(a1.v_proj, h2, d).T @ a1.out_proj.weight[:, h2 * d:(h2 + 1) * d].T
            for f, (qp, kp) in enumerate(((a1.q_proj, a1.k_proj), (a1.q2_proj, a1.k2_proj))):
                qk2 = head_rows(qp, h2, d).T @ head_rows(kp, h2, d)
                q_want = fro(ov1 @ qk2) / (fro(ov1) * fro(qk2))
                k_want = fro(ov1 @ qk2.T) / (fro(ov1) * fro(qk2))
                assert float(cs.q[f, h1, h2]) == pytest.approx(float(q_want), rel=1e-4)
                assert float(cs.k[f, h1, h2]) == pytest.approx(float(k_want), rel=1e-4)
            assert float(cs.v[h1, h2]) == pytest.approx(float(fro(ov1 @ ov2) / (fro(ov1) * fro(ov2))), rel=1e-4)
    base = composition_baseline(D, d)
    assert 0 < base["k"] < 0.5 and set(base) == {"q", "k", "v"}
    ranked = rank_head_pairs(model, "k", top=5)
    assert len(ranked) == 5 and ranked[0].score == pytest.approx(float(cs.k.max()), rel=1e-6)
    assert ranked[0].score >= ranked[-1].score and ranked[0].copying_score_to is not None
    # a zero-initialised W_O (fresh model) gives 0, not NaN
    fresh = build_model("attention_only_2L", vocab_size=V, d_model=D, n_head=H, n_ctx=T)
    assert torch.all(composition_scores(fresh, 0, 1).k == 0)


@torch.no_grad()
def test_bilinear_mlp_quadratic_form_and_eigendecomposition():
    model = small("transformer_1L", tie_embeddings=False)
    mlp = model.blocks[0].mlp
    x = torch.randn(7, D)
    u = torch.randn(D)
    Q = mlp_interaction(model, 0, u)
    torch.testing.assert_close(Q, Q.T)
    torch.testing.assert_close(mlp(x) @ u, torch.einsum("ni,ij,nj->n", x, Q, x), rtol=1e-4, atol=1e-4)
    res = mlp_eigen(model, 0, 5, top=3, top_tokens=4)
    assert res.output_token == 5 and len(res.directions) == 3
    Q5 = mlp_interaction(model, 0, model.unembed.weight[5])
    evals, evecs = torch.linalg.eigh(Q5)
    assert res.directions[0].eigenvalue == pytest.approx(float(evals[evals.abs().argmax()]), rel=1e-4)
    v = evecs[:, evals.abs().argmax()]
    assert res.directions[0].top_tokens[0]["token"] == int((model.embed.weight @ v).abs().argmax())
    assert res.trace == pytest.approx(float(torch.trace(Q5)), rel=1e-3, abs=1e-4)
    json.dumps(res.to_dict())


def test_top_pairs_exact_and_restricted_search():
    model = small("attention_only_1L", tie_embeddings=False)
    dense = direct_path(model).AB
    raw = direct_path_top(model, 5, centre=False)
    vals, idx = dense.flatten().topk(5)
    assert [(p.row, p.col) for p in raw.pairs] == [(int(i) // V, int(i) % V) for i in idx] and raw.exact
    # the default ranking: row-centred logits (untied embeddings: the diagonal stays in)
    top = direct_path_top(model, 5)
    vals, idx = (dense - dense.mean(1, keepdim=True)).flatten().topk(5)
    assert [(p.row, p.col) for p in top.pairs] == [(int(i) // V, int(i) % V) for i in idx] and top.exact
    assert [p.logit for p in top.pairs] == pytest.approx([float(dense[p.row, p.col]) for p in top.pairs], rel=1e-5)
    # a restricted search: certified when a few rows/columns dominate, uncertified otherwise
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(500, 8, generator=g), torch.randn(8, 400, generator=g)
    A[:3] *= 50
    B[:, :4] *= 50
    f = search_topk(FactoredMatrix(A, B), 4, abs=True, max_tokens=64)[0]
    exact = (A @ B).abs().flatten().topk(4)
    assert f.exact and f.searched_rows == 64
    assert sorted((int(r) * 400 + int(c)) for r, c in zip(f.rows, f.cols)) == sorted(exact.indices.tolist())
    A2, B2 = torch.randn(500, 8, generator=g), torch.randn(8, 400, generator=g)
    assert not search_topk(FactoredMatrix(A2, B2), 4, max_tokens=64)[0].exact


# ------------------------------------------------------------------------------------- cache
def close_at_scale(actual, expected, rel=1e-5):
    """Equal up to float32 rounding relative to the tensor's scale: a forward that reads the pattern
    through hooks builds it explicitly, the plain forward uses the blocked kernel (the same maths in
    another order), and these weights make activations reach ~1e11."""
    expected = expected.detach()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def test_run_with_cache_names_shapes_and_cleanup():
    model = small("transformer_2L", positional="learned", attn="quadratic")
    B_, T_ = 2, 9
    tokens = torch.randint(0, V, (B_, T_))
    logits, cache = model.run_with_cache(tokens)
    close_at_scale(logits, model(tokens))
    names = hook_names(model)
    assert list(cache) == names
    d, dm = D // H, 4 * D
    expect = {"hook_embed": (B_, T_, D), "hook_pos_embed": (T_, D)}
    for i in range(2):
        b = f"blocks.{i}."
        expect.update({b + "hook_resid_pre": (B_, T_, D), b + "hook_attn_out": (B_, T_, D),
                       b + "hook_resid_mid": (B_, T_, D), b + "hook_mlp_out": (B_, T_, D),
                       b + "hook_resid_post": (B_, T_, D), b + "attn.hook_q": (B_, T_, H, d),
                       b + "attn.hook_k": (B_, T_, H, d), b + "attn.hook_v": (B_, T_, H, d),
                       b + "attn.hook_rot_q": (B_, T_, H, d), b + "attn.hook_rot_k": (B_, T_, H, d),
                       b + "attn.hook_scores": (B_, H, T_, T_), b + "attn.hook_pattern": (B_, H, T_, T_),
                       b + "attn.hook_z": (B_, T_, H, d), b + "attn.hook_result": (B_, T_, H, D),
                       b + "mlp.hook_left": (B_, T_, dm), b + "mlp.hook_right": (B_, T_, dm),
                       b + "mlp.hook_hidden": (B_, T_, dm)})
    assert {k: tuple(v.shape) for k, v in cache.items()} == expect
    for i in range(2):
        b = f"blocks.{i}."
        pattern = cache[b + "attn.hook_pattern"]
        assert torch.all(pattern.triu(1) == 0)
        torch.testing.assert_close(pattern, cache[b + "attn.hook_scores"].square().tril())
        attn = model.blocks[i].attn
        bias = attn.out_proj.bias if attn.out_proj.bias is not None else 0.0
        torch.testing.assert_close(cache[b + "attn.hook_result"].sum(2) + bias, cache[b + "hook_attn_out"],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache[b + "hook_resid_mid"],
                                   cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"])
    assert not cache["blocks.0.attn.hook_z"].requires_grad

    # filters: a name, a list, a predicate; hook_result alone does not leak hook_z
    _, c1 = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_result")
    assert list(c1) == ["blocks.1.attn.hook_result"]
    close_at_scale(c1["blocks.1.attn.hook_result"], cache["blocks.1.attn.hook_result"])
    _, c2 = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_post"))
    assert list(c2) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]

    def hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    assert hooks() == 0 and not model.blocks[0].attn.wants_pattern()
    with pytest.raises(IndexError):
        model.run_with_cache(torch.full((1, 3), V + 5))  # token out of range: the forward fails
    assert hooks() == 0


# ------------------------------------------------------------------------------------ report
class _Tok:
    def decode(self, ids):
        return f"<{ids[0]}>"


def test_analyze_model_is_json_able_and_complete():
    model = small("transformer_2L", positional="learned", attn="bilinear")
    report = analyze_model(model, tokenizer=_Tok(), top_k=3, mlp_tokens=2)
    json.dumps(report, allow_nan=False)
    assert report["model"]["attention"] == "bilinear" and report["model"]["n_layers"] == 2
    assert len(report["direct_path"]["pairs"]) == 3 and report["direct_path"]["pairs"][0]["row_token"].startswith("<")
    layer = report["layers"][0]
    assert layer["attention"]["n_qk_pairs"] == 2 and not layer["attention"]["score_is_squared"]
    head = layer["attention"]["heads"][0]
    assert [q["factor"] for q in head["qk"]] == [0, 1]
    p = head["qk"][0]["top_pairs"]["pairs"][0]
    assert p["score"] == pytest.approx(p["value"] * p["other_factor"])
    assert head["positional_profile"] is not None and len(head["positional_profile"]) == T
    assert -1 <= head["copying_score"] <= 1 and head["ov"]["spectrum"]["eigenvalues"]
    assert len(layer["mlp"]["outputs"]) == 2 and layer["mlp"]["outputs"][0]["directions"]
    assert report["composition"][0]["layer_from"] == 0 and len(report["head_pairs"]["k"]) == 3

    quad = analyze_model(small(positional="rope"), top_k=4)
    json.dumps(quad, allow_nan=False)
    att = quad["layers"][0]["attention"]
    assert att["score_is_squared"] and "SQUARE" in att["note"]
    qk = att["heads"][1]["qk"]
    assert len(qk) == 1 and qk[0]["top_pairs"]["ranked_by"] == "abs(value)"
    pairs = qk[0]["top_pairs"]["pairs"]
    assert all(q["squared"] == pytest.approx(q["value"] ** 2) for q in pairs)
    assert abs(pairs[0]["value"]) >= abs(pairs[-1]["value"])
    kern = qk[0]["kernel"]
    assert kern["score_is_squared"] and len(kern["forms"]) == 4 and len(kern["forms"][0]) == T
    assert kern["forms"][0][0] == pytest.approx(pairs[0]["value"], rel=1e-4)
    assert quad["composition"] == [] and quad["layers"][0]["mlp"] is None
    assert positional_qk(small(positional="rope"), 0) is None
