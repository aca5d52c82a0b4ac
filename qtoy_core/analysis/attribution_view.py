"""The attribution page: which parts and paths wrote one prediction's logit (offline HTML and JSON).

    from qtoy_core.analysis.attribution_view import attribution_view
    view = attribution_view(model, tokenizer, "Once upon a time, Zorblin ... Zorb", position=-1)
    view.data                         # JSON-able dict (what `qtoy attribute --json` writes)
    view.save("attr.html")            # the page; displays itself in a notebook

The prediction is the model's next-token logit at ``position`` (a token of the text, counted from
0; negative from the end) for ``target`` (a token id; default the model's top prediction there).
The page shows the text with that position marked, the target's logit, probability and rank, the
parts of `logit_attribution` (every part, largest |contribution| first; they sum to the logit) and,
for polynomial attention without norm, the largest path groups of `top_paths` over every head
(each head's groups sum to its part). Same look as the circuit report; numbers printed with
`qtoy_core.analysis.report.format_number`, each one a value of the JSON; no network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .attribution import AttributionError, logit_attribution, top_paths
from .loss_view import separator_token, visible
from .report import _CSS, _PAGE_CSS, _esc, _note, _section, _td, format_number

__all__ = ["ATTRIBUTION_FORMAT", "AttributionView", "attribution_data", "attribution_view", "render_attribution"]

ATTRIBUTION_FORMAT = "qtoy-attribution/1"


def _decode(tokenizer: Any, i: int) -> str | None:
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode([int(i)])
    except Exception:  # noqa: BLE001 - a page must not fail on one odd token
        return None


@torch.no_grad()
def attribution_data(model: Any, tokenizer: Any = None, text: str | None = None, *, tokens: Any = None,
                     position: int = -1, target: int | None = None, paths: bool | None = None,
                     top: int = 12, run: str | None = None, prepend_separator: bool = True) -> dict:
    """Everything the page shows, as a JSON-able dict. Give ``text`` (with a tokenizer) or ``tokens``.
    A text gets the tokenizer's separator put first (as documents are in training, and as the
    attention and loss views do; position 0 is then the separator), unless ``prepend_separator`` is
    False; ``tokens`` are taken as they are.

    paths: None (the path expansion when every head allows it, else a note), True (required: an
    `AttributionError` when a layer is not polynomial or has a norm in front), False (parts only)."""
    if tokens is None:
        if text is None or tokenizer is None:
            raise AttributionError("give the text and a tokenizer, or the token ids (tokens=...).")
        ids = tokenizer.encode(text)
        sep = separator_token(tokenizer) if prepend_separator and ids else None
        ids = ([sep] if sep is not None else []) + list(ids)
    else:
        ids = [int(t) for t in torch.as_tensor(tokens).flatten().tolist()]
    if not ids:
        raise AttributionError("the text encodes to no tokens: give a non-empty text.")
    n_ctx = int(getattr(model.config, "n_ctx", 0) or 0)
    if n_ctx and len(ids) > n_ctx and getattr(model.positional, "max_positions", None) is not None:
        raise AttributionError(f"the text has {len(ids)} tokens but this model reads at most n_ctx={n_ctx}: "
                               f"shorten the text.")
    toks = torch.tensor([ids])
    T = len(ids)
    if not -T <= int(position) < T:
        raise AttributionError(f"position {position} is out of range for a text of {T} tokens: use 0..{T - 1} "
                               f"(or -1 for the last token).")
    pos = int(position) % T
    logits = model(toks)[0, pos].float()
    probs = logits.softmax(-1)
    chosen = "given"
    if target is None:
        target, chosen = int(logits.argmax()), "the model's top prediction"
    attr = logit_attribution(model, toks, target=target, position=pos)
    values = attr.parts[:, 0]
    order = values.abs().argsort(descending=True).tolist()
    parts = [{"label": attr.labels[i], "kind": attr.kinds[i], "layer": attr.layers[i], "head": attr.heads[i],
              "value": float(values[i])} for i in order]
    path_info: dict[str, Any] = {"shown": False, "note": "", "top": []}
    if paths is not False:
        try:
            groups = top_paths(model, toks, target=target, position=pos, k=top,
                               layers=range(len(model.blocks)))
            path_info = {"shown": True, "top": [{"name": g.name, "layer": g.layer, "head": g.head, "v": g.v,
                                                 "q": list(g.q), "k": list(g.k), "value": float(g.value)}
                                                for g in groups],
                         "note": "each head's output split by the sources of its value, query and key inputs; "
                                 "a group sums the terms with the same value source and the same query and key "
                                 "sources (any factor); a head's groups sum to its part above"}
        except AttributionError as exc:
            if paths:
                raise
            path_info["note"] = f"no path expansion: {exc}"
    top_pred = probs.topk(min(5, probs.numel()))
    return {
        "format": ATTRIBUTION_FORMAT,
        "run": run,
        "tokens": [{"id": i, "text": _decode(tokenizer, i)} for i in ids],
        "position": pos,
        "current": {"id": ids[pos], "text": _decode(tokenizer, ids[pos])},
        "target": {"id": int(target), "text": _decode(tokenizer, int(target)), "chosen": chosen},
        "logit": float(attr.logits[0]),
        "probability": float(probs[target]),
        "rank": int((logits > logits[target]).sum()) + 1,
        "sum_of_parts": float(values.sum()),
        "approximate": bool(attr.approximate),
        "note": attr.note,
        "parts": parts,
        "paths": path_info,
        "top_predictions": [{"id": int(i), "text": _decode(tokenizer, int(i)), "probability": float(p)}
                            for p, i in zip(top_pred.values, top_pred.indices)],
    }


def _tok(t: dict) -> str:
    text = t.get("text")
    if text is None:
        return f'<span class="tid">#{_esc(t.get("id"))}</span>'
    return f'<code>{_esc(visible(text))}</code><span class="tid">{_esc(t.get("id"))}</span>'


_EXTRA_CSS = """
.qtoy-report .text{line-height:2;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:.92em}
.qtoy-report .text span.t{padding:1px 2px;border-radius:3px;white-space:pre}
.qtoy-report .text span.t.at{background:#2e6fbd;color:#fff}
.qtoy-report .bar{display:inline-block;height:.7em;vertical-align:middle;border-radius:2px}
.qtoy-report .bar.pos{background:#2e6fbd}.qtoy-report .bar.neg{background:#d35400}
"""


def _bar(value: float, biggest: float) -> str:
    width = 0 if biggest <= 0 else round(120 * abs(value) / biggest)
    return f'<td><span class="bar {"pos" if value >= 0 else "neg"}" style="width:{width}px"></span></td>'


def render_attribution(data: dict, *, title: str | None = None) -> str:
    """The attribution dict (`attribution_data`) as one self-contained HTML page."""
    run = data.get("run")
    title = title or ("Logit attribution" + (f": {Path(str(run)).name}" if run else ""))
    pos = data.get("position")
    spans = []
    for i, t in enumerate(data.get("tokens") or []):
        cls = "t at" if i == pos else "t"
        spans.append(f'<span class="{cls}" title="position {i}, token {_esc(t.get("id"))}">'
                     f'{_esc(visible(t.get("text")) if t.get("text") is not None else "#" + str(t.get("id")))}</span>')
    target, current = data.get("target") or {}, data.get("current") or {}
    card = [("position", pos), ("current token", None), ("target", None), ("chosen", target.get("chosen")),
            ("logit", data.get("logit")), ("probability", data.get("probability")), ("rank", data.get("rank")),
            ("sum of parts", data.get("sum_of_parts")), ("exact", not data.get("approximate"))]
    cells = []
    for k, v in card:
        if k == "current token":
            value = _tok(current)
        elif k == "target":
            value = _tok(target)
        else:
            value = _esc(format_number(v) if isinstance(v, (int, float)) else v)
        cells.append(f'<div class="kv"><span class="k">{_esc(k)}</span><span class="v">{value}</span></div>')
    head = (f'<header><h1>{_esc(title)}</h1><div class="sub">{"run <code>" + _esc(run) + "</code>" if run else ""}'
            f'</div><div class="card model">{"".join(cells)}</div></header>')
    text = _section("text", "The prediction", f'<p class="lead">The model\u2019s next-token logit for the target '
                    f'at the marked token (hover a token for its position).</p><div class="text">{"".join(spans)}</div>'
                    + _top_predictions(data))
    parts = data.get("parts") or []
    biggest = max((abs(p["value"]) for p in parts), default=0.0)
    rows = "".join(
        f'<tr><th scope="row">{i + 1}</th><td>{_esc(p["label"])}</td><td class="muted">{_esc(p["kind"])}</td>'
        f'{_td(p["value"])}{_bar(p["value"], biggest)}</tr>' for i, p in enumerate(parts))
    note_cls = "note warn" if data.get("approximate") else "note"
    parts_html = _section("parts", "Parts of the residual stream", _note(data.get("note") or "", note_cls) +
                          '<table class="pairs"><thead><tr><th></th><th>part</th><th>kind</th><th>logit contribution'
                          f'</th><th></th></tr></thead><tbody>{rows}</tbody></table>')
    info = data.get("paths") or {}
    if info.get("shown"):
        groups = info.get("top") or []
        big = max((abs(g["value"]) for g in groups), default=0.0)
        prow = "".join(
            f'<tr><th scope="row">{i + 1}</th><td>{_esc(g["name"])}</td><td>L{_esc(g["layer"])}H{_esc(g["head"])}</td>'
            f'<td>{_esc(g["v"])}</td><td>{_esc(" + ".join(g["q"]))}</td><td>{_esc(" + ".join(g["k"]))}</td>'
            f'{_td(g["value"])}{_bar(g["value"], big)}</tr>' for i, g in enumerate(groups))
        paths_html = _section("paths", "Largest paths", f'<p class="lead">{_esc(info.get("note"))}.</p>'
                              '<table class="pairs"><thead><tr><th></th><th>path</th><th>head</th><th>V source</th>'
                              '<th>Q sources</th><th>K sources</th><th>logit contribution</th><th></th></tr></thead>'
                              f'<tbody>{prow}</tbody></table>')
    else:
        paths_html = _section("paths", "Paths", _note(info.get("note") or "paths not requested", "note warn"))
    page = (f'<div class="qtoy-report">{head}{text}{parts_html}{paths_html}'
            f'<footer>Generated by qtoy ({_esc(ATTRIBUTION_FORMAT)}).</footer></div>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_esc(title)}</title><style>{_PAGE_CSS}{_CSS}{_EXTRA_CSS}</style></head><body>{page}</body></html>\n')


def _top_predictions(data: dict) -> str:
    preds = data.get("top_predictions") or []
    if not preds:
        return ""
    rows = "".join(f'<tr><th scope="row">{i + 1}</th><td class="tok">{_tok(p)}</td>{_td(p.get("probability"))}</tr>'
                   for i, p in enumerate(preds))
    return ('<h3>Top predictions there</h3><table class="small-table"><thead><tr><th></th><th>token</th>'
            f'<th>probability</th></tr></thead><tbody>{rows}</tbody></table>')


class AttributionView:
    """``data`` (JSON-able) and ``html``; displays itself in a notebook."""

    def __init__(self, data: dict, *, title: str | None = None):
        self.data = data
        self.title = title

    @property
    def html(self) -> str:
        return render_attribution(self.data, title=self.title)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.data, indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.html, encoding="utf-8")
        return p

    def _repr_html_(self) -> str:
        page = self.html
        body = page[page.index("<body>") + len("<body>"):page.index("</body>")]
        return f"<style>{_CSS}{_EXTRA_CSS}</style>{body}"


def attribution_view(model: Any, tokenizer: Any = None, text: str | None = None, **kwargs: Any) -> AttributionView:
    """`attribution_data(model, tokenizer, text, **kwargs)` as a view."""
    title = kwargs.pop("title", None)
    return AttributionView(attribution_data(model, tokenizer, text, **kwargs), title=title)
