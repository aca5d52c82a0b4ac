"""The activation cache in TransformerLens's names and layouts, against computations by hand."""

import pytest
import torch

from qtoy_core import QtoyError, build_model
from qtoy_core.analysis.cache import ActivationCache, CacheKeyError, act_name

V, D = 40, 16


def small(model_type="attention_only_1L", seed=0, std=0.3, **options):
    """Every weight random (out_proj too, which starts at zero); eval mode (no dropout)."""
    torch.manual_seed(seed)
    opts = dict(vocab_size=V, d_model=D, n_head=4, n_ctx=16, positional="none")
    opts.update(options)
    model = build_model(model_type, **opts)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def test_layouts_are_tl_when_n_head_equals_the_length():
    # n_head == pos == 4: a (batch, head, pos) cache would pass every shape check and still be wrong.
    model = small(attn="quadratic")
    tokens = torch.randint(0, V, (2, 4))
    _, cache = model.run_with_cache(tokens)
    views = model.blocks[0].attn.weight_views()
    x = cache["blocks.0.hook_resid_pre"]  # no norm: what the attention reads
    d = D // 4
    for c in "qkv":
        by_hand = torch.einsum("bpm,hmd->bphd", x, views[f"W_{c.upper()}"])  # (batch, pos, head, d_head)
        torch.testing.assert_close(cache[c, 0], by_hand)
    pattern = cache["pattern", 0]  # (batch, head, query_pos, key_pos)
    scores = torch.einsum("bqhd,bkhd->bhqk", cache["q", 0], cache["k", 0]) / d
    torch.testing.assert_close(cache["scores", 0], scores)
    torch.testing.assert_close(pattern, scores.square().tril())
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, cache["v", 0])
    torch.testing.assert_close(cache["z", 0], z, rtol=1e-4, atol=1e-5)
    result = torch.einsum("bphd,hdm->bphm", z, views["W_O"])
    torch.testing.assert_close(cache["result", 0], result, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache["result", 0].sum(2), cache["attn_out", 0], rtol=1e-4, atol=1e-5)


def _rope_by_hand(x, base=10000.0):
    """x: (batch, pos, head, d_head); rotate-half RoPE: the pair (i, i + d/2) turns by pos * base^(-2i/d)."""
    d = x.shape[-1]
    pos = torch.arange(x.shape[1], dtype=torch.float64)
    angle = pos[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (pos, d/2)
    cos, sin = angle.cos()[None, :, None].float(), angle.sin()[None, :, None].float()
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


@pytest.mark.parametrize("attn", ["quadratic", "bilinear"])
def test_hook_q_k_are_before_rope_and_hook_rot_q_k_after(attn):
    model = small(attn=attn, positional="rope")
    tokens = torch.randint(0, V, (2, 6))
    _, cache = model.run_with_cache(tokens)
    views = model.blocks[0].attn.weight_views()
    x = cache["resid_pre", 0]
    d = D // 4
    pairs = [("q", "k")] + ([("q2", "k2")] if attn == "bilinear" else [])
    for q, k in pairs:
        for c in (q, k):
            torch.testing.assert_close(cache[c, 0], torch.einsum("bpm,hmd->bphd", x, views[f"W_{c.upper()}"]))
            torch.testing.assert_close(cache[f"rot_{c}", 0], _rope_by_hand(cache[c, 0]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cache[f"rot_{q}", 0], cache[q, 0])  # the rotation did something
    forms = [torch.einsum("bqhd,bkhd->bhqk", cache[f"rot_{q}", 0], cache[f"rot_{k}", 0]) / d for q, k in pairs]
    expected = forms[0] if attn == "quadratic" else forms[0] * forms[1]
    torch.testing.assert_close(cache["scores", 0], expected, rtol=1e-4, atol=1e-5)


def test_without_rotation_the_rotary_hooks_equal_the_plain_ones():
    _, cache = small(positional="learned").run_with_cache(torch.randint(0, V, (1, 5)))
    assert torch.equal(cache["rot_q", 0], cache["q", 0]) and torch.equal(cache["rot_k", 0], cache["k", 0])


def test_shorthands_mapping_and_errors():
    model = small("transformer_2L", mlp="gelu", norm="rmsnorm")
    tokens = torch.randint(0, V, (2, 5))
    logits, cache = model.run_with_cache(tokens)
    assert isinstance(cache, ActivationCache)
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["resid_pre", 1] is cache["blocks.1.hook_resid_pre"]
    assert cache["q", -1] is cache["blocks.1.attn.hook_q"]
    assert cache["k0"] is cache["blocks.0.attn.hook_k"]
    assert cache["post", 1] is cache["blocks.1.mlp.hook_hidden"]
    assert cache["pre", 1] is cache["blocks.1.mlp.hook_pre"]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    assert cache["scale", 0, "ln2"] is cache["blocks.0.ln2.hook_scale"]
    assert act_name("attn_scores", 3) == "blocks.3.attn.hook_scores"
    assert act_name("embed") == "hook_embed" and act_name("resid_post", 2) == "blocks.2.hook_resid_post"
    # a mapping like the dict it used to be, in execution order
    names = list(cache)
    assert names[0] == "hook_embed" and names[-1] == "ln_final.hook_normalized"
    assert names.index("blocks.0.attn.hook_q") < names.index("blocks.0.attn.hook_rot_q") < \
        names.index("blocks.0.attn.hook_z") < names.index("blocks.0.hook_attn_out") < names.index("blocks.1.hook_resid_pre")
    assert dict(cache.items()).keys() == cache.keys() and len(cache) == len(names)
    assert ("pattern", 1) in cache and "nonsense" not in cache
    with pytest.raises(CacheKeyError, match=r"blocks.0.attn.hook_patern.*Close recorded names: blocks.0.attn.hook_pattern"):
        cache["blocks.0.attn.hook_patern"]
    # the RMSNorm hooks are the real normalisation
    x = cache["resid_post", 1]
    torch.testing.assert_close(cache["scale"], (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())
    torch.testing.assert_close(cache["normalized"] * model.ln_final.weight @ model.unembed.weight.T, logits,
                               rtol=1e-4, atol=1e-4)
    # batch of one; to()
    _, one = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert one["z", 0].shape == (5, 4, D // 4) and one["pattern", 0].shape == (4, 5, 5)
    with pytest.raises(QtoyError, match="batch size 1"):
        cache.remove_batch_dim()
    assert cache.to("cpu") is cache


@pytest.mark.parametrize("options", [dict(model_type="transformer_2L", positional="learned"),
                                     dict(model_type="attention_only_2L", positional="rope", attn="bilinear")])
def test_decompositions_sum_to_the_residual_they_split(options):
    model = small(**options)
    tokens = torch.randint(0, V, (3, 7))
    logits, cache = model.run_with_cache(tokens)
    final = cache["resid_post", 1]
    stack, labels = cache.decompose_resid(return_labels=True)
    expect = ["embed"] + (["pos_embed"] if "hook_pos_embed" in cache else []) + \
        [f"{i}_{w}" for i in range(2) for w in (("attn_out", "mlp_out") if model.blocks[0].has_mlp else ("attn_out",))]
    assert labels == expect and stack.shape == (len(expect), 3, 7, D)
    torch.testing.assert_close(stack.sum(0), final, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.decompose_resid(layer=1).sum(0), cache["resid_pre", 1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.decompose_resid(layer=1, mlp_input=True).sum(0), cache["resid_mid", 1],
                               rtol=1e-4, atol=1e-4)
    heads, head_labels = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert head_labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"] and head_labels[-1] == "remainder"
    torch.testing.assert_close(heads.sum(0), final, rtol=1e-4, atol=1e-4)
    full, full_labels = cache.get_full_resid_decomposition(return_labels=True)
    assert "L1H3" in full_labels
    torch.testing.assert_close(full.sum(0), final, rtol=1e-4, atol=1e-4)
    acc, acc_labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert acc_labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    torch.testing.assert_close(acc[2], cache["resid_pre", 1])
    # exact logit attribution: no norm, so the direct reads sum to the logit at every position
    target = tokens[:, -1]
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), target)  # (components, batch)
    torch.testing.assert_close(attrs.sum(0), logits[:, -1].gather(1, target[:, None])[:, 0], rtol=1e-4, atol=1e-4)
    assert torch.equal(cache.apply_ln_to_stack(stack), stack)  # no norm: identity


def test_rmsnorm_frozen_scale_makes_the_logit_attribution_exact():
    model = small("transformer_1L", norm="rmsnorm")
    with torch.no_grad():
        model.ln_final.weight.uniform_(0.5, 2.0)  # a gain that is not 1, folded into the directions
    tokens = torch.randint(0, V, (2, 6))
    logits, cache = model.run_with_cache(tokens)
    answer, wrong = torch.tensor([3, 5]), torch.tensor([7, 7])
    stack = cache.decompose_resid(pos_slice=-1)  # (components, batch, d_model)
    attrs = cache.logit_attrs(stack, answer, incorrect_tokens=wrong, pos_slice=-1)
    diff = logits[:, -1].gather(1, answer[:, None])[:, 0] - logits[:, -1].gather(1, wrong[:, None])[:, 0]
    torch.testing.assert_close(attrs.sum(0), diff, rtol=1e-4, atol=1e-4)
    scaled = cache.apply_ln_to_stack(cache.accumulated_resid(), pos_slice=None)
    torch.testing.assert_close(scaled[-1], cache["ln_final.hook_normalized"])
    with pytest.raises(QtoyError, match="0..39"):
        cache.logit_attrs(stack, V + 1, pos_slice=-1)


def test_unhooked_points_cost_nothing_and_keep_the_fast_kernel(monkeypatch):
    import qtoy_core.qk_product as quadratic  # the base whose mix calls the fast kernel

    model = small(attn="quadratic", positional="rope")
    hp = model.blocks[0].attn.hook_q
    x = torch.randn(2, 4, 5, D // 4)
    assert hp.run(x) is x  # no hook: the very same tensor, no transpose or copy
    calls = []
    real = quadratic.quadratic_attention
    monkeypatch.setattr(quadratic, "quadratic_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokens = torch.randint(0, V, (1, 6))
    model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_q", "blocks.0.attn.hook_z", "blocks.0.attn.hook_v"])
    assert calls == [1]  # recording q/k/v/z keeps the fast kernel
    model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    assert calls == [1]  # the pattern needs the explicit (pos, pos) form
