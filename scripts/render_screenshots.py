#!/usr/bin/env python
"""Regenerate docs/screenshots/*.png: the circuit report and the per-token loss view, rendered by
headless Chromium from models trained briefly on the default (offline) synthetic data.

    python scripts/render_screenshots.py                      # trains two small runs (~10-20 min on 2 cores)
    python scripts/render_screenshots.py --run runs/a --run-2l runs/b   # reuse runs

Needs Chromium (Debian: `apt-get install -y chromium`). The 1-layer run is `qtoy train --max-iters 300`
(the default quadratic attention-only model); the 2-layer run is a small quadratic transformer with
bilinear MLPs, for the composition and MLP sections. What it writes:

    report.png          top of the 1-layer report: model, direct path, head summary, spectra, kernel
    report-heads.png    the same report's per-head QK / OV tables
    report-2L.png       the 2-layer report's composition heat maps and an MLP's eigenvectors
    loss.png            the loss view of a validation story, one token's tooltip pinned
    attention.png       the attention viewer (`qtoy attention`) of a 2-layer attention-only run, a token
                        hovered with Playwright (pip install playwright; it drives the same Chromium)
    report-behaviour.png  that run's report section "Heads scored on behaviour"
    attribution.png     `qtoy attribute` on that run: the answer of a repeated made-up name

For the attention viewer and the attribution, pass the induction run of docs/analysis.md ("A
circuit, tested") as --run-2l-attn: the hovered token is the second occurrence of a name, in the
layer-1 head the behaviour detectors score highest for induction.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a made-up name, then the first piece of its second occurrence (" P"): an induction head attends to the
# piece after the first " P" ("r") and the model predicts it
ATTENTION_TEXT = "Once upon a time, a little fox named Prulvoox lived in a den near the river. One morning, P"
MAX_BYTES = 1_000_000
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--virtual-time-budget=4000"]


def qtoy(*args: str) -> None:
    cmd = [sys.executable, "-c", "from qtoy_cli.main import main; main()", *args]
    print("$ qtoy", " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def train(out: Path, *args: str) -> Path:
    if (out / "model.safetensors").exists():
        print(f"reusing {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    qtoy("train", "--quiet", "--out", str(out), *args)
    return out


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("Chromium is not installed: `apt-get install -y chromium` (Debian/Ubuntu), then run this again.")


def screenshot(html: Path, png: Path, *, size: tuple[int, int], css: str = "", fragment: str = "") -> None:
    """Render `html` (with extra `css` injected) at `size` and save a PNG (palette-reduced if > 1 MB)."""
    page = html.read_text(encoding="utf-8")
    if css:
        page = page.replace("</head>", f"<style>{css}</style></head>", 1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / html.name
        src.write_text(page, encoding="utf-8")
        raw = Path(tmp) / "shot.png"
        # Chromium may leave images at the bottom edge of the window half painted: render taller, crop.
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}", f"--screenshot={raw}",
               f"--window-size={size[0]},{size[1] + 400}", src.as_uri() + fragment]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
        shrink(raw, png, size)
    print(f"{png}  {png.stat().st_size // 1024} KB")


def shrink(src: Path, dst: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    img = Image.open(src).convert("RGB").crop((0, 0, *size))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    if buf.tell() > MAX_BYTES:
        buf = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())


def hover_screenshot(html: Path, png: Path, *, size: tuple[int, int], hover: str, click: str | None = None) -> None:
    """Open `html` in Chromium through Playwright, click `click` (a CSS selector) if given, hover
    `hover`, and save the viewport as a PNG: a real hover state, which a plain --screenshot cannot show."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("Playwright is not installed: `pip install playwright` (it uses the system Chromium), then run this again.")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.goto(html.resolve().as_uri())
            if click:
                page.click(click)
            page.hover(hover)
            raw = Path(tmp) / "shot.png"
            page.screenshot(path=str(raw))
        finally:
            browser.close()
        shrink(raw, png, size)
    print(f"{png}  {png.stat().st_size // 1024} KB")


def only(ids: list[str], *, header: bool = True) -> str:
    """CSS that hides every part of the report but the sections `ids` (and the header)."""
    keep = ",".join(f"#{i}" for i in ids) + (",header" if header else "")
    return f".qtoy-report > :not({keep}){{display:none!important}}"


def story(run: Path, chars: int = 900) -> str:
    import json

    from qtoy_core.data import build_dataset
    from qtoy_core.data.config import DataConfig

    doc = json.loads((run / "config.json").read_text(encoding="utf-8"))
    data = DataConfig.model_validate(doc.get("data", {}))
    text = next(iter(build_dataset(data.dataset).documents("validation")))
    cut = text.rfind(". ", 0, chars)
    return text[: cut + 1 if cut > 0 else chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a 1-layer run to use (default: train one)")
    ap.add_argument("--run-2l", type=Path, help="a 2-layer transformer run to use (default: train one)")
    ap.add_argument("--run-2l-attn", type=Path, help="a 2-layer attention-only run for the attention viewer "
                    "(default: train one)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qtoy-screenshots",
                    help="where runs and HTML files go")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--max-iters", type=int, default=300)
    ap.add_argument("--only", choices=["all", "attention"], default="all",
                    help="attention: only attention.png and report-behaviour.png (needs only --run-2l-attn)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    chromium()

    out = args.out
    run3 = args.run_2l_attn or train(args.work / "run-2L-attn", "--model-type", "attention_only_2L", "--attn", "quadratic",
                                     "--d-model", "64", "--n-head", "4", "--n-ctx", "64", "--max-iters",
                                     str(args.max_iters), "--no-compile", "--precision", "fp32")
    attention_shots(run3, args.work, out)
    if args.only == "attention":
        return

    run1 = args.run or train(args.work / "run-1L", "--max-iters", str(args.max_iters))
    run2 = args.run_2l or train(args.work / "run-2L", "--model-type", "transformer_2L", "--attn", "quadratic",
                                "--mlp", "bilinear", "--d-model", "64", "--n-head", "4", "--n-ctx", "64",
                                "--max-iters", str(args.max_iters), "--no-compile", "--precision", "fp32")

    report1, report2, loss = args.work / "report.html", args.work / "report-2L.html", args.work / "loss.html"
    qtoy("analyze", str(run1), "--out", str(report1), "--json", str(args.work / "report.json"), "--top-k", "8")
    qtoy("analyze", str(run2), "--out", str(report2), "--json", str(args.work / "report-2L.json"), "--top-k", "6")
    text_file = args.work / "story.txt"
    text_file.write_text(story(Path(run1)), encoding="utf-8")
    qtoy("visualize", str(run1), "--file", str(text_file), "--out", str(loss))

    # pin the tooltip of a high-loss token in the first lines (a repeated name piece if possible)
    page = loss.read_text(encoding="utf-8")
    spans = re.findall(r'data-pos="(\d+)" data-loss="([\d.]+)"', page)
    early = [(int(p), float(l)) for p, l in spans if 12 <= int(p) <= 60]
    pin = max(early, key=lambda x: x[1])[0] if early else 0

    screenshot(report1, out / "report.png", size=(1200, 1600))
    screenshot(report1, out / "report-heads.png", size=(1200, 1250),
               css=only(["layer-0-attention"], header=False) + "#layer-0-attention > :not(.heads){display:none}")
    screenshot(report2, out / "report-2L.png", size=(1200, 1600),  # composition first, then an MLP
               css=only(["composition", "layer-1-mlp"], header=False)
               + ".qtoy-report{display:flex;flex-direction:column} #composition{order:-1}")
    screenshot(loss, out / "loss.png", size=(1200, 900), fragment=f"#pin={pin}")


def induction_head(run: Path) -> tuple[int, int]:
    """(layer, head) of the layer-1+ head with the largest behaviour-based induction score."""
    from qtoy_core.analysis import head_detectors
    from qtoy_core.model import ToyTransformer

    det = head_detectors(ToyTransformer.from_pretrained(run).eval())
    return next((l, h) for l, h, _ in det.top("induction", n=det.scores["induction"].numel()) if l >= 1)


def attention_shots(run3: Path, work: Path, out: Path) -> None:
    # the attention viewer: a repeated name, hovered on its second occurrence, in the induction head
    attention, report3, attribution = work / "attention.html", work / "report-2L-attn.html", work / "attribution.html"
    qtoy("attention", str(run3), "--text", ATTENTION_TEXT, "--out", str(attention))
    qtoy("analyze", str(run3), "--out", str(report3), "--top-k", "6", "--attention-text", ATTENTION_TEXT)
    page = attention.read_text(encoding="utf-8")
    n_tok = len(re.findall(r'class="tok" tabindex', page))
    layer, head = induction_head(run3)
    hover_screenshot(attention, out / "attention.png", size=(1200, 760),
                     click=f'.head[data-layer="{layer}"][data-head="{head}"]', hover=f'.tok[data-pos="{n_tok - 1}"]')
    screenshot(report3, out / "report-behaviour.png", size=(1200, 1150), css=only(["behaviour"], header=False))
    # the exact attribution of the name's next piece after its second occurrence's first piece
    qtoy("attribute", str(run3), "--text", ATTENTION_TEXT, "--target", "r", "--out", str(attribution))
    screenshot(attribution, out / "attribution.png", size=(1200, 1100))


if __name__ == "__main__":
    main()
