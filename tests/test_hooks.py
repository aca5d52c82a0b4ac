"""Interventions through hook points (run_with_hooks, hooks(), add_hook) and one-call ablations,
checked against edits of the weights and computations from the cache."""

import copy

import pytest
import torch

from qtoy_core import build_model
from qtoy_core.analysis.ablation import (
    AblationError,
    AttnLayer,
    Head,
    MLPLayer,
    Neuron,
    ResidPosition,
    ablate,
    ablation_scan,
)
from qtoy_core.analysis.hooks import HookShapeError, UnknownHookError

V, D, H = 40, 16, 4


def small(model_type="attention_only_1L", seed=0, std=0.3, **options):
    torch.manual_seed(seed)
    opts = dict(vocab_size=V, d_model=D, n_head=H, n_ctx=16, positional="none")
    opts.update(options)
    model = build_model(model_type, **opts)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def without_head(model, layer, head):
    """The same model with head `head`'s columns of out_proj zeroed: what ablating its z must give."""
    other = copy.deepcopy(model)
    d = other.blocks[layer].attn.d_head
    with torch.no_grad():
        other.blocks[layer].attn.out_proj.weight[:, head * d:(head + 1) * d] = 0.0
    return other


COMPONENTS = [("quadratic", "transformer_1L", "gelu"), ("bilinear", "transformer_1L", "bilinear"),
              ("softmax", "attention_only_1L", "none")]


@pytest.mark.parametrize("attn,model_type,mlp", COMPONENTS)
def test_per_head_edits_on_z_result_v_pattern_match_the_weight_edit(attn, model_type, mlp):
    model = small(model_type, attn=attn, mlp=mlp, positional="rope")
    tokens = torch.randint(0, V, (2, 6))
    expected = without_head(model, 0, 2)(tokens)

    def zero_head(act, hook):
        act = act.clone()
        act[:, :, 2] = 0.0  # (batch, pos, head, ...) for z, v and result
        return act

    def zero_pattern_head(act, hook):
        act = act.clone()
        act[:, 2] = 0.0     # (batch, head, query_pos, key_pos)
        return act

    for name, fn in (("blocks.0.attn.hook_z", zero_head), ("blocks.0.attn.hook_result", zero_head),
                     ("blocks.0.attn.hook_v", zero_head), ("blocks.0.attn.hook_pattern", zero_pattern_head)):
        torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=[(name, fn)]), expected,
                                   rtol=1e-4, atol=1e-4, msg=name)
    assert n_hooks(model) == 0
    # ablate() does the same in one call
    torch.testing.assert_close(ablate(model, tokens, Head(0, 2)), expected, rtol=1e-4, atol=1e-4)


def test_editing_hook_result_changes_the_output_not_only_the_cache():
    model = small("transformer_1L", attn="quadratic")
    tokens = torch.randint(0, V, (2, 5))
    u = torch.randn(D)

    def add_u(act, hook):  # (batch, pos, head, d_model): add u to head 1's output
        act = act.clone()
        act[:, :, 1] += u
        return act

    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_result", add_u)])
    same = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", lambda a, hook: a + u)])
    assert not torch.allclose(edited, model(tokens))
    torch.testing.assert_close(edited, same, rtol=1e-4, atol=1e-4)


def test_scaling_queries_before_or_after_rope_scales_the_quadratic_pattern_by_four():
    model = small(attn="quadratic", positional="rope")
    tokens = torch.randint(0, V, (1, 6))
    _, plain = model.run_with_cache(tokens)
    for name in ("blocks.0.attn.hook_q", "blocks.0.attn.hook_rot_q"):
        with model.hooks(fwd_hooks=[(name, lambda q, hook: 2 * q)]):
            _, cache = model.run_with_cache(tokens)
        torch.testing.assert_close(cache["pattern", 0], 4 * plain["pattern", 0], rtol=1e-4, atol=1e-6)
    # a predicate selects several points; the hook gets the point (name, layer)
    seen = []
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_k") or n.endswith("hook_rot_k"),
                                             lambda k, hook: seen.append((hook.name, hook.layer(), k.shape)))])
    assert seen == [("blocks.0.attn.hook_k", 0, (1, 6, H, D // H)), ("blocks.0.attn.hook_rot_k", 0, (1, 6, H, D // H))]
    assert n_hooks(model) == 0


def test_hooks_are_removed_when_the_forward_raises_and_bad_hooks_are_clear_errors():
    model = small("transformer_1L")
    tokens = torch.randint(0, V, (1, 4))

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a),
                                                ("blocks.0.attn.hook_z", boom)])
    assert n_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_hidden", boom)]):
            model(tokens)
    assert n_hooks(model) == 0
    # a typo: one error naming the close names, and nothing attached (not even the valid first hook)
    with pytest.raises(UnknownHookError, match=r"'blocks.0.attn.hook_zz' is not a hook point.*blocks.0.attn.hook_z"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a),
                                                ("blocks.0.attn.hook_zz", lambda a, hook: a)])
    assert n_hooks(model) == 0
    with pytest.raises(HookShapeError, match=r"returned \(1, 4\).*\(1, 4, 4, 4\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: z.sum(-1).sum(-1))])
    assert n_hooks(model) == 0
    with pytest.raises(UnknownHookError, match="pairs"):
        model.run_with_hooks(tokens, fwd_hooks=["blocks.0.attn.hook_z"])
    # TL's compact shorthand works as a hook name ("z0" -> blocks.0.attn.hook_z)
    seen = []
    model.run_with_hooks(tokens, fwd_hooks=[("z0", lambda a, hook: seen.append(hook.name))])
    assert seen == ["blocks.0.attn.hook_z"]


def test_kept_hooks_stay_until_reset():
    model = small()
    tokens = torch.randint(0, V, (1, 4))
    zero = lambda a, hook: torch.zeros_like(a)
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", zero)], reset_hooks_end=False)
    model.add_hook("blocks.0.attn.hook_z", zero)
    assert n_hooks(model) == 2
    # attention zeroed: the logits are the direct path alone
    torch.testing.assert_close(model(tokens), model.embed(tokens) @ model.unembed.weight.T)
    model.reset_hooks()
    assert n_hooks(model) == 0


# -------------------------------------------------------------------------------------- ablations
def test_ablation_targets_against_the_forward_by_hand():
    model = small("transformer_1L", mlp="gelu", tie_embeddings=False)
    tokens = torch.randint(0, V, (3, 6))
    _, cache = model.run_with_cache(tokens)
    W_U = model.unembed.weight
    # attention zeroed: resid_mid = embed, then the MLP; MLP zeroed: logits = resid_mid @ W_U^T (no norm)
    torch.testing.assert_close(ablate(model, tokens, MLPLayer(0)), cache["resid_mid", 0] @ W_U.T, rtol=1e-4, atol=1e-4)
    both = ablate(model, tokens, [AttnLayer(0), MLPLayer(0)])
    torch.testing.assert_close(both, cache["embed"] @ W_U.T, rtol=1e-4, atol=1e-4)
    # one hidden unit: the same as zeroing its column of out_proj
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[0].mlp.out_proj.weight[:, 5] = 0.0
    torch.testing.assert_close(ablate(model, tokens, Neuron(0, 5)), other(tokens), rtol=1e-4, atol=1e-4)
    # the residual stream at one position: only that position's and later predictions move
    out = ablate(model, tokens, ResidPosition(0, 3))
    torch.testing.assert_close(out[:, :3], model(tokens)[:, :3])
    assert not torch.allclose(out[:, 3:], model(tokens)[:, 3:])


def test_mean_and_resample_ablation_of_a_head_by_hand():
    model = small(tie_embeddings=False)  # one layer, attention only, no norm: logits linear in each head's result
    tokens, reference = torch.randint(0, V, (2, 5)), torch.randint(0, V, (6, 7))
    _, cache = model.run_with_cache(tokens)
    _, ref = model.run_with_cache(reference)
    W_U, h = model.unembed.weight, 1
    base = model(tokens)
    mean_result = ref["result", 0][:, :5, h].mean(0)  # (pos, d_model): the reference mean at each position
    expected = base + (mean_result - cache["result", 0][:, :, h]) @ W_U.T
    torch.testing.assert_close(ablate(model, tokens, Head(0, h), "mean", reference), expected, rtol=1e-4, atol=1e-4)
    # resample from a reference whose rows are all one sequence: every row takes that sequence's value
    same = reference[:1].expand(4, -1)
    expected = base + (ref["result", 0][0, :5, h] - cache["result", 0][:, :, h]) @ W_U.T
    torch.testing.assert_close(ablate(model, tokens, Head(0, h), "resample", same), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(AblationError, match="at least as long"):
        ablate(model, tokens, Head(0, h), "mean", reference[:, :3])
    with pytest.raises(AblationError, match="reference="):
        ablate(model, tokens, Head(0, h), "mean")
    with pytest.raises(AblationError, match="unknown ablation method 'median'"):
        ablate(model, tokens, Head(0, h), "median")
    with pytest.raises(AblationError, match="no hook point blocks.3.attn.hook_z"):
        ablate(model, tokens, Head(3, 0))
    with pytest.raises(AblationError, match="no MLP"):
        ablate(model, tokens, MLPLayer(0))


@pytest.mark.parametrize("attn", ["quadratic", "bilinear", "softmax"])
def test_ablation_scan_finds_the_one_head_that_does_the_job(attn):
    # A planted model: every residual writer is zero except head L1H2, so ablating anything else
    # changes nothing and ablating L1H2 changes the loss by exactly the weight-edit's amount.
    model = small("transformer_2L", attn=attn, mlp="bilinear")
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.mlp.out_proj.weight.zero_()
            d = block.attn.d_head
            keep = block.attn.out_proj.weight[:, 2 * d:3 * d].clone()
            block.attn.out_proj.weight.zero_()
            if i == 1:
                block.attn.out_proj.weight[:, 2 * d:3 * d] = keep
    batches = [torch.randint(0, V, (4, 8)) for _ in range(2)]
    scan = ablation_scan(model, batches, rank_by="abs")
    assert len(scan.entries) == 2 * H + 2 and scan.entries[0].label == "L1H2"
    assert all(e.delta == 0.0 for e in scan.entries[1:])
    with torch.no_grad():
        by_hand = sum(float(without_head(model, 1, 2).loss(b) - model.loss(b)) for b in batches) / 2
    assert scan["L1H2"].delta == pytest.approx(by_hand, rel=1e-5)
    assert scan.to_dict()["entries"][0]["label"] == "L1H2"
    # a given metric: the mean logit of token 0 at the last position
    scan = ablation_scan(model, batches[0], metric=lambda logits, tokens: logits[:, -1, 0].mean(), method="mean")
    assert {e.label for e in scan.entries if e.delta != 0.0} <= {"L1H2"}
