"""Activation patching against answers known in advance: exact restorations, exact no-ops from
causality, and a one-layer model whose every patched logit difference is computed by hand."""

import re

import pytest
import torch

from qtoy_core import build_model
from qtoy_core.analysis.patching import (
    PATCH_KINDS,
    PatchingError,
    activation_patching,
    get_act_patch_resid_pre,
    logit_diff_metric,
    patching_html,
)

V, D, H, T, C = 40, 16, 4, 6, 2  # C: the one position where the clean and corrupted prompts differ
ANSWER, WRONG = 3, 11


def small(model_type="attention_only_1L", seed=0, std=0.3, **options):
    torch.manual_seed(seed)
    opts = dict(vocab_size=V, d_model=D, n_head=H, n_ctx=16, positional="none")
    opts.update(options)
    model = build_model(model_type, **opts)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def prompts(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (batch, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, C] = (clean[:, C] + 1 + torch.randint(0, V - 1, (batch,), generator=g)) % V
    return clean, corrupted


@pytest.mark.parametrize("options", [dict(model_type="attention_only_2L", attn="quadratic"),
                                     dict(model_type="transformer_2L", attn="bilinear", mlp="gelu", positional="rope"),
                                     dict(model_type="transformer_2L", attn="softmax", mlp="bilinear", norm="rmsnorm",
                                          positional="learned")])
def test_patching_the_residual_restores_exactly_where_it_must_and_nothing_where_it_cannot(options):
    model = small(**options)
    clean, corrupted = prompts()
    res = activation_patching(model, clean, corrupted, answer=ANSWER, wrong=WRONG, kinds=["resid_pre"])["resid_pre"]
    metric = logit_diff_metric(ANSWER, WRONG)
    with torch.no_grad():
        clean_ld, corrupted_ld = float(metric(model(clean))), float(metric(model(corrupted)))
    assert res.dims == ("layer", "pos") and res.values.shape == (2, T)
    assert res.labels == {"layer": ["L0", "L1"], "pos": [str(p) for p in range(T)]}
    assert res.clean == pytest.approx(clean_ld, abs=1e-5) and res.corrupted == pytest.approx(corrupted_ld, abs=1e-5)
    assert abs(clean_ld - corrupted_ld) > 1e-3  # the prompts differ in what the model says
    # layer 0 at the differing position: the whole clean run, so the clean logit diff exactly
    assert float(res.values[0, C]) == pytest.approx(clean_ld, abs=1e-4)
    assert float(res.normalized()[0, C]) == pytest.approx(1.0, abs=1e-4)
    # positions before C hold the same residual in both runs (causal): patching them is a no-op;
    # at layer 0 so is every position whose token is the same
    for layer in range(2):
        for p in range(C):
            assert float(res.values[layer, p]) == pytest.approx(corrupted_ld, abs=1e-4)
    for p in range(C + 1, T):
        assert float(res.values[0, p]) == pytest.approx(corrupted_ld, abs=1e-4)


def test_every_head_patch_of_a_one_layer_model_by_hand():
    model = small(attn="quadratic")  # logits = (resid + sum_h z_h W_O[h] (+ b)) W_U^T: linear in each head
    clean, corrupted = prompts()
    results = activation_patching(model, clean, corrupted, answer=ANSWER, wrong=WRONG, kinds=list(PATCH_KINDS))
    assert set(results) == set(PATCH_KINDS) - {"mlp_out"}  # an attention-only model has no MLP to patch
    _, cc = model.run_with_cache(clean)
    _, xc = model.run_with_cache(corrupted)
    W_O = model.blocks[0].attn.weight_views()["W_O"]  # (head, d_head, d_model)
    direction = (model.unembed.weight[ANSWER] - model.unembed.weight[WRONG]).detach()
    base = results["resid_pre"].corrupted
    d = D // H

    def restored(h, z_new):  # the logit diff with head h's z replaced: z (batch, pos, d_head)
        delta = (z_new - xc["z", 0][:, :, h])[:, -1] @ W_O[h] @ direction
        return base + float(delta.mean())

    causal = torch.ones(T, T).tril()
    for h in range(H):
        q_c, k_c, v_c = cc["q", 0][:, :, h], cc["k", 0][:, :, h], cc["v", 0][:, :, h]
        q_x, k_x, v_x = xc["q", 0][:, :, h], xc["k", 0][:, :, h], xc["v", 0][:, :, h]

        def z(q, k, v, pattern=None):
            if pattern is None:
                pattern = (q @ k.transpose(-1, -2) / d).square() * causal
            return pattern @ v

        by_hand = {"head_q": z(q_c, k_x, v_x), "head_k": z(q_x, k_c, v_x), "head_v": z(q_x, k_x, v_c),
                   "head_pattern": z(None, None, v_x, pattern=cc["pattern", 0][:, h]), "head_out": cc["z", 0][:, :, h]}
        for kind, z_new in by_hand.items():
            r = results[kind]
            assert r.dims == ("layer", "head") and r.values.shape == (1, H)
            assert float(r.values[0, h]) == pytest.approx(restored(h, z_new), rel=1e-4, abs=1e-4), (kind, h)
        # per position: only the last position's output reaches the last logits of a one-layer model
        by_pos = results["head_out_by_pos"]
        assert by_pos.dims == ("layer", "pos", "head") and by_pos.labels["head"] == [f"H{i}" for i in range(H)]
        for p in range(T - 1):
            assert float(by_pos.values[0, p, h]) == pytest.approx(base, abs=1e-4)
        assert float(by_pos.values[0, -1, h]) == pytest.approx(restored(h, cc["z", 0][:, :, h]), rel=1e-4, abs=1e-4)


def test_loss_metric_and_tl_style_calls():
    model = small("transformer_1L", attn="quadratic", mlp="bilinear")
    clean, corrupted = prompts(batch=3)
    res = activation_patching(model, clean, corrupted, metric="loss", kinds=["resid_pre", "mlp_out"])
    with torch.no_grad():
        clean_loss = float(model.loss(clean))
    assert res["resid_pre"].clean == pytest.approx(clean_loss, abs=1e-5)
    assert float(res["resid_pre"].values[0, C]) == pytest.approx(clean_loss, abs=1e-4)
    assert res["mlp_out"].values.shape == (1, T)
    # TL's signature: (model, corrupted_tokens, clean_cache, patching_metric); the clean value comes from the cache
    _, clean_cache = model.run_with_cache(clean)
    metric = logit_diff_metric(torch.tensor([ANSWER, 5, 7]), WRONG)
    direct = get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    with torch.no_grad():
        assert direct.clean == pytest.approx(float(metric(model(clean))), abs=1e-5)
    assert direct.to_dict()["dims"] == ["layer", "pos"]


def test_bad_inputs_are_one_clear_error():
    model = small()
    clean, corrupted = prompts()
    with pytest.raises(PatchingError, match=r"6 tokens and the corrupted one 5.*same length"):
        activation_patching(model, clean, corrupted[:, :5], answer=ANSWER, wrong=WRONG)
    with pytest.raises(PatchingError, match=r"answer token ids must be in 0..39"):
        activation_patching(model, clean, corrupted, answer=V + 3, wrong=WRONG)
    with pytest.raises(PatchingError, match="answer= and wrong="):
        activation_patching(model, clean, corrupted)
    with pytest.raises(PatchingError, match="unknown patching kind"):
        activation_patching(model, clean, corrupted, answer=ANSWER, wrong=WRONG, kinds=["head_zz"])
    _, cache = model.run_with_cache(clean[:, :4])
    with pytest.raises(PatchingError, match="same length"):
        get_act_patch_resid_pre(model, corrupted, cache, logit_diff_metric(ANSWER, WRONG))


def test_heatmap_page_is_offline_and_shows_every_cell(tmp_path):
    model = small()
    clean, corrupted = prompts()
    results = activation_patching(model, clean, corrupted, answer=ANSWER, wrong=WRONG,
                                  kinds=["resid_pre", "head_out_by_pos", "head_q"])
    page = patching_html(results, tokens=[f"t{i}" for i in range(T)])
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    assert page.count("<td") == 1 * T + 1 * T * H + 1 * H
    assert "5 t5" in page and "resid_pre" in page and "head_q" in page
    # the cell at the differing position of layer 0 is full red (normalised 1.00)
    cell = re.search(r'<td style="background:([^"]+)" title="L0 2 t2:', page)
    assert cell and cell.group(1) == "rgb(255,0,0)"
    assert "<table" in results["head_q"]._repr_html_()


# ------------------------------------------------------------------------------------------- CLI
def test_qtoy_patch_writes_the_heat_map_and_json(tmp_path, capsys):
    import json

    from qtoy_cli.main import main
    from qtoy_core.data import train_bpe

    tok = train_bpe(["Mo met Pip. Pip met Mo. A sheep met a fox."] * 4, vocab_size=300)
    model = small(vocab_size=300)
    model.save_pretrained(tmp_path / "run")
    tok.save(str(tmp_path / "run" / "tokenizer.json"))

    def cli(*args):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    out, js = tmp_path / "patch.html", tmp_path / "patch.json"
    # ["Mo", " met", " Pip"] against ["Mo", " met", " fox"] with this tokenizer
    code, stdout, err = cli("patch", tmp_path / "run", "--clean", "Mo met Pip", "--corrupted", "Mo met fox",
                            "--answer", " Mo", "--wrong", " fox", "--kinds", "resid_pre,head_out", "--out", out, "--json", js)
    assert code == 0, err
    assert "logit_diff: clean" in stdout
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "https://" not in page and "head_out" in page
    data = json.loads(js.read_text(encoding="utf-8"))
    n = len(data["tokens"])
    res = data["results"]["resid_pre"]
    assert res["dims"] == ["layer", "pos"] and len(res["values"][0]) == n
    assert data["tokens"] == ["Mo", " met", " Pip"]
    assert res["values"][0][2] == pytest.approx(res["clean"], abs=1e-4)  # the differing position: the clean run
    assert res["values"][0][0] == pytest.approx(res["corrupted"], abs=1e-4)
    code, _, err = cli("patch", tmp_path / "run", "--clean", "Mo met Pip", "--corrupted", "Mo met Pipp",
                       "--answer", "P", "--wrong", "M", "--out", out)
    assert code != 0 and "same length" in err and "Traceback" not in err
    code, _, err = cli("patch", tmp_path / "run", "--clean", "Mo met Pip", "--corrupted", "Mo met fox",
                       "--answer", "Pip met", "--wrong", "M", "--out", out)
    assert code != 0 and "not one" in err
