"""The built-in components do what their definitions say."""

import pytest
import torch

from qtoy_core import build_model, make_model_config
from qtoy_registry import get_registry


def _naive_quadratic(q, k, v, scale):
    """(q.k * scale)^2 over visible keys, one query position at a time."""
    b, h, t, d = q.shape
    out = torch.zeros_like(v)
    for i in range(t):
        for j in range(i + 1):
            w = ((q[:, :, i] * k[:, :, j]).sum(-1) * scale) ** 2
            out[:, :, i] += w[..., None] * v[:, :, j]
    return out


def _model(attn="quadratic", **kw):
    kw = {"d_model": 32, "n_head": 4, "vocab_size": 50, "n_ctx": 16, **kw}
    torch.manual_seed(0)
    model = build_model(kw.pop("model_type", "attention_only_1L"), attn=attn, **kw).double()
    # out_proj starts at zero (identity blocks); give it weights so attention is visible.
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.out_proj.weight, std=0.3)
        if block.has_mlp:
            torch.nn.init.normal_(block.mlp.out_proj.weight, std=0.3)
    return model


def test_quadratic_attention_equals_naive_loop():
    model = _model("quadratic", positional="none")
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = torch.arange(9)
    out = attn(x, positional=model.positional, positions=pos)
    q, k, v = (attn.heads(p, x, None, pos) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    z = _naive_quadratic(q, k, v, 1 / attn.d_head)
    expected = attn.out_proj(z.transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attn", sorted(get_registry().names("attention")))
def test_every_attention_is_causal(attn):
    model = _model(attn, model_type="attention_only_2L")
    tokens = torch.randint(0, 50, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rope_scores_depend_only_on_offset():
    model = _model("quadratic")
    rope = model.positional
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(i, j):
        qi = rope.rotate(q, torch.tensor([i]))
        kj = rope.rotate(k, torch.tensor([j]))
        return (qi * kj).sum()

    for offset in (0, 1, 5):
        s = [score(base + offset, base) for base in (0, 3, 11, 40)]
        torch.testing.assert_close(torch.stack(s), s[0].expand(4), rtol=1e-9, atol=1e-9)
    assert not torch.isclose(score(5, 0), score(6, 0))


def test_bilinear_mlp_equals_explicit_contraction():
    model = _model("quadratic", model_type="transformer_1L", mlp="bilinear")
    mlp = model.blocks[0].mlp
    x = torch.randn(3, 32, dtype=torch.float64)
    # B[o, i, j] = sum_h W_out[o, h] W_l[h, i] W_r[h, j]
    B = torch.einsum("oh,hi,hj->oij", mlp.out_proj.weight, mlp.w_left.weight, mlp.w_right.weight)
    expected = torch.einsum("oij,bi,bj->bo", B, x, x)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-10, atol=1e-12)


def test_bilinear_attention_with_tied_weights_equals_quadratic():
    quad = _model("quadratic")
    bil = _model("bilinear")
    attn = bil.blocks[0].attn
    state = {k: v for k, v in quad.state_dict().items()}
    state["blocks.0.attn.q2_proj.weight"] = state["blocks.0.attn.q_proj.weight"]
    state["blocks.0.attn.k2_proj.weight"] = state["blocks.0.attn.k_proj.weight"]
    bil.load_state_dict(state)
    tokens = torch.randint(0, 50, (2, 10))
    torch.testing.assert_close(bil(tokens), quad(tokens), rtol=1e-10, atol=1e-12)
    assert attn.q2_proj is not attn.q_proj


def test_zero_init_output_projections_make_blocks_identity():
    model = build_model("transformer_2L", d_model=32, n_head=4, vocab_size=50)
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.out_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.out_proj.weight) == 0
    assert 0.015 < model.embed.weight.std() < 0.025
    assert model.unembed.weight is model.embed.weight  # tied by default
    untied = build_model("attention_only_1L", d_model=32, n_head=4, vocab_size=50, tie_embeddings=False)
    assert untied.unembed.weight is not untied.embed.weight


def test_stable_submodule_names():
    model = build_model("transformer_2L", d_model=32, n_head=4, vocab_size=50, norm="rmsnorm", pos="learned")
    names = set(dict(model.named_modules()))
    for name in ["embed", "positional", "blocks.0.ln1", "blocks.0.attn", "blocks.0.attn.out_proj", "blocks.1.ln2",
                 "blocks.1.mlp", "blocks.1.mlp.out_proj", "ln_final", "unembed", "blocks.0.attn.hook_pattern",
                 "blocks.1.hook_resid_post"]:
        assert name in names
    assert "positional.W_pos" in dict(model.named_parameters())


def test_loss_ignores_padding():
    model = _model("quadratic")
    tokens = torch.randint(0, 50, (2, 8))
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    garbage = tokens.clone()
    garbage[1, 5:] = 3
    torch.testing.assert_close(model.loss(tokens, mask), model.loss(garbage, mask))


def test_learned_positions_beyond_n_ctx_are_refused_clearly():
    model = build_model(pos="learned", n_ctx=8, d_model=32, n_head=4, vocab_size=50)
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("attn", ["quadratic", "bilinear", "softmax"])
@pytest.mark.parametrize("mode", ["kv", "recurrent"])
def test_cached_generation_matches_full_forward(attn, mode):
    model = _model(attn, model_type="transformer_2L", mlp="bilinear")
    tokens = torch.randint(0, 50, (2, 11))
    full = model(tokens)
    cache = model.new_cache(mode=mode)
    steps = [model(tokens[:, :5], cache=cache)]
    for t in range(5, 11):
        steps.append(model(tokens[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-10)
