"""The HTML views: the per-token loss view (`qtoy visualize`) and the circuit report (`qtoy analyze`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from qtoy_core.analysis.loss_view import (SATURATION, LossView, LossViewInputError, TokenLoss, excess_color, loss_color,
                                          loss_view, visible)
from qtoy_core.analysis.report import Report, format_number, report_numbers
from qtoy_cli.main import main

VOCAB = 300
CORPUS = [
    "Once upon a time there was a little fox named Pip. Pip lived in a den near the river.",
    "Every day Pip ran to the river and drank some water. The river was cold and clear.",
    "One day Pip met a sheep named Mo. \"Hello, Mo!\" said Pip. \"Hello, Pip!\" said Mo.\n",
    "They played in the meadow until the sun went down, and then they went home to sleep.",
] * 4
TEXT = "Once upon a time there was a fox named Pip.\nPip met  a sheep named Mo. \"Hello, Mo!\" said Pip."


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    from qtoy_core.data import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(CORPUS, vocab_size=VOCAB).save(str(path))
    return path


def _model(model_type: str = "attention_only_1L", seed: int = 0, *, randomize: bool = True, **options):
    import qtoy_core

    torch.manual_seed(seed)
    opts = dict(d_model=32, n_head=2, n_ctx=64, vocab_size=VOCAB)
    opts.update(options)
    model = qtoy_core.build_model(model_type, **opts)
    if randomize:  # out_proj starts at zero: give every weight a value so circuits are not all zero
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
    return model.eval()


def _save(model, folder: Path, tokenizer_json: Path | None) -> str:
    model.save_pretrained(folder)
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(tokenizer_json.read_text(encoding="utf-8"), encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_json) -> dict[str, str]:
    base = tmp_path_factory.mktemp("models")
    return {
        "1L": _save(_model("attention_only_1L", 1), base / "m1", tokenizer_json),
        "2L": _save(_model("transformer_2L", 2, mlp="bilinear"), base / "m2", tokenizer_json),
    }


def _cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------ HTML parsing
class _Tokens(HTMLParser):
    """Collects the loss view's token spans: attributes, shown text (outside the tooltip) and tooltip text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tokens: list[dict] = []
        self.stack: list[str] = []  # "tok", "tip" or "" for each open span

    def handle_starttag(self, tag, attrs):
        if tag != "span":
            return
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        role = "tok" if "tok" in cls else "tip" if "tip" in cls else ""
        if role == "tok":
            self.tokens.append({"attrs": a, "text": "", "tip": ""})
        self.stack.append(role)

    def handle_endtag(self, tag):
        if tag == "span" and self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if "tok" not in self.stack:
            return
        key = "tip" if "tip" in self.stack else "text"
        self.tokens[-1][key] += data


def _token_spans(page: str) -> list[dict]:
    p = _Tokens()
    p.feed(page)
    return p.tokens


def _assert_self_contained(page: str) -> None:
    assert not re.search(r"https?://", page), "the page refers to the network"
    assert "<link" not in page and "@import" not in page
    for attr, value in re.findall(r'\b(src|href)\s*=\s*["\']([^"\']*)', page):
        assert value.startswith("data:" if attr == "src" else "#"), f"external {attr}: {value[:60]}"
    assert not re.search(r"url\((?!\s*['\"]?data:)", page)


def _num_cells(page: str) -> list[str]:
    cells = re.findall(r'<td class="num">(.*?)</td>', page, flags=re.S)
    out = []
    for c in cells:
        out += [x.strip() for x in re.sub(r"<[^>]+>", "", c).split(",")]
    return out


# --------------------------------------------------------------------------------------- loss view
def test_loss_colours_follow_the_loss():
    assert loss_color(0.0) == "rgb(255,255,255)"
    assert loss_color(SATURATION) == loss_color(12.0) == "rgb(255,0,0)"
    assert loss_color(SATURATION / 2) in ("rgb(255,127,127)", "rgb(255,128,128)")
    greens = [int(loss_color(x).split(",")[1]) for x in (0.0, 1.0, 2.5, 4.0, 6.9, 7.0)]
    assert greens == sorted(greens, reverse=True)

    tokens = [TokenLoss(i, i, f"t{i}", f"t{i}", loss=l, prob=0.5, top=[(i, f"t{i}", 0.5)])
              for i, l in enumerate([0.0, 3.5, 7.0, 11.0])]
    tokens.append(TokenLoss(4, 4, "t4", "t4"))  # nothing predicts it
    spans = _token_spans(LossView(tokens, {"n_predicted": 4}).html)
    backgrounds = [re.search(r"background:([^;\"]+)", s["attrs"]["style"]).group(1) for s in spans]
    assert backgrounds[0] == "rgb(255,255,255)"
    assert backgrounds[2] == backgrounds[3] == "rgb(255,0,0)"
    assert backgrounds[1] == loss_color(3.5)
    assert "data-loss" not in spans[4]["attrs"] and backgrounds[4] != "rgb(255,255,255)"


def test_loss_view_numbers_and_tooltips_match_the_model(model_dirs):
    from qtoy_core import load_run

    model, tok, _ = load_run(model_dirs["2L"])
    view = loss_view(model, tok, TEXT)
    ids = tok.encode(TEXT)
    seq = torch.tensor([[tok.separator_id] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq)[0, :-1].float(), -1)
    expected = -logp.gather(1, torch.tensor(ids)[:, None])[:, 0]
    spans = _token_spans(view.html)
    assert len(spans) == len(ids) == len(view.tokens)
    for i, span in enumerate(spans):
        loss = float(span["attrs"]["data-loss"])
        assert loss == pytest.approx(float(expected[i]), abs=1e-3)
        assert f"background:{loss_color(view.tokens[i].loss)}" in span["attrs"]["style"]
        top_p, top_i = logp[i].exp().topk(5)
        tip = span["tip"]
        assert f"loss {view.tokens[i].loss:.3f} nats" in tip
        pos = 0
        for p, j in zip(top_p.tolist(), top_i.tolist()):  # the top 5, best first, with probabilities
            at = tip.find(visible(tok.decode([j])), pos)
            assert at >= 0, (i, tok.decode([j]), tip)
            assert (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}") in tip
            pos = at
    # the pieces shown tile the text: whitespace kept (newlines drawn as a marker before the break)
    shown = "".join(s["text"] for s in spans).replace("\u21b5", "")
    assert shown == TEXT


def test_loss_view_long_text_uses_windows(model_dirs):
    from qtoy_core import load_run

    model, tok, _ = load_run(model_dirs["1L"])
    text = " ".join([TEXT] * 6)
    view = loss_view(model, tok, text)
    assert len(view.tokens) > model.config.n_ctx and view.info["windows"] > 1
    assert all(t.loss is not None for t in view.tokens)
    assert "window" in view.html
    frag = view._repr_html_()  # notebooks: a scoped fragment with its own style and script
    assert frag.startswith("<style>") and "<html" not in frag and view._id in frag


def test_visualize_writes_one_self_contained_page(model_dirs, tmp_path, capsys):
    out = tmp_path / "loss.html"
    code, stdout, err = _cli(capsys, "visualize", model_dirs["1L"], "--text", TEXT, "--out", str(out))
    assert code == 0, err
    assert "mean loss" in stdout
    page = out.read_text(encoding="utf-8")
    _assert_self_contained(page)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    from qtoy_core.data import Tokenizer

    tok = Tokenizer.from_file(Path(model_dirs["1L"]) / "tokenizer.json")
    assert len(_token_spans(page)) == len(tok.encode(TEXT))
    src = tmp_path / "story.txt"
    src.write_text(TEXT, encoding="utf-8")
    code, _, err = _cli(capsys, "visualize", model_dirs["1L"], "--file", str(src), "--out", str(tmp_path / "b.html"))
    assert code == 0, err
    assert _token_spans((tmp_path / "b.html").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ report
@pytest.mark.parametrize("which", ["1L", "2L"])
def test_analyze_writes_html_and_json(which, model_dirs, tmp_path, capsys):
    html_path, json_path = tmp_path / "report.html", tmp_path / "report.json"
    code, _, err = _cli(capsys, "analyze", model_dirs[which], "--out", str(html_path), "--json", str(json_path),
                        "--top-k", "6")
    assert code == 0, err
    page = html_path.read_text(encoding="utf-8")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    _assert_self_contained(page)

    for key in ("model", "notes", "direct_path", "layers", "composition", "head_pairs", "timing_s", "meta"):
        assert key in data
    meta = data["meta"]
    assert meta["run"] == model_dirs[which] and meta["qtoy_version"] and meta["top_k"] == 6
    assert meta["model_config"]["model_type"] == ("attention_only_1L" if which == "1L" else "transformer_2L")
    assert len(data["direct_path"]["pairs"]) == 6
    n_layers = 1 if which == "1L" else 2
    assert len(data["layers"]) == n_layers
    for layer in data["layers"]:
        heads = layer["attention"]["heads"]
        assert len(heads) == 2
        for h in heads:
            assert len(h["qk"][0]["top_pairs"]["pairs"]) == 6 and len(h["ov"]["top_pairs"]["pairs"]) == 6
            assert h["qk"][0]["spectrum"]["eigenvalues"] and h["copying_score"] is not None
            assert h["qk"][0]["kernel"]["scores"]  # RoPE: the positional kernel
            assert h["qk"][0]["top_pairs"]["pairs"][0]["row_token"] is not None  # tokens decoded

    sections = ["direct-path"] + [f"layer-{i}-attention" for i in range(n_layers)]
    if which == "2L":
        sections += ["layer-0-mlp", "layer-1-mlp", "composition"]
        assert data["composition"] and data["head_pairs"]["k"]
        assert all(layer["mlp"]["outputs"][0]["directions"] for layer in data["layers"])
    else:
        assert not data["composition"] and 'id="composition"' not in page
    for s in sections:
        assert f'id="{s}"' in page, s
    assert page.count('src="data:image/png;base64,') >= (2 if which == "1L" else 7)  # spectra, kernel, MLP, heat maps

    # every number in the tables is a number of the JSON
    numbers = report_numbers(data)
    cells = _num_cells(page)
    assert len(cells) > 50
    missing = [c for c in cells if c != "n/a" and c not in numbers]
    assert not missing, missing[:10]


def test_report_without_tokenizer_and_untrained(tmp_path, capsys):
    """A model folder without tokenizer.json, straight from initialisation (zero OV circuits)."""
    folder = _save(_model("attention_only_1L", 3, randomize=False), tmp_path / "raw", None)
    code, _, err = _cli(capsys, "analyze", folder, "--out", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'class="tid">#' in page  # tokens shown by id
    data = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    numbers = report_numbers(data)
    assert all(c == "n/a" or c in numbers for c in _num_cells(page))


def _mixes():
    from qtoy_registry import get_registry

    reg = get_registry()
    attns, mlps = reg.names("attention"), [m for m in reg.names("mlp") if m != "none"]
    pos, norms = reg.names("positional"), reg.names("norm")
    out = []
    for i, attn in enumerate(attns):
        out.append(("attention_only_1L", attn, "none", pos[i % len(pos)], norms[i % len(norms)]))
    for i, mlp in enumerate(mlps):
        out.append(("transformer_2L", attns[i % len(attns)], mlp, pos[(i + 1) % len(pos)], norms[(i + 1) % len(norms)]))
    return out


@pytest.mark.parametrize("model_type, attn, mlp, pos, norm", _mixes())
def test_report_renders_any_component_mix(model_type, attn, mlp, pos, norm, tokenizer_json):
    from qtoy_core.data import Tokenizer

    model = _model(model_type, 5, attn=attn, mlp=mlp, positional=pos, norm=norm)
    report = Report.from_model(model, Tokenizer.from_file(tokenizer_json), top_k=3)
    page = report.html
    _assert_self_contained(page)
    json.loads(report.to_json())  # valid JSON, no NaN
    assert 'id="layer-0-attention"' in page
    numbers = report_numbers(report.data)
    assert all(c == "n/a" or c in numbers for c in _num_cells(page))
    for i, layer in enumerate(report.data["layers"]):
        if mlp != "none" and not layer["mlp"]:  # an MLP without weight views: a note in its place
            assert f'id="layer-{i}-mlp"' in page and "offers no bilinear weight views" in page
    assert report._repr_html_().startswith("<style>")


def test_report_notes_a_component_without_weight_views(tokenizer_json):
    """A layer whose attention has no weight views gets a note, not a crash."""
    from qtoy_core.analysis.report import render_report

    model = _model("transformer_1L", 6, mlp="bilinear")
    data = Report.from_model(model, None, top_k=3).data
    data["layers"][0]["attention"] = None
    page = render_report(data)
    assert "offers no weight views" in page and 'id="layer-0-mlp"' in page


# ------------------------------------------------------------------------------- loss view: excess
class UniformLogits(torch.nn.Module):
    """Logits all zero: every token's loss is exactly log(vocab), so its excess is log(vocab) - nats."""

    def __init__(self, vocab: int, n_ctx: int = 64):
        super().__init__()
        self.config = type("Config", (), {"n_ctx": n_ctx, "vocab_size": vocab})()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, mask=None):
        return torch.zeros(*tokens.shape, self.config.vocab_size)


class StoryCorpus:
    """A corpus that knows the nats of one text (as `SyntheticDataset.ground_truth(text)` does)."""

    def __init__(self, text, truth):
        self.text, self.truth = text, truth

    def ground_truth(self, text):
        from qtoy_core import DataError

        if text != self.text:
            raise DataError("ground truth is known only for the corpus' own stories.")
        return self.truth


def _constructed_truth(tok, text):
    """Ground truth whose excess under `UniformLogits` is planted: 0, +log V, -3, +log V - 1, ..."""
    import math

    ids = tok.encode(text)
    log_v = math.log(VOCAB)
    planted = [0.0, log_v, -3.0, log_v - 1.0, 2.0]
    excess = [planted[i % len(planted)] for i in range(len(ids))]
    labels = [("fixed", "free", "copyable")[i % 3] for i in range(len(ids))]
    return {"ids": list(ids), "labels": labels, "nats": [log_v - e for e in excess]}, excess


def test_excess_colours_tooltips_and_summary_on_a_constructed_case(tokenizer_json):
    from qtoy_core.data import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    text = "Pip met a sheep named Mo."
    truth, excess = _constructed_truth(tok, text)
    view = loss_view(UniformLogits(VOCAB), tok, text, color_by="excess", ground_truth=truth)
    spans = _token_spans(view.html)
    assert len(spans) == len(excess) >= 5
    for i, (span, e) in enumerate(zip(spans, excess)):
        assert float(span["attrs"]["data-excess"]) == pytest.approx(e, abs=1e-4)
        assert span["attrs"]["data-label"] == truth["labels"][i]
        assert f"background:{excess_color(e)}" in span["attrs"]["style"]
        assert truth["labels"][i] in span["tip"] and f"generator {truth['nats'][i]:.3f} nats" in span["tip"]
        assert f"excess {e:+.3f} nats" in span["tip"]
    # the planted values land on the scale: 0 white, +log V (5.7 nats) red, -3 blue, full at +-SATURATION
    assert excess_color(0.0) == "rgb(255,255,255)"
    assert excess_color(-3.0) == f"rgb({round(255 * (1 - 3 / SATURATION))},{round(255 * (1 - 3 / SATURATION))},255)"
    assert excess_color(SATURATION) == excess_color(20.0) == "rgb(255,0,0)"
    assert excess_color(-SATURATION) == "rgb(0,0,255)" and excess_color(None) == "rgb(230,230,230)"
    assert view.mean_excess == pytest.approx(sum(excess) / len(excess), abs=1e-5)
    assert f"mean excess {view.mean_excess:.3f} nats" in view.html
    assert "first character" in view.html  # the legend's caveat: a span's nats sit on its first token
    worst = view.worst(3, by="excess")
    assert [t.excess for t in worst] == pytest.approx(sorted(excess, reverse=True)[:3], abs=1e-5)
    doc = view.to_dict()
    assert doc["color_by"] == "excess" and doc["tokens"][2]["excess"] == pytest.approx(excess[2], abs=1e-5)

    # a corpus object is asked for the text's ground truth; the default mode still colours by loss
    corpus = StoryCorpus(text, truth)
    by_loss = loss_view(UniformLogits(VOCAB), tok, text, ground_truth=corpus)
    assert by_loss.color_by == "loss" and by_loss.excesses == pytest.approx(excess, abs=1e-5)
    for span, t in zip(_token_spans(by_loss.html), by_loss.tokens):
        assert f"background:{loss_color(t.loss)}" in span["attrs"]["style"] and "excess" in span["tip"]


def test_excess_without_ground_truth_is_one_clear_error(tokenizer_json):
    from qtoy_core import QtoyError
    from qtoy_core.data import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    model, text = UniformLogits(VOCAB), "Pip met a sheep named Mo."
    truth, _ = _constructed_truth(tok, text)
    with pytest.raises(LossViewInputError, match="ground_truth=dataset.ground_truth"):
        loss_view(model, tok, text, color_by="excess")
    with pytest.raises(LossViewInputError, match="offers no ground_truth"):
        loss_view(model, tok, text, color_by="excess", ground_truth=object())
    with pytest.raises(LossViewInputError, match="own stories"):  # the corpus does not know this text
        loss_view(model, tok, "Mo met Pip.", color_by="excess", ground_truth=StoryCorpus(text, truth))
    with pytest.raises(LossViewInputError, match="not this text"):  # another text's ground truth
        loss_view(model, tok, "Mo met Pip.", color_by="excess", ground_truth=truth)
    with pytest.raises(LossViewInputError, match="'loss', 'excess'"):
        loss_view(model, tok, text, color_by="entropy")
    assert issubclass(LossViewInputError, QtoyError)


def test_visualize_colours_a_synthetic_story_by_excess(tmp_path, capsys):
    from qtoy_core.run_files import load_run_dataset

    run = tmp_path / "run"
    code, _, err = _cli(capsys, "train", "--d-model", "16", "--n-head", "2", "--n-ctx", "32", "--batch-size", "4",
                        "--precision", "fp32", "--no-compile", "--quiet", "--max-iters", "1", "--eval-iters", "1",
                        "--out", str(run), "--set", "data.dataset.val_documents=8")
    assert code == 0, err
    out = tmp_path / "excess.html"
    code, stdout, err = _cli(capsys, "visualize", str(run), "--story", "3", "--color-by", "excess", "--out", str(out))
    assert code == 0, err
    assert "mean excess" in stdout
    _, dataset = load_run_dataset(run)
    truth = dataset.ground_truth(3)
    spans = _token_spans(out.read_text(encoding="utf-8"))
    assert len(spans) == len(truth["nats"])
    for span, nats, label in zip(spans, truth["nats"], truth["labels"]):
        loss, e = float(span["attrs"]["data-loss"]), float(span["attrs"]["data-excess"])
        assert e == pytest.approx(loss - nats, abs=2e-4) and span["attrs"]["data-label"] == label
    # the page is the Python view of the same story: same colours
    from qtoy_core import load_run

    model, _, _ = load_run(run)
    view = loss_view(model, dataset.tokenizer(), dataset.story(3).text, color_by="excess", ground_truth=truth)
    assert [s["attrs"]["style"] for s in spans] == [f"background:{excess_color(t.excess)}" for t in view.tokens]
    # excess needs a story of the corpus, not a free text
    code, _, err = _cli(capsys, "visualize", str(run), "--text", "hi", "--color-by", "excess", "--out", str(out))
    assert code == 2 and "--story N" in err and "Traceback" not in err


def test_visualize_story_on_a_corpus_without_ground_truth_is_one_clear_error(model_dirs, tmp_path, capsys):
    import shutil

    folder = tmp_path / "text-run"
    shutil.copytree(model_dirs["1L"], folder)
    code, _, err = _cli(capsys, "visualize", str(folder), "--story", "0", "--color-by", "excess",
                        "--out", str(tmp_path / "x.html"))
    assert code != 0 and "records no dataset" in err and "Traceback" not in err  # a saved model: corpus unknown
    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    doc = json.loads((folder / "config.json").read_text())
    doc["data"] = {"dataset": {"name": "text", "data_files": [str(corpus)]}}  # as a run trained on local files
    (folder / "config.json").write_text(json.dumps(doc))
    code, _, err = _cli(capsys, "visualize", str(folder), "--story", "0", "--color-by", "excess",
                        "--out", str(tmp_path / "x.html"))
    assert code != 0 and "'text' corpus" in err and "ground truth" in err and "Traceback" not in err
    assert not (tmp_path / "x.html").exists()


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("command", ["analyze", "visualize"])
def test_a_folder_that_is_not_a_run_is_one_clear_error(command, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    args = [command, str(tmp_path), "--out", str(tmp_path / "x.html")] + (["--text", "hi"] if command == "visualize" else [])
    code = "import sys; from qtoy_cli.main import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and "config.json" in err and "not a qtoy model or run" in err
    assert err.count("\n") == 0 and err.startswith("Error:"), err  # one paragraph, nothing before it
    assert not proc.stdout.strip()
    assert not (tmp_path / "x.html").exists()


def test_visualize_needs_text(model_dirs, tmp_path, capsys):
    code, _, err = _cli(capsys, "visualize", model_dirs["1L"], "--out", str(tmp_path / "x.html"))
    assert code == 2 and "--text" in err and "Traceback" not in err


def test_visualize_without_tokenizer_says_what_to_do(tmp_path, capsys):
    folder = _save(_model(), tmp_path / "m", None)
    code, _, err = _cli(capsys, "visualize", folder, "--text", "hi", "--out", str(tmp_path / "x.html"))
    assert code != 0 and "tokenizer.json" in err and "--tokenizer" in err and "Traceback" not in err


def test_format_number_is_what_the_tables_print():
    assert format_number(None) == "n/a" and format_number(3) == "3" and format_number(0.0) == "0"
    assert format_number(1.23456) == "1.235" and format_number(123456.0) == "1.235e+05"
    assert format_number(float("nan")) == "n/a"
