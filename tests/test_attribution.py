"""Exact logit attribution and the path expansion, against the model's own forward pass and on
models whose answer is planted; plus the two readings of the circuit report that used to mislead
(the direct path of tied embeddings, copying scores set by one eigenvalue)."""

import copy

import pytest
import torch

from qtoy_core import build_model
from qtoy_core.analysis import (
    DOMINANT_EIGENVALUE_SHARE,
    analyze_layer_heads,
    direct_path,
    direct_path_top,
    embeddings_tied,
    induction_heads,
    spectrum,
    ov_circuit,
)
from qtoy_core.analysis.attribution import (
    AttributionError,
    logit_attribution,
    path_expansion,
    top_paths,
)
from qtoy_core.analysis.report import Report

V, D, H, T = 40, 32, 4, 12


def small(model_type="attention_only_2L", seed=0, std=0.3, dtype=torch.float64, **options):
    """A small model with every weight random (out_proj included, which starts at zero)."""
    torch.manual_seed(seed)
    opts = dict(vocab_size=V, d_model=D, n_head=H, n_ctx=T, positional="rope")
    opts.update(options)
    model = build_model(model_type, **opts)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.to(dtype).eval()


def tokens(batch=2, seed=1):
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


MIXES = [
    dict(),
    dict(attn="bilinear", positional="learned"),
    dict(model_type="transformer_2L", mlp="bilinear"),
    dict(model_type="transformer_2L", attn="softmax", mlp="gelu"),
    dict(attn={"name": "bilinear", "bias": True}, positional="none"),
]


# ------------------------------------------------------------------------- logit attribution
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "-".join(str(v if isinstance(v, str) else v["name"])
                                                               for v in m.values()) or "quadratic-rope")
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_parts_sum_to_the_logits(mix, dtype, rel):
    model = small(dtype=dtype, **mix)
    toks = tokens()
    logits = model(toks).detach()
    attr = logit_attribution(model, toks)
    assert not attr.approximate and attr.parts.shape == (len(attr.labels), 2, T, V)
    scale = float(logits.abs().max())
    assert float((attr.parts.sum(0) - logits).abs().max()) <= rel * scale
    # the model's own logits on that run (recording per-head results sums the heads in another order)
    assert float((attr.logits - logits).abs().max()) <= rel * scale
    # every head of every layer is its own part, in execution order
    heads = [lab for lab, k in zip(attr.labels, attr.kinds) if k == "head"]
    assert heads == [f"L{i}H{h}" for i in range(2) for h in range(H)]
    assert attr.labels[0] == "embed" and ("pos_embed" in attr.labels) == (mix.get("positional") == "learned")
    if mix.get("model_type") == "transformer_2L":
        assert attr.labels[-1] == "L1 mlp"
    if isinstance(mix.get("attn"), dict):  # output bias: its own part per layer
        assert "L0 attn bias" in attr.labels and "L1 attn bias" in attr.labels
    # one prediction: a target and a position select from the full attribution
    one = logit_attribution(model, toks, target=7, position=-1)
    torch.testing.assert_close(one.parts, attr.parts[:, :, -1, 7])
    assert float((one.parts.sum(0) - logits[:, -1, 7]).abs().max()) <= rel * scale
    per_pos = logit_attribution(model, toks[:, :-1], target=toks[:, 1:])  # the next tokens
    gathered = model(toks[:, :-1]).detach().gather(-1, toks[:, 1:, None])[..., 0]
    assert float((per_pos.parts.sum(0) - gathered).abs().max()) <= rel * scale
    top = one.top(3)
    assert len(top) == 3 and abs(top[0][1]) >= abs(top[1][1]) >= abs(top[2][1])


def test_a_part_is_what_it_writes_read_through_the_unembedding():
    """Independent of the hooks: L1H2's part is z_h @ W_O[h] @ W_U computed by hand from the weights."""
    model = small(positional="none")
    toks = tokens(1)
    attr = logit_attribution(model, toks, target=3, position=5)
    _, cache = model.run_with_cache(toks)
    attn = model.blocks[1].attn
    x = cache["blocks.1.hook_resid_pre"][0]  # (T, d)
    d = attn.d_head
    q = (x @ attn.q_proj.weight.T)[:, 2 * d:3 * d]
    k = (x @ attn.k_proj.weight.T)[:, 2 * d:3 * d]
    v = (x @ attn.v_proj.weight.T)[:, 2 * d:3 * d]
    pattern = ((q @ k.T) / d).square().tril()
    out = (pattern @ v)[5] @ attn.out_proj.weight[:, 2 * d:3 * d].T
    want = out @ model.unembed.weight[3]
    assert float(attr.parts[attr.labels.index("L1H2"), 0]) == pytest.approx(float(want), rel=1e-10)


def test_rmsnorm_freezes_the_scale_and_says_approximate():
    model = small(norm="rmsnorm")
    with torch.no_grad():
        model.ln_final.weight.uniform_(0.5, 1.5)
    toks = tokens()
    logits = model(toks).detach()
    attr = logit_attribution(model, toks, target=4, position=3)
    assert attr.approximate and "frozen" in attr.note
    assert float((attr.parts.sum(0) - logits[:, 3, 4]).abs().max()) <= 1e-10 * float(logits.abs().max())
    # independently: part * g / rms(stream) read through W_U
    _, cache = model.run_with_cache(toks)
    stream = cache["blocks.1.hook_resid_post"][:, 3]
    rms = (stream.square().mean(-1, keepdim=True) + model.ln_final.eps).sqrt()
    embed = cache["hook_embed"][:, 3]
    want = (embed * model.ln_final.weight / rms) @ model.unembed.weight[4]
    torch.testing.assert_close(attr.parts[0], want, rtol=1e-10, atol=0)


def test_bad_input_is_one_clear_error():
    model = small()
    with pytest.raises(AttributionError, match="not in the vocabulary"):
        logit_attribution(model, tokens(), target=V)
    with pytest.raises(AttributionError, match="position 12 is out of range"):
        logit_attribution(model, tokens(), position=T)
    with pytest.raises(AttributionError, match="ln1 .*RMSNorm.*--norm none"):
        path_expansion(small(norm="rmsnorm"), tokens(), 1, 0)
    with pytest.raises(AttributionError, match="not a product of QK forms.*softmax"):
        path_expansion(small(attn="softmax"), tokens(), 1, 0)
    with pytest.raises(AttributionError, match="head 9 is out of range"):
        path_expansion(model, tokens(), 1, 9)


# ---------------------------------------------------------------------------- path expansion
@pytest.mark.parametrize("mix", [dict(), dict(attn="bilinear", positional="learned"),
                                 dict(model_type="transformer_2L", mlp="bilinear", positional="none"),
                                 dict(attn={"name": "quadratic", "bias": True})],
                         ids=["quadratic-rope", "bilinear-learned", "transformer", "quadratic-bias"])
def test_path_expansion_sums_to_the_head_output(mix):
    model = small(**mix)
    toks = tokens()
    _, cache = model.run_with_cache(toks)
    for head in (0, 3):
        exp = path_expansion(model, toks, 1, head)
        want = cache["blocks.1.attn.hook_result"][:, :, head]  # (batch, pos, d_model)
        n = len(exp.sources)
        assert exp.terms.shape == (n,) * (1 + 2 * exp.n_factors) + (2, T, D)
        assert float((exp.total() - want).abs().max()) <= 1e-10 * float(want.abs().max())
        groups = exp.groups()
        assert float((sum(g.value for g in groups) - want).abs().max()) <= 1e-10 * float(want.abs().max())
    assert ("bias" in exp.sources) == isinstance(mix.get("attn"), dict)
    # projected on one logit at one position: the head's part of logit_attribution
    exp = path_expansion(model, toks, 1, 2, position=-1, target=5)
    attr = logit_attribution(model, toks, target=5, position=-1)
    torch.testing.assert_close(exp.total(), attr.parts[attr.labels.index("L1H2")], rtol=1e-10, atol=1e-12)


def test_expansion_terms_match_forward_passes_with_heads_removed():
    """Independent of the expansion: with every layer-0 head but L0H1 zeroed (W_O = 0), layer 1 reads
    embed + L0H1 only, so the head's output is the sum of the terms whose sources are in {embed, L0H1};
    with all of them zeroed it is the direct term alone."""
    model = small(positional="none")
    toks = tokens()
    exp = path_expansion(model, toks, 1, 0)
    keep = [exp.sources.index("embed"), exp.sources.index("L0H1")]
    sub = exp.terms
    for axis in range(1 + 2 * exp.n_factors):
        sub = sub.index_select(axis, torch.tensor(keep))
    d = model.blocks[0].attn.d_head
    for kept, want_terms in ((True, sub.flatten(0, 2 * exp.n_factors).sum(0)), (False, sub[(0,) * 5])):
        ablated = copy.deepcopy(model)
        with torch.no_grad():
            for h in range(H):
                if not (kept and h == 1):
                    ablated.blocks[0].attn.out_proj.weight[:, h * d:(h + 1) * d] = 0
        _, cache = ablated.run_with_cache(toks)
        got = cache["blocks.1.attn.hook_result"][:, :, 0]
        torch.testing.assert_close(want_terms, got, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------- planted induction circuit
PREV, IND = 1, 0  # the planted previous-token head (layer 0) and induction head (layer 1)


def planted_induction_model(vocab=16, n_ctx=16, dtype=torch.float64):
    """A 2-layer attention-only quadratic model built by hand: L0H1 moves each token's identity one
    position on (previous-token head, through learned positions), L1H0 attends from a token to the
    position after its earlier occurrence (K-composition with L0H1) and copies the token found
    there (induction head). Residual: [token one-hot | position one-hot | previous-token one-hot]."""
    d_model = 2 * vocab + n_ctx
    model = build_model("attention_only_2L", vocab_size=vocab, d_model=d_model, n_head=2, n_ctx=n_ctx,
                        positional="learned", attn="quadratic").to(dtype).eval()
    d = model.blocks[0].attn.d_head
    tok, pos, prev = slice(0, vocab), slice(vocab, vocab + n_ctx), slice(vocab + n_ctx, d_model)
    eye = lambda n: torch.eye(n, dtype=dtype)  # noqa: E731
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight[:, tok] = eye(vocab)  # tied: W_U reads the token block
        model.positional.W_pos[:, pos] = eye(n_ctx)
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        rows = lambda h: slice(h * d, h * d + max(vocab, n_ctx))  # noqa: E731
        # L0H1: query at position i matches key at i - 1 (score d * 1 / d = 1, pattern 1)
        a0.q_proj.weight[rows(PREV).start:rows(PREV).start + n_ctx, pos] = d * eye(n_ctx)
        a0.k_proj.weight[rows(PREV).start + 1:rows(PREV).start + n_ctx, pos] = eye(n_ctx)[:-1]
        a0.v_proj.weight[rows(PREV).start:rows(PREV).start + vocab, tok] = eye(vocab)
        a0.out_proj.weight[prev, rows(PREV).start:rows(PREV).start + vocab] = eye(vocab)
        # L1H0: query token t matches a key whose previous token is t; copies that key's token, x6
        a1.q_proj.weight[rows(IND).start:rows(IND).start + vocab, tok] = d * eye(vocab)
        a1.k_proj.weight[rows(IND).start:rows(IND).start + vocab, prev] = eye(vocab)
        a1.v_proj.weight[rows(IND).start:rows(IND).start + vocab, tok] = eye(vocab)
        a1.out_proj.weight[tok, rows(IND).start:rows(IND).start + vocab] = 6 * eye(vocab)
        # the other heads: small random weights, so they are not trivially zero
        g = torch.Generator().manual_seed(0)
        for a, h in ((a0, 1 - PREV), (a1, 1 - IND)):
            for proj in (a.q_proj, a.k_proj, a.v_proj):
                proj.weight[h * d:(h + 1) * d] = 0.05 * torch.randn(d, d_model, generator=g, dtype=dtype)
            a.out_proj.weight[:, h * d:(h + 1) * d] = 0.05 * torch.randn(d_model, d, generator=g, dtype=dtype)
    return model


def repeated_sequences(batch, half, vocab, seed=0):
    """Random tokens, then the same tokens again: the second half is copyable, the first is not."""
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(vocab, generator=g)[:half] for _ in range(batch)])
    return torch.cat([first, first], 1)


def test_planted_induction_circuit_is_found_by_every_method():
    model = planted_induction_model()
    seqs = repeated_sequences(8, 8, 16)
    # weights: the top K-composition pair is the planted one
    top = induction_heads(model, top=1)[0]
    assert (top.layer_from, top.head_from, top.layer_to, top.head_to) == (0, PREV, 1, IND)
    second = induction_heads(model, top=2)[1]
    assert top.score > 1.5 * top.baseline and top.score > 1.5 * second.score and top.copying_score_to > 0.9
    # behaviour: the induction head's pattern on the repeated half sits on "the token after the earlier one"
    _, cache = model.run_with_cache(seqs)
    pattern = cache["blocks.1.attn.hook_pattern"].abs()  # (batch, head, q, k)
    q = torch.arange(8, 16)
    share = (pattern[:, :, q, q - 7] / pattern[:, :, q].sum(-1).clamp_min(1e-30)).mean((0, 2))
    assert int(share.argmax()) == IND and float(share[IND]) > 0.9
    # ablating it: the loss on the copyable half rises, the first half does not move
    def losses(m):
        logp = m(seqs).log_softmax(-1)[:, :-1].gather(-1, seqs[:, 1:, None])[..., 0]
        return -logp[:, 7:].mean().item(), -logp[:, :7].mean().item()
    ablated = copy.deepcopy(model)
    d = model.blocks[1].attn.d_head
    with torch.no_grad():
        ablated.blocks[1].attn.out_proj.weight[:, IND * d:(IND + 1) * d] = 0
    (copy_before, fresh_before), (copy_after, fresh_after) = losses(model), losses(ablated)
    assert copy_after - copy_before > 2.0 and abs(fresh_after - fresh_before) < 0.05
    # the exact attribution of the answer logit names the planted path, and only it is large
    prompt = seqs[:1, :12]  # ... x y ... x: predicts y
    assert int(prompt[0, 11]) == int(prompt[0, 3])  # position 11 repeats position 3: the answer is token 4
    answer = int(prompt[0, 4])
    paths = top_paths(model, prompt, target=answer, position=-1, k=3)
    assert paths[0].name == f"L0H{PREV} -> K of L1H{IND} (induction)"
    assert paths[0].v == "embed" and paths[0].q == ("embed", "embed") and paths[0].k == (f"L0H{PREV}",) * 2
    assert abs(paths[0].value) > 10 * abs(paths[1].value)
    # patching: corrupt the earlier occurrence (position 3); the clean residual stream entering layer 1 at
    # the position after it (4: where the previous-token head wrote "token 3") restores the answer logit,
    # the stream at position 3 itself does not (the induction head reads the key one position on)
    corrupted = prompt.clone()
    corrupted[0, 3] = next(t for t in range(16) if t not in prompt[0].tolist())
    _, clean = model.run_with_cache(prompt, names_filter="blocks.1.hook_resid_pre")

    def patched_logit(position):
        def patch(module, args, output):
            output = output.clone()
            output[:, position] = clean["blocks.1.hook_resid_pre"][:, position]
            return output

        handle = model.blocks[1].hook_resid_pre.register_forward_hook(patch)
        try:
            return model(corrupted)[0, -1, answer].item()
        finally:
            handle.remove()

    clean_logit, corrupt_logit = model(prompt)[0, -1, answer].item(), model(corrupted)[0, -1, answer].item()
    restored = lambda x: (x - corrupt_logit) / (clean_logit - corrupt_logit)  # noqa: E731
    assert clean_logit - corrupt_logit > 3.0
    assert restored(patched_logit(4)) > 0.9 and abs(restored(patched_logit(3))) < 0.1


# ------------------------------------------------------------------ the readings of the report
def gram_model(vocab=16, seed=0):
    """Tied embeddings whose Gram matrix is D (4 I + P + P^T) D (P the cyclic shift, D a spread of
    norms): the only bigrams are t -> t +- 1, while the raw diagonal (4 d_t^2) beats every one of them."""
    shift = torch.roll(torch.eye(vocab, dtype=torch.float64), 1, 1)
    G = 4 * torch.eye(vocab, dtype=torch.float64) + shift + shift.T
    norms = torch.linspace(1.0, 1.5, vocab, dtype=torch.float64)[torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))]
    G = norms[:, None] * G * norms[None, :]
    evals, evecs = torch.linalg.eigh(G)
    E = evecs * evals.clamp_min(0).sqrt()  # E E^T = G
    model = build_model("attention_only_1L", vocab_size=vocab, d_model=vocab, n_head=2, n_ctx=8,
                        positional="none").to(torch.float64).eval()
    with torch.no_grad():
        model.embed.weight.copy_(E)
    return model, G


def test_direct_path_ranks_what_is_predicted_next_not_embedding_norms():
    model, G = gram_model()
    assert embeddings_tied(model)
    raw = direct_path_top(model, 10, centre=False, exclude_diagonal=False)
    assert all(p.row == p.col for p in raw.pairs)  # the old reading: t -> t, by embedding norm
    top = direct_path_top(model, 10)
    assert top.ranked_by == "row-centred logit, diagonal left out" and "Gram" in top.note
    assert all((p.col - p.row) % 16 in (1, 15) for p in top.pairs)  # the planted bigrams
    centred = G - G.mean(1, keepdim=True)
    centred.fill_diagonal_(float("-inf"))
    vals, idx = centred.flatten().topk(10)
    assert [p.value for p in top.pairs] == pytest.approx(vals.tolist(), rel=1e-5)  # views are float32
    assert [p.logit for p in top.pairs] == pytest.approx([float(G[p.row, p.col]) for p in top.pairs], rel=1e-5)
    # restricted search (as for a large vocabulary): the same pairs, certified
    small_search = direct_path_top(model, 3, max_tokens=8)
    assert small_search.searched_rows == 8 and all((p.col - p.row) % 16 in (1, 15) for p in small_search.pairs)
    # untied embeddings: the diagonal is a real prediction and stays in
    untied = build_model("attention_only_1L", vocab_size=16, d_model=16, n_head=2, n_ctx=8, positional="none",
                         tie_embeddings=False).to(torch.float64)
    with torch.no_grad():
        untied.embed.weight.copy_(torch.eye(16))
        untied.unembed.weight.copy_(torch.eye(16) * 3 + 0.1 * torch.randn(16, 16))
    assert not embeddings_tied(untied)
    assert all(p.row == p.col for p in direct_path_top(untied, 5).pairs)
    torch.testing.assert_close(direct_path(model).AB.double(), G, rtol=1e-5, atol=1e-5)  # the Gram matrix


def ov_heads_model():
    """Head 0: OV circuit = -5 u u^T + 0.1 I on the first 8 dims (one dominant negative eigenvalue,
    the rest positive); head 1: OV = I on dims 8..15 (eight equal eigenvalues)."""
    vocab, d = 16, 16
    model = build_model("attention_only_1L", vocab_size=vocab, d_model=d, n_head=2, n_ctx=8,
                        positional="none").to(torch.float64).eval()
    dh = 8
    u = torch.zeros(d, dtype=torch.float64)
    u[:dh] = torch.linspace(1, 2, dh, dtype=torch.float64)
    u /= u.norm()
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(d))
        attn = model.blocks[0].attn
        attn.v_proj.weight.zero_()
        attn.out_proj.weight.zero_()
        ov0 = -5 * torch.outer(u[:dh], u[:dh]) + 0.1 * torch.eye(dh, dtype=torch.float64)
        attn.v_proj.weight[:dh, :dh] = torch.eye(dh)  # z = x[:8]
        attn.out_proj.weight[:dh, :dh] = ov0.T  # out = z @ ov0
        attn.v_proj.weight[dh:, dh:] = torch.eye(dh)
        attn.out_proj.weight[dh:, dh:] = torch.eye(dh)
    return model


def test_copying_score_reports_the_top_eigenvalue_share():
    model = ov_heads_model()
    specs = spectrum(ov_circuit(model, 0))  # float32 views
    # head 0: eigenvalues -5 + 0.1 and seven times 0.1
    top, rest = 4.9, 0.7
    assert specs[0].top_share == pytest.approx(top / (top + rest), rel=1e-5)
    assert specs[0].copying_score == pytest.approx((-top + rest) / (top + rest), rel=1e-5) and specs[0].copying_score < 0
    assert specs[0].copying_score_rest == pytest.approx(1.0, rel=1e-5) and specs[0].one_eigenvalue
    assert specs[1].top_share == pytest.approx(1 / 8, rel=1e-5) and not specs[1].one_eigenvalue
    assert specs[1].copying_score == pytest.approx(1.0, rel=1e-5)
    heads = analyze_layer_heads(model, 0, top_k=3)
    assert heads[0].ov_one_eigenvalue and heads[0].ov_top_share >= DOMINANT_EIGENVALUE_SHARE
    assert not heads[1].ov_one_eigenvalue
    page = Report.from_model(model, top_k=3, plots=False).html
    assert page.count(">one eigenvalue</span>") == 1 and "OV top |\u03bb| share" in page


# ------------------------------------------------------------------------------------ the CLI
CLI_TEXT = "Once upon a time Zorblin went to the market. Zorblin bought a kite. Then Zorblin"


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Run folders (model + tokenizer.json) of a 2-layer quadratic model, an RMSNorm one and a softmax one."""
    from qtoy_core.data import train_bpe

    base = tmp_path_factory.mktemp("attr-cli")
    tok = train_bpe([CLI_TEXT * 3, "the market and a kite went home"], vocab_size=300)
    runs = {}
    for name, opts in (("quadratic", {}), ("rmsnorm", {"norm": "rmsnorm"}), ("softmax", {"attn": "softmax"})):
        torch.manual_seed(0)
        model = build_model("attention_only_2L", vocab_size=300, d_model=32, n_head=2, n_ctx=64, **opts)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        folder = base / name
        model.save_pretrained(folder)
        tok.save(str(folder / "tokenizer.json"))
        runs[name] = str(folder)
    return runs


def _cli(capsys, *args):
    from qtoy_cli.main import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_attribute_writes_the_page_and_json(cli_runs, tmp_path, capsys):
    import json
    import re

    from qtoy_core.analysis.report import format_number, report_numbers
    from qtoy_core.data import Tokenizer

    out, js = tmp_path / "attr.html", tmp_path / "attr.json"
    code, stdout, err = _cli(capsys, "attribute", cli_runs["quadratic"], "--text", CLI_TEXT, "--target", " kite",
                             "--position", "-1", "--out", str(out), "--json", str(js))
    assert code == 0, err
    data = json.loads(js.read_text())
    tok = Tokenizer.from_file(cli_runs["quadratic"] + "/tokenizer.json")
    ids = tok.encode(CLI_TEXT)
    # the separator is put first, as training documents start (and as qtoy attention does)
    assert data["target"]["id"] == tok.encode(" kite")[0] and data["position"] == len(ids)
    assert not data["approximate"] and data["paths"]["shown"] and data["paths"]["top"]
    assert data["sum_of_parts"] == pytest.approx(data["logit"], rel=1e-5, abs=1e-6)
    assert {p["label"] for p in data["parts"]} >= {"embed", "L0H0", "L0H1", "L1H0", "L1H1"}
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and not re.search(r"https?://", page) and "<script" not in page
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r'<td class="num">(.*?)</td>', page, flags=re.S)]
    numbers = report_numbers(data)
    assert cells and all(c in numbers for c in cells)
    assert format_number(data["paths"]["top"][0]["value"]) in cells
    code, _, err = _cli(capsys, "attribute", cli_runs["quadratic"], "--text", CLI_TEXT, "--target", " kite",
                        "--no-separator", "--out", str(tmp_path / "n.html"), "--json", str(tmp_path / "n.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "n.json").read_text())["position"] == len(ids) - 1
    # --json alone: JSON on standard output; default target: the model's top prediction
    code, stdout, err = _cli(capsys, "attribute", cli_runs["rmsnorm"], "--text", CLI_TEXT, "--out",
                             str(tmp_path / "b.html"), "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["approximate"] and data["target"]["chosen"] == "the model's top prediction" and data["rank"] == 1
    assert not data["paths"]["shown"] and "RMSNorm" in data["paths"]["note"]


@pytest.mark.parametrize("args, message", [
    (("--target", " Zorblin kite"), "is not a token in the vocabulary"),
    (("--target-id", "300"), "not in the vocabulary"),
    (("--position", "99"), "position 99 is out of range"),
])
def test_cli_attribute_bad_input(cli_runs, tmp_path, capsys, args, message):
    code, _, err = _cli(capsys, "attribute", cli_runs["quadratic"], "--text", CLI_TEXT, "--out",
                        str(tmp_path / "x.html"), *args)
    assert code != 0 and message in err and "Traceback" not in err


def test_cli_attribute_refuses_paths_it_cannot_expand(cli_runs, tmp_path, capsys):
    code, _, err = _cli(capsys, "attribute", cli_runs["rmsnorm"], "--text", CLI_TEXT, "--paths", "--out",
                        str(tmp_path / "x.html"))
    assert code == 2 and "RMSNorm" in err and "--norm none" in err and "Traceback" not in err
    code, _, err = _cli(capsys, "attribute", cli_runs["softmax"], "--text", CLI_TEXT, "--paths", "--out",
                        str(tmp_path / "x.html"))
    assert code == 2 and "not a product of QK forms" in err and "Traceback" not in err
    code, _, err = _cli(capsys, "attribute", cli_runs["softmax"], "--text", CLI_TEXT, "--out", str(tmp_path / "y.html"))
    assert code == 0, err  # without --paths: the parts, and a note where the paths would be
