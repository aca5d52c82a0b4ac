"""QKProductAttention, the one base of attentions whose pattern is a product of QK forms: a plugin
declaring only qk_factors() gets a forward equal to the definition (written out with loops), cached
and recurrent generation, the fast kernels for two factors, an exact tensor network, weight views."""

from __future__ import annotations

import types
from typing import Literal

import pytest
import torch
from torch import nn

import qtoy_core
import qtoy_core.qk_product as qk_product
from qtoy_core import AttentionConfig, QKProductAttention, contract_logits, hookimpl, to_tensor_network

SIZES = dict(d_model=16, n_head=2, vocab_size=20, n_ctx=16)  # d_head 8


class MixedConfig(AttentionConfig):
    """pattern = (s q.k)^2 (t q2.k2): a repeated form and a distinct one with another scale."""

    name: Literal["mixed_qk_test"] = "mixed_qk_test"
    bias: bool = False

    @property
    def is_polynomial(self) -> bool:
        return True


class MixedAttention(QKProductAttention):
    def __init__(self, model, config, layer):
        super().__init__(model, config, layer)
        self.q2_proj = nn.Linear(model.d_model, model.n_head * model.d_head, bias=config.bias)
        self.k2_proj = nn.Linear(model.d_model, model.n_head * model.d_head, bias=config.bias)

    def qk_factors(self):
        return [(self.q_proj, self.k_proj, self.scale)] * 2 + [(self.q2_proj, self.k2_proj, 0.5)]


class LinearConfig(MixedConfig):
    name: Literal["linear_qk_test"] = "linear_qk_test"


class LinearAttention(QKProductAttention):
    """One factor: linear attention (pattern = s q.k)."""

    def qk_factors(self):
        return [(self.q_proj, self.k_proj, self.scale)]


class ScaledPairConfig(MixedConfig):
    name: Literal["scaled_pair_qk_test"] = "scaled_pair_qk_test"


class ScaledPairAttention(MixedAttention):
    """Two distinct forms with unequal scales: the two-factor kernels with the scales moved into q."""

    def qk_factors(self):
        return [(self.q_proj, self.k_proj, self.scale), (self.q2_proj, self.k2_proj, -0.3)]


class StrayConfig(MixedConfig):
    name: Literal["stray_qk_test"] = "stray_qk_test"


class StrayAttention(QKProductAttention):
    """Names a projection that is not its submodule."""

    def qk_factors(self):
        return [(self.q_proj, nn.Linear(1, 1), self.scale)]


@pytest.fixture(autouse=True)
def plugin():
    def register(register):
        register(MixedConfig, MixedAttention)
        register(LinearConfig, LinearAttention)
        register(ScaledPairConfig, ScaledPairAttention)
        register(StrayConfig, StrayAttention)

    registry = qtoy_core.get_registry()
    name = registry.add_plugin(types.SimpleNamespace(register_attentions=hookimpl(register)), name="qk-product-test")
    try:
        yield
    finally:
        registry.remove_plugin(name)


def make(attn, model_type="attention_only_1L", seed=0, **options):
    model = qtoy_core.build_model(model_type, attn=attn, **{**SIZES, **options}).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    return model.eval()


def reference(attn, positional, x, window=None):
    """The definition with loops over queries and keys, from the declared factors alone."""
    b, t, _ = x.shape
    pos = torch.arange(t)

    def heads(proj, rotate=True):
        h = proj(x).view(b, t, attn.n_head, attn.d_head).transpose(1, 2)
        return positional.rotate(h, pos) if rotate else h

    factors = [(heads(qp), heads(kp), s) for qp, kp, s in attn.qk_factors()]
    v = heads(attn.v_proj, rotate=False)
    z = torch.zeros_like(v)
    for i in range(t):
        for j in range(i + 1):
            if window is not None and j <= i - window:
                continue
            weight = torch.ones(b, attn.n_head, dtype=x.dtype)
            for q, k, s in factors:
                weight = weight * s * (q[:, :, i] * k[:, :, j]).sum(-1)
            z[:, :, i] += weight[..., None] * v[:, :, j]
    return attn.out_proj(z.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("attn", ["mixed_qk_test", "linear_qk_test", "scaled_pair_qk_test", "quadratic", "bilinear"])
def test_forward_is_the_product_of_the_declared_forms(attn):
    model = make(attn, pos="rope")
    layer = model.blocks[0].attn
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x, positional=model.positional, positions=torch.arange(7))
        torch.testing.assert_close(got, reference(layer, model.positional, x))


def test_two_factors_run_the_fast_kernels_and_other_counts_the_explicit_pattern(monkeypatch):
    calls = []
    kernel = qk_product.quadratic_attention
    monkeypatch.setattr(qk_product, "quadratic_attention",
                        lambda *a, **k: calls.append(k.get("q2") is not None) or kernel(*a, **k))
    tokens = torch.randint(0, 20, (2, 6))
    for attn, expected in [("quadratic", [False]), ("bilinear", [True]), ("scaled_pair_qk_test", [True]),
                           ("mixed_qk_test", []), ("linear_qk_test", [])]:
        calls.clear()
        with torch.no_grad():
            make(attn)(tokens)
        assert calls == expected, attn


@pytest.mark.parametrize("attn", ["mixed_qk_test", "linear_qk_test", "scaled_pair_qk_test"])
@pytest.mark.parametrize("mode", ["recurrent", "kv"])
def test_cached_generation_matches_the_full_forward(attn, mode):
    model = make(attn, model_type="attention_only_2L")
    tokens = torch.randint(0, 20, (2, 9))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0  # left padding: padded keys add nothing
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        cache = model.new_cache(mode)
        parts = [model(tokens[:, :4], cache=cache, attention_mask=mask[:, :4])]
        parts += [model(tokens[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1]) for t in range(4, 9)]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, dim=1)[real], full[real])
    state = cache.layers[0]
    if mode == "recurrent":  # a running state of constant size, no keys kept
        assert "rnn" in state and "k" not in state
    else:
        assert state["v"].shape[2] == 9 and ("k2" in state) == (attn != "linear_qk_test")


def test_recurrent_state_has_tensor_product_features_and_falls_back_to_a_kv_cache():
    model = make("mixed_qk_test")  # three factors, d_head 8: 8^3 = 512 features
    with torch.no_grad():
        cache = model.new_cache("recurrent")
        model(torch.randint(0, 20, (1, 5)), cache=cache)
    assert cache.layers[0]["rnn"].S.shape == (1, 2, 512, 8)
    wide = make("mixed_qk_test", d_model=32, n_head=1)  # d_head 32: 32^3 > MAX_STATE_FEATURES
    tokens = torch.randint(0, 20, (1, 6))
    with torch.no_grad():
        full = wide(tokens)
        cache = wide.new_cache("recurrent")
        parts = [wide(tokens[:, :3], cache=cache)] + [wide(tokens[:, t:t + 1], cache=cache) for t in range(3, 6)]
    assert "rnn" not in cache.layers[0] and cache.layers[0]["k"].shape[2] == 6
    torch.testing.assert_close(torch.cat(parts, dim=1), full)


def test_hook_points_see_the_distinct_forms_and_the_pattern():
    model = make("mixed_qk_test", pos="none")
    layer = model.blocks[0].attn
    seen = {}
    layer.hook_scores.register_forward_hook(lambda m, i, o: seen.setdefault("scores", o))
    layer.hook_pattern.register_forward_hook(lambda m, i, o: seen.setdefault("pattern", o))
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x, positional=model.positional, positions=torch.arange(5))
        q, k = layer.q_proj(x).view(1, 5, 2, 8).transpose(1, 2), layer.k_proj(x).view(1, 5, 2, 8).transpose(1, 2)
        q2, k2 = layer.q2_proj(x).view(1, 5, 2, 8).transpose(1, 2), layer.k2_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    a, b = (q @ k.mT) * layer.scale, (q2 @ k2.mT) * 0.5
    torch.testing.assert_close(seen["scores"], a * b)  # each distinct form once
    torch.testing.assert_close(seen["pattern"], (a * a * b).tril())
    torch.testing.assert_close(out, reference(layer, model.positional, x))


@pytest.mark.parametrize("attn", ["mixed_qk_test", "linear_qk_test", "scaled_pair_qk_test"])
def test_tensor_network_is_inherited_and_exact(attn):
    model = make(attn, model_type="attention_only_1L", pos="rope", d_model=8, vocab_size=12)
    tokens = torch.randint(0, 12, (2, 3))
    with torch.no_grad():
        torch.testing.assert_close(contract_logits(to_tensor_network(model, 3), tokens), model(tokens))


def test_weight_views_list_every_factor_and_its_projections():
    layer = make("mixed_qk_test").blocks[0].attn
    views = layer.weight_views()
    assert views["qk"] == [("W_Q", "W_K", layer.scale)] * 2 + [("W_Q2", "W_K2", 0.5)]
    assert views["pattern"] == "product"
    torch.testing.assert_close(views["W_Q2"][1], layer.q2_proj.weight.detach()[8:].T)
    assert views["W_K2"].shape == (2, 16, 8)


def test_a_factor_outside_the_module_is_refused_clearly():
    model = qtoy_core.build_model("attention_only_1L", attn="stray_qk_test", **SIZES)
    with pytest.raises(TypeError, match="not one of its own submodules"):
        model(torch.randint(0, 20, (1, 4)))
