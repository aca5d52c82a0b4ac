"""The attention viewer (`qtoy attention`) and the report's behaviour section: the page's numbers
against the model's hook_pattern, its errors, and what a real browser shows when a token is hovered."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from qtoy_core.analysis.attention_view import SCALE_KINDS, AttentionViewError, attention_view, pattern_color
from qtoy_cli.main import main

CORPUS = ["Once upon a time there was a little fox named Pip. Pip lived in a den near the river.",
          "One day Pip met a sheep named Mo. \"Hello, Mo!\" said Pip. \"Hello, Pip!\" said Mo."] * 4
TEXT = "Pip met a sheep named Mo. Pip said hello."
KIND = {"quadratic": "non-negative", "bilinear": "signed", "softmax": "probability"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from qtoy_core.data import Tokenizer, train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(CORPUS, vocab_size=300).save(str(path))
    return Tokenizer.from_file(path), path


def _model(attn: str, positional: str = "rope", n_ctx: int = 32):
    import qtoy_core

    torch.manual_seed(0)
    model = qtoy_core.build_model("attention_only_2L", d_model=16, n_head=2, n_ctx=n_ctx, vocab_size=300, attn=attn,
                                  positional=positional)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for attn in KIND:
        folder = base / attn
        _model(attn).save_pretrained(folder)
        (folder / "tokenizer.json").write_text(tokenizer[1].read_text(encoding="utf-8"), encoding="utf-8")
        out[attn] = str(folder)
    learned = base / "learned"
    _model("quadratic", "learned", n_ctx=8).save_pretrained(learned)
    (learned / "tokenizer.json").write_text(tokenizer[1].read_text(encoding="utf-8"), encoding="utf-8")
    out["learned"] = str(learned)
    return out


def _cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _reference(model, tok, text):
    seq = [tok.separator_id] + tok.encode(text)
    _, cache = model.run_with_cache(torch.tensor([seq]), lambda n: n.endswith("hook_pattern"))
    return seq, [cache[f"blocks.{i}.attn.hook_pattern"][0] for i in range(len(model.blocks))]


@pytest.mark.parametrize("attn", list(KIND))
def test_view_holds_every_head_pattern_and_says_its_scale(attn, tokenizer):
    tok, _ = tokenizer
    model = _model(attn)
    view = attention_view(model, tok, TEXT)
    seq, ref = _reference(model, tok, TEXT)
    assert [t for t, _, _ in view.tokens] == seq and view.separator
    assert view.kinds == [KIND[attn]] * 2
    for layer in range(2):
        for head in range(2):
            torch.testing.assert_close(view.patterns[layer][head], ref[layer][head].float())
    page = view.html
    data = json.loads(re.search(r'<script type="application/json" class="av-data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))
    assert len(data["layers"]) == 2 and all(len(L["heads"]) == 2 for L in data["layers"])
    assert data["layers"][0]["label"] == SCALE_KINDS[KIND[attn]]
    rows = data["layers"][1]["heads"][1]["rows"]
    assert len(rows) == len(seq) and all(len(r) == i + 1 for i, r in enumerate(rows))
    torch.testing.assert_close(torch.tensor(rows[-1]), ref[1][1][-1].float(), rtol=1e-4, atol=1e-7)
    assert not re.search(r"https?://", page) and "<link" not in page and " src=" not in page  # offline
    if attn == "bilinear":
        assert (ref[0] < 0).any()  # a signed pattern really is negative somewhere
    if attn == "softmax":
        torch.testing.assert_close(ref[0].sum(-1), torch.ones(2, len(seq)))


def test_colour_scales():
    assert pattern_color(0.0, "non-negative", 5.0) == "rgb(255, 255, 255)"
    assert pattern_color(5.0, "non-negative", 5.0) == "rgb(31, 95, 191)" == pattern_color(9.0, "non-negative", 5.0)
    assert pattern_color(-2.0, "signed", 2.0) == "rgb(192, 57, 43)"
    assert pattern_color(-1.0, "signed", 2.0) == "rgb(224, 156, 149)"
    assert pattern_color(-1.0, "non-negative", 2.0) == "rgb(255, 255, 255)"
    assert pattern_color(0.5, "probability") == pattern_color(0.5, "non-negative", 1.0)  # probabilities: 0..1


def test_bad_text_is_one_clear_error(tokenizer, run_dirs, tmp_path, capsys):
    tok, _ = tokenizer
    with pytest.raises(AttentionViewError, match="empty"):
        attention_view(_model("quadratic"), tok, "")
    with pytest.raises(AttentionViewError, match=r"n_ctx=8: shorten the text to at most 7 tokens"):
        attention_view(_model("quadratic", "learned", n_ctx=8), tok, TEXT)
    code, _, err = _cli(capsys, "attention", run_dirs["learned"], "--text", TEXT, "--out", str(tmp_path / "a.html"))
    assert code == 2 and "n_ctx=8" in err and "Traceback" not in err and err.count("\n") <= 2
    code, _, err = _cli(capsys, "attention", run_dirs["quadratic"], "--text", "", "--out", str(tmp_path / "a.html"))
    assert code != 0 and "empty" in err and "Traceback" not in err
    assert not (tmp_path / "a.html").exists()


def test_analyze_links_the_viewer_and_reports_behaviour(run_dirs, tmp_path, capsys):
    from qtoy_core.analysis.report import report_numbers

    out, js = tmp_path / "report.html", tmp_path / "report.json"
    code, stdout, err = _cli(capsys, "analyze", run_dirs["quadratic"], "--out", str(out), "--json", str(js),
                             "--attention-text", TEXT, "--no-plots")
    assert code == 0, err
    page, data = out.read_text(encoding="utf-8"), json.loads(js.read_text(encoding="utf-8"))
    viewer = tmp_path / "report-attention.html"
    assert viewer.exists() and str(viewer) in stdout
    assert 'href="report-attention.html"' in page and 'id="behaviour"' in page
    beh = data["behaviour"]
    assert len(beh["heads"]) == 4 and set(beh["spearman"]) == {"previous_token", "duplicate_token", "induction",
                                                               "copying"}
    assert beh["tokens"]["bos"] is not None  # detection sequences start with the separator, as documents do
    h = beh["heads"][0]
    assert 0 <= h["previous_token"] <= 1 and -1 <= h["copying"] <= 1
    numbers = report_numbers(data)
    cells = re.findall(r'<td class="num">(.*?)</td>', page[page.index('id="behaviour"'):])
    assert cells and all(c in numbers or c == "n/a" for c in cells)


# ----------------------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser():
    """Headless system Chromium driven by Playwright (one launch for the module's browser tests)."""
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if chromium is None:
        pytest.skip("no Chromium on this machine (apt-get install -y chromium): the viewer's browser test needs one")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -e '.[test]' installs it): the browser test needs it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.mark.parametrize("attn", ["quadratic", "bilinear", "softmax"])
def test_hovering_a_token_in_chromium_shows_its_weights(attn, browser, run_dirs, tokenizer, tmp_path, capsys):
    out = tmp_path / "attention.html"
    code, _, err = _cli(capsys, "attention", run_dirs[attn], "--text", TEXT, "--out", str(out))
    assert code == 0, err
    from qtoy_core import ToyTransformer

    seq, ref = _reference(ToyTransformer.from_pretrained(run_dirs[attn]), tokenizer[0], TEXT)
    q = 6
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:")
                   else route.continue_())  # offline: any network request would fail the page
        page.goto(out.as_uri())
        for layer, head in ((0, 0), (1, 1)):
            if (layer, head) != (0, 0):
                page.click(f'.head[data-layer="{layer}"][data-head="{head}"]')
            page.hover(f'.tok[data-pos="{q}"]')
            title = page.inner_text(".detail h2")
            assert title.startswith(f"Layer {layer}, head {head} \u00b7 query {q}")
            shown = page.eval_on_selector_all(".detail tr.key", "rs => rs.map(r => [+r.dataset.key, "
                                              "+r.dataset.weight, r.querySelector('.w').textContent])")
            row = ref[layer][head, q].float()
            assert [k for k, _, _ in shown] == list(range(q + 1))  # the query's causal keys only
            torch.testing.assert_close(torch.tensor([w for _, w, _ in shown]), row[: q + 1], rtol=1e-4, atol=1e-7)
            for (_, w, text), v in zip(shown, row[: q + 1].tolist()):  # the printed number, 4 digits
                assert float(text) == pytest.approx(v, rel=2e-3, abs=1e-12)
            label = page.inner_text(".scale-label")
            assert SCALE_KINDS[KIND[attn]] in label
            vmax = 1.0 if attn == "softmax" else float(ref[layer][head].abs().max())
            k = int(row[: q + 1].abs().argmax())
            bg = page.eval_on_selector(f'.tok[data-pos="{k}"]', "e => getComputedStyle(e).backgroundColor")
            assert bg == pattern_color(float(row[k]), KIND[attn], vmax)
            later = page.get_attribute(f'.tok[data-pos="{q + 1}"]', "class")
            assert "future" in later  # keys after the query are not attended
            hi = page.inner_text(".ramp-row .hi")
            assert float(hi) == pytest.approx(vmax, rel=2e-3)
            if attn == "bilinear":
                assert float(page.inner_text(".ramp-row .lo")) == pytest.approx(-vmax, rel=2e-3)
        if attn == "softmax":
            assert "(probabilities)" in page.inner_text(".detail .rowsum")
        # relative to the query's row: its largest |weight| takes the end of the scale
        page.check(".row-scale")
        page.hover(f'.tok[data-pos="{q}"]')
        row = ref[1][1, q].float()[: q + 1]
        k = int(row.abs().argmax())
        bg = page.eval_on_selector(f'.tok[data-pos="{k}"]', "e => getComputedStyle(e).backgroundColor")
        assert bg == pattern_color(float(row[k]), KIND[attn], float(row.abs().max()))
        assert bg in ("rgb(31, 95, 191)", "rgb(192, 57, 43)")
        assert "this query\u2019s row" in page.inner_text(".scale-label")
    finally:
        page.close()
