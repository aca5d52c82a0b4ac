"""Exact tensor networks of polynomial models (qtoy_core.analysis.tensor_network) against the forward
pass, the refusals, the plugin capability, the circuits and the contraction-path cache."""

from __future__ import annotations

import types
from typing import Literal

import numpy as np
import pytest
import torch

import qtoy_core
from qtoy_core import Attention, AttentionConfig, HookPoint, ProjectedAttention, QtoyError, hookimpl
from qtoy_core.analysis import circuits
from qtoy_core.analysis.tensor_network import (
    NotPolynomialError,
    PathCache,
    TensorNetworkBuildError,
    TNBuilder,
    contract_logits,
    full_circuit_tn,
    ov_circuit_tn,
    qk_circuit_tn,
    rotation_matrices,
    to_tensor_network,
)
from qtoy_core.ops.masks import causal_pattern

SIZES = dict(d_model=16, n_head=2, vocab_size=20, n_ctx=8)


def randomised(model, std=0.3, seed=0):
    """Every weight random (output projections start at zero), so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def make(model_type, dtype=torch.float64, seed=0, **options):
    return randomised(qtoy_core.build_model(model_type, **{**SIZES, **options}), seed=seed).to(dtype)


def tokens(batch, T, vocab=SIZES["vocab_size"], seed=1):
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- exactness
CASES = {
    "attn_only_1L_quadratic_rope": ("attention_only_1L", 5, dict(attn="quadratic")),
    "attn_only_2L_quadratic_rope": ("attention_only_2L", 4, dict(attn="quadratic")),
    "attn_only_2L_bilinear_learned": ("attention_only_2L", 4, dict(attn="bilinear", pos="learned")),
    "transformer_1L_rope": ("transformer_1L", 5, dict(attn="quadratic", mlp="bilinear")),
    "transformer_1L_bilinear_no_pos": ("transformer_1L", 4, dict(attn="bilinear", mlp="bilinear", pos="none")),
    "transformer_2L_rope": ("transformer_2L", 4, dict(attn="quadratic", mlp="bilinear")),
    "biases_untied_learned": ("transformer_1L", 4, dict(
        attn={"name": "quadratic", "bias": True}, mlp={"name": "bilinear", "bias": True}, pos="learned",
        tie_embeddings=False)),
    "bilinear_biases_rope_odd_heads": ("attention_only_1L", 4, dict(
        attn={"name": "bilinear", "bias": True}, d_model=12, n_head=3, d_head=6, tie_embeddings=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_network_equals_forward_float64(case):
    model_type, T, options = CASES[case]
    model = make(model_type, **options)
    tn = to_tensor_network(model, T)
    toks = tokens(3, T)
    with torch.no_grad():
        ref = model(toks)
    out = contract_logits(tn, toks)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-9


def test_network_equals_forward_float32():
    model = make("transformer_1L", dtype=torch.float32, attn="quadratic", mlp="bilinear")
    tn = to_tensor_network(model, 4)
    assert all(t.dtype == "float32" for t in tn)
    toks = tokens(2, 4)
    with torch.no_grad():
        ref = model(toks)
    out = contract_logits(tn, toks)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4


def test_open_indices_tags_and_shorter_inputs():
    model = make("attention_only_1L", attn="quadratic", pos="none", vocab_size=11)
    tn = to_tensor_network(model, 5)
    V = 11
    for t in range(5):
        assert tn.ind_size(f"tok_in_{t}") == V and tn.ind_size(f"logit_{t}") == V
        assert f"out_{t}" in tn.tag_map
    assert set(tn.outer_inds()) == {f"logit_{t}" for t in range(5)}  # tok_in_* are hyperindices
    # no dense tensor with many legs: at most 3 legs per tensor here
    assert max(t.ndim for t in tn) <= 3
    # one sequence, shorter than the network: the first 3 outputs only depend on the first 3 tokens
    toks = tokens(1, 3, vocab=V)[0]
    with torch.no_grad():
        ref = model(toks[None])[0]
    out = contract_logits(tn, toks)
    assert out.shape == (3, V) and rel_err(out, ref) < 1e-9
    # a network for the last position only
    last = to_tensor_network(model, 5, outputs=[4])
    assert set(last.outer_inds()) == {"logit_4"}
    with pytest.raises(ValueError, match="no output 0"):
        contract_logits(last, tokens(1, 5, vocab=V))


def test_a_quimb_user_can_contract_the_network_directly():
    """Fixing the tok_in indices (the one-hot contraction) and contracting one output's part."""
    model = make("attention_only_1L", attn="quadratic", vocab_size=7)
    tn = to_tensor_network(model, 3)
    toks = [3, 0, 5]
    with torch.no_grad():
        ref = model(torch.tensor([toks]))[0]
    fixed = tn.isel({f"tok_in_{t}": tok for t, tok in enumerate(toks)})
    part = fixed.select("out_2")
    got = part.contract(output_inds=["logit_2"], optimize="greedy").data
    np.testing.assert_allclose(got, ref[2].numpy(), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("options, kind, name, path", [
    (dict(model_type="attention_only_1L", attn="softmax"), "attention", "softmax", "blocks.0.attn"),
    (dict(model_type="attention_only_1L", norm="rmsnorm"), "norm", "rmsnorm", "blocks.0.ln1"),
    (dict(model_type="transformer_1L", mlp="gelu"), "mlp", "gelu", "blocks.0.mlp"),
])
def test_non_polynomial_components_are_refused_by_name(options, kind, name, path):
    options = dict(options)
    model = qtoy_core.build_model(options.pop("model_type"), **SIZES, **options)
    assert not model.config.is_polynomial
    with pytest.raises(NotPolynomialError) as info:
        to_tensor_network(model, 3)
    message = str(info.value)
    assert isinstance(info.value, QtoyError)
    assert f"{kind} {name!r} ({path}" in message and "is not polynomial" in message
    if kind == "attention":
        assert "'quadratic'" in message and "'bilinear'" in message


# --------------------------------------------------------------------------- plugin capability
class CubicConfig(AttentionConfig):
    """Cubic attention (test plugin): pattern = (q.k / d_head)^3, causal."""

    name: Literal["cubic_tn_test"] = "cubic_tn_test"
    bias: bool = False

    @property
    def is_polynomial(self) -> bool:
        return True


class CubicAttention(ProjectedAttention):
    def __init__(self, model, config, layer):
        super().__init__(model, config, layer)
        self.scale = 1.0 / model.d_head

    def mix(self, q, k, v, key_mask, state, **_):
        scores = (q @ k.transpose(-1, -2)) * self.scale
        return causal_pattern(scores ** 3, key_mask) @ v

    def tensor_network(self, tn, x, *, positional):
        q = positional.tensor_network(tn, tn.project(x, self.q_proj, label="q"), op="rotate")
        k = positional.tensor_network(tn, tn.project(x, self.k_proj, label="k"), op="rotate")
        v = tn.project(x, self.v_proj, label="v")

        def at(i):
            keys = tn.causal_keys(i)
            scores = [tn.head_dot(q(i), keys(k), self.n_head, scale=self.scale) for _ in range(3)]
            z = tn.head_scale(tn.mul(*scores, label="pattern"), keys(v), self.n_head)
            return tn.linear(keys.sum(z), self.out_proj.weight, self.out_proj.bias, label="attn_out")

        return tn.stream(at, self.out_proj.out_features, "attn_out")


class OpaqueConfig(CubicConfig):
    name: Literal["opaque_tn_test"] = "opaque_tn_test"


class OpaqueAttention(ProjectedAttention):
    """Polynomial by its config, but without the capability."""

    def mix(self, q, k, v, key_mask, state, **_):
        return causal_pattern((q @ k.transpose(-1, -2)) ** 2, key_mask) @ v


class FusedConfig(CubicConfig):
    """Quadratic attention with one fused qkv projection (test plugin): no q_proj / k_proj / v_proj."""

    name: Literal["fused_tn_test"] = "fused_tn_test"


class FusedQKVAttention(Attention):
    """pattern = (q.k / d_head)^2 from one fused (d_model -> 3 n_head d_head) projection: its weights
    are known to analysis only through weight_views()."""

    def __init__(self, model, config, layer):
        super().__init__()
        self.n_head, self.d_head = model.n_head, model.d_head
        self.qkv = torch.nn.Linear(model.d_model, 3 * model.n_head * model.d_head, bias=False)
        self.out_proj = torch.nn.Linear(model.n_head * model.d_head, model.d_model, bias=False)
        self.scale = 1.0 / model.d_head
        self.hook_scores = HookPoint()

    def forward(self, x, *, positional, positions, attention_mask=None, state=None):
        b, t, _ = x.shape
        q, k, v = (h.view(b, t, self.n_head, self.d_head).transpose(1, 2) for h in self.qkv(x).chunk(3, dim=-1))
        q, k = positional.rotate(q, positions), positional.rotate(k, positions)
        scores = self.hook_scores((q @ k.transpose(-1, -2)) * self.scale)
        z = causal_pattern(scores * scores) @ v
        return self.out_proj(z.transpose(1, 2).reshape(b, t, -1))

    def weight_views(self):
        W_Q, W_K, W_V = (w.detach().view(self.n_head, self.d_head, -1).transpose(1, 2) for w in self.qkv.weight.chunk(3))
        W_O = self.out_proj.weight.detach().view(-1, self.n_head, self.d_head).permute(1, 2, 0)
        return {"W_Q": W_Q, "W_K": W_K, "W_V": W_V, "W_O": W_O, "qk": [("W_Q", "W_K", self.scale)] * 2,
                "pattern": "product"}


@pytest.fixture
def test_plugin():
    def register(register):
        register(CubicConfig, CubicAttention)
        register(OpaqueConfig, OpaqueAttention)
        register(FusedConfig, FusedQKVAttention)

    registry = qtoy_core.get_registry()
    name = registry.add_plugin(types.SimpleNamespace(register_attentions=hookimpl(register)), name="tn-test-plugin")
    try:
        yield
    finally:
        registry.remove_plugin(name)


def test_third_party_component_with_the_capability_is_analysable(test_plugin):
    model = make("transformer_1L", attn="cubic_tn_test", mlp="bilinear", pos="rope")
    tn = to_tensor_network(model, 4)
    assert "blocks.0.attn" in tn.tag_map
    toks = tokens(2, 4)
    with torch.no_grad():
        ref = model(toks)
    assert rel_err(contract_logits(tn, toks), ref) < 1e-9


def test_third_party_component_without_the_capability_is_refused(test_plugin):
    model = make("attention_only_1L", attn="opaque_tn_test")
    with pytest.raises(NotPolynomialError, match=r"attention 'opaque_tn_test' \(blocks.0.attn\).*no tensor_network"):
        to_tensor_network(model, 3)


def test_builder_refuses_a_copied_or_dangling_wire():
    tn = TNBuilder(2)
    x = tn.embedding(0, torch.randn(5, 3))
    tn.linear(x, torch.randn(4, 3))
    with pytest.raises(TensorNetworkBuildError, match="used twice"):
        tn.linear(x, torch.randn(4, 3))
    with pytest.raises(TensorNetworkBuildError, match="never used"):
        tn.network()


def test_builder_primitives_are_exact():
    """add, mul, add_constant, multilinear, select + sum_over on one-hot inputs, against numpy."""
    rng = np.random.default_rng(0)
    W_E, A, B = rng.normal(size=(6, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    b, c, T = rng.normal(size=4), rng.normal(size=4), rng.normal(size=(4, 3, 4))
    toks = [2, 5, 1]
    tn = TNBuilder(3)
    x = tn.stream(lambda t: tn.embedding(t, W_E), 3)
    with tn.output_position(2):
        y = tn.add(tn.linear(x(0), A, b), tn.mul(tn.linear(x(1), B), tn.linear(x(2), A)), tn.add_constant(
            tn.linear(x(2), B), c), tn.multilinear(T, x(1), tn.linear(x(0), B)))
        keys = tn.key_sum([0, 1, 2])
        z = keys.sum(tn.mul(keys(tn.stream(lambda t: tn.linear(x(t), A), 4)),
                            keys(tn.stream(lambda t: tn.linear(x(t), B), 4))))
        tn.output(tn.add(y, z), np.eye(4), "logit_2")
    net = tn.network().isel({f"tok_in_{t}": tok for t, tok in enumerate(toks)})
    got = net.contract(output_inds=["logit_2"]).data
    e = W_E[toks]
    want = (A @ e[0] + b) + (B @ e[1]) * (A @ e[2]) + (B @ e[2] + c) + np.einsum("oab,a,b->o", T, e[1], B @ e[0]) \
        + sum((A @ e[j]) * (B @ e[j]) for j in range(3))
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --------------------------------------------------------------------------- circuits
def test_qk_and_ov_circuits_equal_dense_products():
    model = make("attention_only_1L", attn="quadratic", pos="none", n_head=2)
    attn, D = model.blocks[0].attn, model.config.d_head
    W_E, W_U = model.embed.weight.detach(), model.unembed.weight.detach()
    for head in range(2):
        sl = slice(head * D, (head + 1) * D)
        W_Q, W_K, W_V = (p.weight.detach()[sl] for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        W_O = attn.out_proj.weight.detach()[:, sl]
        qk = qk_circuit_tn(model, 0, head)
        assert {"tok_q", "resid_q", "head_q", "head_k", "resid_k", "tok_k"} <= set(qk.ind_map)
        got = qk.contract(output_inds=["tok_q", "tok_k"]).data
        np.testing.assert_allclose(got, (W_E @ W_Q.T @ W_K @ W_E.T).numpy(), rtol=1e-10, atol=1e-12)
        ov = ov_circuit_tn(model, 0, head)
        got = ov.contract(output_inds=["tok_out", "tok_in"]).data
        np.testing.assert_allclose(got, (W_U @ W_O @ W_V @ W_E.T).numpy(), rtol=1e-10, atol=1e-12)


def test_qk_circuit_with_rope_offset_matches_the_model_scores():
    model = make("attention_only_1L", attn="quadratic", pos="rope")
    attn = model.blocks[0].attn
    seen = {}
    attn.hook_scores.register_forward_hook(lambda mod, inp, out: seen.setdefault("scores", out))
    toks = tokens(1, 5)[0]
    with torch.no_grad():
        model(toks[None])
    scores = seen["scores"][0]  # (heads, query, key), already scaled
    for head in range(2):
        for i, j in [(0, 0), (3, 1), (4, 0), (4, 4)]:
            qk = qk_circuit_tn(model, 0, head, offset=i - j).contract(output_inds=["tok_q", "tok_k"]).data
            want = scores[head, i, j].item() / attn.scale
            assert qk[toks[i], toks[j]] == pytest.approx(want, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("attn_name", ["quadratic", "bilinear"])
def test_full_circuit_is_the_head_term_of_the_model(attn_name):
    """A one-layer model without positions or biases: logits_1 = direct path + sum over heads and
    keys of the full circuit."""
    model = make("attention_only_1L", attn=attn_name, pos="none", vocab_size=9)
    attn = model.blocks[0].attn
    full = [full_circuit_tn(model, 0, h).contract(output_inds=["tok_q", "tok_k", "tok_out"]).data for h in range(2)]
    # against the dense form of the definition
    D = model.config.d_head
    W_E = model.embed.weight.detach()
    for h in range(2):
        sl = slice(h * D, (h + 1) * D)
        factors = [attn.scale * (W_E @ q.weight.detach()[sl].T @ k.weight.detach()[sl] @ W_E.T)
                   for q, k, _ in attn.qk_factors()]
        ov = model.unembed.weight.detach() @ attn.out_proj.weight.detach()[:, sl] @ attn.v_proj.weight.detach()[sl] @ W_E.T
        want = factors[0][:, :, None] * factors[1][:, :, None] * ov.T[None]
        np.testing.assert_allclose(full[h], want.numpy(), rtol=1e-10, atol=1e-12)
    # against the model itself
    a, b = 4, 7
    with torch.no_grad():
        logits = model(torch.tensor([[a, b]]))[0, 1].numpy()
    direct = (model.unembed.weight @ model.embed.weight[b]).detach().numpy()
    heads = sum(full[h][b, a] + full[h][b, b] for h in range(2))
    np.testing.assert_allclose(logits, direct + heads, rtol=1e-10, atol=1e-10)


def test_circuit_networks_read_the_weights_as_analyze_does():
    """Norm gains folded and bilinear attention's second QK pair: the networks contract to the
    dense products of the (gain-folded) parameters, which are also `qtoy analyze`'s circuits."""
    model = make("attention_only_1L", attn="bilinear", norm="rmsnorm", pos="rope", vocab_size=9)
    attn, D = model.blocks[0].attn, model.config.d_head
    g1, g_final = model.blocks[0].ln1.weight.detach(), model.ln_final.weight.detach()
    assert not torch.allclose(g1, torch.ones_like(g1))  # random gains: folding them matters
    W_E, W_U = model.embed.weight.detach(), model.unembed.weight.detach()
    R = rotation_matrices(model.positional, [2, 0], D)
    for head in range(2):
        sl = slice(head * D, (head + 1) * D)
        for factor, (q_proj, k_proj) in enumerate([(attn.q_proj, attn.k_proj), (attn.q2_proj, attn.k2_proj)]):
            W_Q, W_K = q_proj.weight.detach()[sl] * g1, k_proj.weight.detach()[sl] * g1
            for offset, rot in [(0, torch.eye(D, dtype=torch.float64)), (2, R[0].T @ R[1])]:
                got = qk_circuit_tn(model, 0, head, offset=offset, factor=factor).contract(
                    output_inds=["tok_q", "tok_k"]).data
                want = W_E @ W_Q.T @ rot @ W_K @ W_E.T
                np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)
                analyzed = circuits.qk_circuit(model, 0, factor=factor, offset=offset).AB[head] / attn.scale
                np.testing.assert_allclose(got, analyzed.numpy(), rtol=1e-5, atol=1e-6)
        W_V, W_O = attn.v_proj.weight.detach()[sl] * g1, attn.out_proj.weight.detach()[:, sl]
        got = ov_circuit_tn(model, 0, head).contract(output_inds=["tok_out", "tok_in"]).data
        np.testing.assert_allclose(got, (W_U * g_final @ W_O @ W_V @ W_E.T).numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got, circuits.ov_circuit(model, 0).AB[head].T.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="factor 2 is out of range"):
        qk_circuit_tn(model, 0, 0, factor=2)
    with pytest.raises(ValueError, match="head 2 is out of range"):
        ov_circuit_tn(model, 0, 2)


def test_circuit_networks_of_a_plugin_attention_with_only_weight_views(test_plugin):
    """A fused-qkv attention (no q_proj/k_proj/v_proj): the networks come from its weight views and
    match the model itself (its scores, and its head terms in the logits)."""
    model = make("attention_only_1L", attn="fused_tn_test", pos="none", vocab_size=9)
    attn = model.blocks[0].attn
    seen = {}
    attn.hook_scores.register_forward_hook(lambda mod, inp, out: seen.setdefault("scores", out))
    a, b = 4, 7
    with torch.no_grad():
        logits = model(torch.tensor([[a, b]]))[0, 1].numpy()
    for head in range(2):
        qk = qk_circuit_tn(model, 0, head).contract(output_inds=["tok_q", "tok_k"]).data
        assert qk[b, a] == pytest.approx(seen["scores"][0, head, 1, 0].item() / attn.scale, rel=1e-9)
    full = [full_circuit_tn(model, 0, h).contract(output_inds=["tok_q", "tok_k", "tok_out"]).data for h in range(2)]
    direct = (model.unembed.weight @ model.embed.weight[b]).detach().numpy()
    np.testing.assert_allclose(logits, direct + sum(full[h][b, a] + full[h][b, b] for h in range(2)),
                               rtol=1e-10, atol=1e-10)


def test_full_circuit_needs_a_product_pattern():
    model = make("attention_only_1L", attn="softmax", pos="none")
    assert qk_circuit_tn(model, 0, 0).contract(output_inds=["tok_q", "tok_k"]).data.shape == (20, 20)
    with pytest.raises(NotPolynomialError, match="does not declare its pattern as a product"):
        full_circuit_tn(model, 0, 0)


def test_rotation_matrices_are_identity_without_rope():
    model = make("attention_only_1L", pos="learned")
    np.testing.assert_array_equal(rotation_matrices(model.positional, [0, 3], 8).numpy(), np.stack([np.eye(8)] * 2))


# --------------------------------------------------------------------------- path cache
def test_contraction_path_is_cached_by_structure():
    model = make("attention_only_2L", attn="quadratic")
    tn = to_tensor_network(model, 4)
    cache = PathCache()
    toks = tokens(2, 4)
    first = contract_logits(tn, toks, cache=cache)
    assert (cache.misses, cache.hits, len(cache)) == (4, 0, 4)
    searched = cache.search_seconds
    second = contract_logits(tn, tokens(2, 4, seed=5), cache=cache)
    assert (cache.misses, cache.hits) == (4, 4) and cache.search_seconds == searched
    assert not torch.equal(first, second)
    # a network rebuilt from another model of the same config reuses the paths
    other = to_tensor_network(make("attention_only_2L", attn="quadratic", seed=3), 4)
    contract_logits(other, toks, cache=cache)
    assert (cache.misses, cache.hits) == (4, 8)


def test_any_cotengra_optimizer_can_choose_the_path():
    model = make("transformer_1L", attn="quadratic", mlp="bilinear")
    tn = to_tensor_network(model, 3)
    toks = tokens(2, 3)
    with torch.no_grad():
        ref = model(toks)
    cache = PathCache()
    assert rel_err(contract_logits(tn, toks, optimize="greedy", cache=cache), ref) < 1e-9
    assert cache.misses == 3
