"""Behaviour detectors on constructed heads (hand-set weights with a known answer), induction_loss
against the model's own loss, and the weight-based scores against brute force."""

import functools
import math

import pytest
import torch

from qtoy_core import build_model
from qtoy_core.analysis.detectors import (
    DetectorInputError,
    detection_targets,
    head_detectors,
    induction_loss,
    pattern_target_share,
    repeated_random_tokens,
    spearman,
    weight_head_scores,
)
from qtoy_core.analysis.weights import model_weights

# residual basis: token one-hots | position one-hots | "previous token" one-hots
V, T = 8, 16
TOK, POS, PREV = 0, V, V + T
D, DH = V + T + V, 32

pytestmark = pytest.mark.usefixtures("one_thread")


def _set(proj, head, W):
    """Set head ``head`` of a q/k/v projection to W (d_model, d_head): q_h = x @ W."""
    with torch.no_grad():
        proj.weight[head * DH:(head + 1) * DH] = W.T


def _set_out(attn, head, W):
    """Set head ``head`` of out_proj to W (d_head, d_model): out = z_h @ W."""
    with torch.no_grad():
        attn.out_proj.weight[:, head * DH:(head + 1) * DH] = W.T


def _e(i, n=D):
    return torch.nn.functional.one_hot(torch.tensor(i), n).float()


@functools.lru_cache(maxsize=None)  # the tests only read these models
def constructed(attn="quadratic", negate_second_factor=False, induction_gain=30.0):
    """A 2-layer attention-only model whose heads are exactly:
    L0H0 previous-token head (writes the previous token into the PREV subspace), L0H1 duplicate-token
    head (same token, never itself; writes nothing), L1H0 induction head (query: current token, key:
    the previous token at the key; copies the key's token into the logits), L1H1 a self-attending head
    that writes nothing. With bilinear attention and ``negate_second_factor`` every pattern is minus
    the quadratic one (a signed pattern, all entries <= 0)."""
    model = build_model("attention_only_2L", vocab_size=V, d_model=D, n_head=2, d_head=DH, n_ctx=T,
                        positional="learned", attn=attn, norm="none")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight[:, TOK:TOK + V] = torch.eye(V)  # tied: W_U reads the token dims only
        model.positional.W_pos[:, POS:POS + T] = torch.eye(T)
    a0, a1 = model.blocks[0].attn, model.blocks[1].attn
    Z = lambda: torch.zeros(D, DH)  # noqa: E731
    # L0H0: q_i = f_i, k_j = f_{j+1}: q.k = [j == i - 1]
    Wq, Wk = Z(), Z()
    for i in range(T):
        Wq[POS + i, i] = float(DH)  # d_head undoes the 1/d_head scale: pattern entries are exactly 0 or 1
        if i + 1 < DH:
            Wk[POS + i, i + 1] = 1.0
    Wv, Wo = Z(), torch.zeros(DH, D)
    for a in range(V):
        Wv[TOK + a, a] = 1.0
        Wo[a, PREV + a] = 1.0
    _set(a0.q_proj, 0, Wq), _set(a0.k_proj, 0, Wk), _set(a0.v_proj, 0, Wv), _set_out(a0, 0, Wo)
    # L0H1: q.k = [t_i == t_j] - [i == j]
    Wq, Wk = Z(), Z()
    for a in range(V):
        Wq[TOK + a, a], Wk[TOK + a, a] = float(DH), 1.0
    for i in range(T):
        Wq[POS + i, V + i] = float(DH)
        Wk[POS + i, V + i] = -1.0
    _set(a0.q_proj, 1, Wq), _set(a0.k_proj, 1, Wk)
    # L1H0: query = current token, key = previous token (PREV subspace); OV copies the key's token
    Wq, Wk, Wv, Wo = Z(), Z(), Z(), torch.zeros(DH, D)
    for a in range(V):
        Wq[TOK + a, a] = float(DH)
        Wk[PREV + a, a] = 1.0
        Wv[TOK + a, a] = 1.0
        Wo[a, TOK + a] = induction_gain
    _set(a1.q_proj, 0, Wq), _set(a1.k_proj, 0, Wk), _set(a1.v_proj, 0, Wv), _set_out(a1, 0, Wo)
    # L1H1: attends to itself (positions), writes nothing
    Wq, Wk = Z(), Z()
    for i in range(T):
        Wq[POS + i, i], Wk[POS + i, i] = float(DH), 1.0
    _set(a1.q_proj, 1, Wq), _set(a1.k_proj, 1, Wk)
    if attn == "bilinear":
        for a in (a0, a1):
            with torch.no_grad():
                a.q2_proj.weight.copy_(a.q_proj.weight)
                a.k2_proj.weight.copy_(-a.k_proj.weight if negate_second_factor else a.k_proj.weight)
    return model.eval()


def permutation_tokens(batch=6, seed=0):
    """Repeated sequences whose halves are random permutations of the vocabulary: no token repeats
    within a half, so every second-half query has exactly one duplicate and one induction target."""
    g = torch.Generator().manual_seed(seed)
    half = torch.stack([torch.randperm(V, generator=g) for _ in range(batch)])
    return torch.cat([half, half], dim=1)


def test_targets_are_the_planted_positions():
    tokens = torch.tensor([[3, 5, 7, 3, 5, 7]])
    prev = detection_targets(tokens, "previous_token")[0]
    dup = detection_targets(tokens, "duplicate_token")[0]
    ind = detection_targets(tokens, "induction")[0]
    assert prev.nonzero().tolist() == [[q, q - 1] for q in range(1, 6)]
    assert dup.nonzero().tolist() == [[3, 0], [4, 1], [5, 2]]
    assert ind.nonzero().tolist() == [[3, 1], [4, 2], [5, 3]]
    assert not detection_targets(tokens, "previous_token", bos=True)[0, :, 0].any()


def test_share_is_of_absolute_mass_with_the_sign_kept_apart():
    # one query row over keys 0..2 with weights 2, -3, 1; target: key 1
    pattern = torch.tensor([[[[1.0, 0, 0], [1.0, 1.0, 0], [2.0, -3.0, 1.0]]]])
    targets = torch.zeros(1, 3, 3, dtype=torch.bool)
    targets[0, 2, 1] = True
    score, signed, uniform = pattern_target_share(pattern, targets)
    assert score.item() == pytest.approx(3 / 6) and signed.item() == pytest.approx(-3 / 6)
    assert uniform.item() == pytest.approx(1 / 3)  # one target among three causal keys
    # unnormalised: scaling the pattern changes nothing
    assert pattern_target_share(7.5 * pattern, targets)[0].item() == pytest.approx(0.5)


@pytest.mark.parametrize("attn", ["quadratic", "bilinear"])
def test_constructed_heads_are_found(attn):
    model = constructed(attn)
    det = head_detectors(model, permutation_tokens())
    s = det.scores
    expect = {"previous_token": (0, 0), "duplicate_token": (0, 1), "induction": (1, 0), "copying": (1, 0)}
    for kind, (layer, head) in expect.items():
        assert s[kind][layer, head] == pytest.approx(1.0, abs=1e-9), kind
        others = [float(s[kind][l, h]) for l in range(2) for h in range(2) if (l, h) != (layer, head)]
        assert all(abs(x) < 1e-9 or math.isnan(x) for x in others), (kind, others)
    # the chance level is far below: about the mean of 1/(q+1) over the counted rows
    assert det.uniform["previous_token"][0, 0] < 0.25 and det.uniform["induction"][1, 0] < 0.15
    assert det.pattern_kind == ["non-negative"] * 2 if attn == "quadratic" else ["signed"] * 2
    # the self head writes nothing: its output ranks every token the same, copying 0
    assert s["copying"][1, 1] == pytest.approx(0.0, abs=1e-12)


def test_signed_bilinear_pattern_scores_by_magnitude_and_keeps_the_sign():
    model = constructed("bilinear", negate_second_factor=True)
    p = model.run_with_cache(permutation_tokens(), "blocks.0.attn.hook_pattern")[1]["blocks.0.attn.hook_pattern"]
    assert (p <= 0).all() and (p < 0).any()  # every weight minus the quadratic one
    det = head_detectors(model, permutation_tokens())
    assert det.scores["previous_token"][0, 0] == pytest.approx(1.0)
    assert det.signed["previous_token"][0, 0] == pytest.approx(-1.0)
    assert det.scores["duplicate_token"][0, 1] == pytest.approx(1.0)
    assert det.signed["duplicate_token"][0, 1] == pytest.approx(-1.0)
    # a negative pattern subtracts the attended token's value: the induction head now lowers that token
    assert det.scores["induction"][1, 0] == pytest.approx(1.0)
    assert det.scores["copying"][1, 0] == pytest.approx(-1.0)


def test_softmax_score_is_the_mean_probability_on_the_target():
    torch.manual_seed(0)
    model = build_model("attention_only_1L", vocab_size=24, d_model=16, n_head=2, n_ctx=16, attn="softmax",
                        positional="learned")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    tokens = repeated_random_tokens(24, batch_size=4, subseq_len=8, seed=1)
    p = model.run_with_cache(tokens, "blocks.0.attn.hook_pattern")[1]["blocks.0.attn.hook_pattern"]
    det = head_detectors(model.eval(), tokens)
    for h in range(2):  # previous token: every row q >= 1 has one target, k = q - 1
        mean_p = torch.stack([p[:, h, q, q - 1] for q in range(1, 16)]).double().mean()
        assert det.scores["previous_token"][0, h].item() == pytest.approx(mean_p.item(), rel=1e-6)
    assert det.pattern_kind == ["probability"]


def test_induction_loss_per_position_and_the_planted_circuit():
    model = constructed("quadratic", induction_gain=5.0)
    il = induction_loss(model, batch_size=6, subseq_len=8, seed=3)
    tokens = repeated_random_tokens(V, batch_size=6, subseq_len=8, seed=3)
    logits = model(tokens)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(0)
    torch.testing.assert_close(il.per_position, ref)
    assert il.second_half_start == 8 and il.second_half.shape == (7,)
    torch.testing.assert_close(il.second_half, ref[8:])
    off = constructed("quadratic", induction_gain=0.0)  # the same model without the induction head's output
    il_off = induction_loss(off, batch_size=6, subseq_len=8, seed=3)
    assert il_off.second_half_mean == pytest.approx(il_off.first_half_mean, rel=0.2)  # nothing to gain
    # V = 8: random halves repeat tokens, which splits the induction head between several keys
    assert il.second_half_mean < 0.8 * il_off.second_half_mean  # the induction head predicts the repeat
    assert il.uniform == pytest.approx(math.log(V))


def test_too_long_for_learned_positions_is_one_clear_error():
    model = constructed()
    with pytest.raises(DetectorInputError, match="n_ctx=16.*subseq_len <= 8"):
        induction_loss(model, subseq_len=9)
    with pytest.raises(DetectorInputError, match="subseq_len <= 8"):
        head_detectors(model, subseq_len=12)


def test_weight_scores_name_the_constructed_heads():
    model = constructed("quadratic")
    ws = weight_head_scores(model)
    assert ws["previous_token"][0, 0] == pytest.approx(1.0) and ws["previous_token"][0, 1] == pytest.approx(0.0)
    assert torch.isnan(ws["induction"][0]).all()  # no earlier layer to K-compose with
    assert ws["induction"][1, 0] > 0.2 and ws["induction"][1, 1] == pytest.approx(0.0, abs=1e-6)
    assert ws["copying"][1, 0] == pytest.approx(1.0)
    det = head_detectors(model, permutation_tokens())
    cmp = det.compare(ws)
    assert cmp["copying"]["n_heads"] == 4 and cmp["copying"]["spearman"] == pytest.approx(1.0)
    # the induction head's QK reads no positions: no positional pattern, so no weight-based previous-token score
    assert torch.isnan(ws["previous_token"][1, 0])
    assert cmp["induction"]["n_heads"] == 2 and cmp["previous_token"]["n_heads"] == 3


@pytest.mark.parametrize("attn", ["quadratic", "bilinear"])
def test_rope_positional_kernel_is_the_token_average(attn):
    """weight-based previous-token with RoPE: the pattern averaged over all token pairs per offset."""
    from qtoy_core.analysis.circuits import qk_circuit
    from qtoy_core.analysis.detectors import _positional_pattern, pattern_target_share as share

    torch.manual_seed(0)
    model = build_model("attention_only_1L", vocab_size=20, d_model=16, n_head=2, n_ctx=8, attn=attn,
                        positional="rope")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    w = model_weights(model)
    kind = "non-negative" if attn == "quadratic" else "signed"
    pat = _positional_pattern(w, 0, 8, kind)
    for o in range(8):  # brute force: the dense vocab x vocab circuits at offset o
        f = [qk_circuit(w, 0, factor=i, offset=o).AB.double() for i in range(1 if attn == "quadratic" else 2)]
        mean = (f[0] * (f[0] if len(f) == 1 else f[1])).mean((-1, -2))  # (H,)
        torch.testing.assert_close(pat[:, o, 0], mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(pat[:, 7, 7 - o], mean, rtol=1e-6, atol=1e-9)
    tg = detection_targets(torch.zeros(1, 8, dtype=torch.long), "previous_token")
    torch.testing.assert_close(weight_head_scores(model, n_positions=8)["previous_token"][0], share(pat[None], tg)[0])


def test_spearman_against_the_textbook_formula():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert spearman([1, 2, 3, 4, 5], [50, 40, 30, 20, 10]) == pytest.approx(-1.0)
    # ties: the Pearson correlation of mean ranks ([1.5, 1.5, 3, 4] against [1, 2, 3, 4])
    r = torch.tensor([1.5, 1.5, 3, 4]) - 2.5
    s = torch.tensor([1.0, 2, 3, 4]) - 2.5
    assert spearman([7, 7, 8, 9], [1, 2, 3, 4]) == pytest.approx(float((r * s).sum() / (r.norm() * s.norm())))
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None
