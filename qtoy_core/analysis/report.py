"""The circuit report: `analyze_model`'s dict as one self-contained HTML page (and as JSON).

    from qtoy_core.analysis.report import build_report, render_report, Report
    report = Report.from_model(model, tokenizer, top_k=10, run="runs/x")   # displays in a notebook
    report.save("report.html", json_path="report.json")
    data = build_report(model, tokenizer)        # analyze_model(...) plus a "meta" section
    page = render_report(data)                   # HTML string

What the page shows, in order: the model; caveats (``notes``); the direct path's top bigrams; per
layer the attention heads (a summary table with copying scores, eigenvalue spectra in the complex
plane, the positional kernel of the top QK pairs, and per head its top QK and OV token pairs) and
the bilinear MLP's top eigenvectors along a few output tokens; for models with two or more layers
the Q/K/V composition scores as heat maps and the top head pairs; the heads scored on behaviour
(`behaviour_data`: detectors on repeated random sequences beside the weight-based scores, their
Spearman correlation, the induction loss); a link to the attention viewer when one was written
alongside (``attention_page``); the time each part took.

Numbers: every number in the page's tables is a value of the JSON, printed with `format_number`
(plots may show derived quantities such as moduli). Token texts are shown with whitespace spelled
out (``␣`` for a space, ``↵`` for a newline). Plots are matplotlib figures embedded as base64 PNG;
the page uses no network (inline CSS only).

Any registered component mix renders: a layer whose attention or MLP offers no weight views gets a
note where its circuits would be.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from .loss_view import visible

__all__ = ["REPORT_FORMAT", "Report", "build_report", "format_number", "render_report", "report_numbers"]

REPORT_FORMAT = "qtoy-circuit-report/1"

# Colours: OV / QK series, positive / negative bars.
_C_OV = "#c0392b"
_C_QK = "#2e6fbd"
_C_POS = "#2e6fbd"
_C_NEG = "#d35400"


# ------------------------------------------------------------------------------------ numbers
def format_number(x: Any) -> str:
    """How a number is printed in the report's tables (tests compare tables with the JSON this way)."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-3 <= a < 1e5:
        return f"{x:.4g}"
    return f"{x:.3e}"


def report_numbers(data: Any) -> set[str]:
    """Every number of a report dict, formatted with `format_number` (what a table cell may show)."""
    out: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out.add(format_number(x))

    walk(data)
    return out


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _td(x: Any) -> str:
    return f'<td class="num">{_esc(format_number(x))}</td>'


def _tok(text: str | None, tid: Any) -> str:
    """A token cell's content: its text (whitespace visible) and its id."""
    if text is None:
        return f'<span class="tid">#{_esc(tid)}</span>'
    return f'<code>{_esc(visible(text))}</code><span class="tid">{_esc(tid)}</span>'


def _label(text: str | None, tid: Any, width: int = 14) -> str:
    s = f"#{tid}" if text is None else visible(text)
    return s if len(s) <= width else s[: width - 1] + "\u2026"


def _get(d: Any, *keys: Any, default: Any = None) -> Any:
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return default
        if d is None:
            return default
    return d


# -------------------------------------------------------------------------------------- plots
def _grid_figure(rows: int, cols: int, cell_w: float, cell_h: float, *, left: float = 0.45, right: float = 0.15,
                 top: float = 0.55, bottom: float = 0.45, wspace: float = 0.45, hspace: float = 0.6,
                 extra_right: float = 0.0):
    """A figure of rows x cols axes with margins in inches (a fixed layout: much faster than the
    constrained layout engine, which dominated the report's time)."""
    from matplotlib.figure import Figure

    width = left + right + extra_right + cols * cell_w + (cols - 1) * wspace
    height = top + bottom + rows * cell_h + (rows - 1) * hspace
    fig = Figure(figsize=(width, height), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - (right + extra_right) / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wspace / cell_w, hspace=hspace / cell_h)
    return fig, axes


def _png(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _complex(eigs: Any) -> list[tuple[float, float]]:
    out = []
    for e in eigs or []:
        if isinstance(e, (list, tuple)) and len(e) == 2:
            re_, im = e
        else:
            re_, im = e, 0.0
        if re_ is None or im is None:
            continue
        out.append((float(re_), float(im)))
    return out


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


_DECADES = 3.0


def _log_radius(re_: float, im: float, scale: float) -> tuple[float, float]:
    """A point of the complex plane with its angle kept and its modulus on a log scale: the largest
    modulus ``scale`` at radius 1, ``scale / 10**_DECADES`` and below at the centre."""
    r = math.hypot(re_, im)
    if r <= 0:
        return 0.0, 0.0
    rr = max(0.0, 1.0 + math.log10(r / scale) / _DECADES)
    return rr * re_ / r, rr * im / r


def _spectra_plot(layer: int, heads: list[dict]) -> str:
    """Per head: the top eigenvalues of the OV and QK circuits in the complex plane, scaled so the
    largest modulus is 1 (the copying score is how far right the OV eigenvalues sit)."""
    rows, cols = _grid(len(heads))
    fig, axes = _grid_figure(rows, cols, 2.1, 2.1, left=0.35, top=0.3, wspace=0.35, hspace=0.55)
    for ax in axes.flat[len(heads):]:
        ax.set_axis_off()
    import numpy as np

    t = np.linspace(0, 2 * np.pi, 200)
    for ax, h in zip(axes.flat, heads):
        ax.plot(np.cos(t), np.sin(t), color="#ccc", lw=0.8)
        ax.axhline(0, color="#ddd", lw=0.6)
        ax.axvline(0, color="#ddd", lw=0.6)
        series = [("OV", _get(h, "ov", "spectrum", "eigenvalues"), _C_OV, "o")]
        for f, qk in enumerate(h.get("qk") or []):
            series.append((f"QK{f if len(h['qk']) > 1 else ''}", _get(qk, "spectrum", "eigenvalues"),
                           _C_QK if f == 0 else "#16a085", "^" if f == 0 else "s"))
        for name, eigs, color, marker in series:
            pts = _complex(eigs)
            scale = max((math.hypot(a, b) for a, b in pts), default=0.0)
            if scale > 0:
                xy = [_log_radius(a, b, scale) for a, b in pts]
                ax.scatter([x for x, _ in xy], [y for _, y in xy], s=18, color=color,
                           marker=marker, alpha=0.8, label=name, linewidths=0)
        ax.set_xlim(-1.15, 1.15)
        ax.set_ylim(-1.15, 1.15)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        cs = h.get("copying_score")
        ax.set_title(f"head {layer}.{h.get('head')}  copying {format_number(cs)}", fontsize=9)
        ax.legend(fontsize=7, loc="lower left", frameon=False, handletextpad=0.1)
    return _png(fig, f"layer {layer} eigenvalue spectra")


def _kernel_plot(layer: int, heads: list[dict], n_pairs: int = 5) -> str | None:
    """Per head: the attention score of its top QK pairs against the query-key offset."""
    kernels = [(h, _get(h, "qk", 0, "kernel")) for h in heads]
    if not any(k for _, k in kernels):
        return None
    rows, cols = _grid(len(heads))
    fig, axes = _grid_figure(rows, cols, 2.35, 1.75, left=0.55, top=0.3, bottom=0.5, hspace=0.75)
    for ax in axes.flat[len(heads):]:
        ax.set_axis_off()
    squared = False
    for ax, (h, k) in zip(axes.flat, kernels):
        ax.tick_params(labelsize=7)
        ax.set_title(f"head {layer}.{h.get('head')}", fontsize=9)
        if not k:
            ax.text(0.5, 0.5, "no kernel", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            continue
        squared = squared or bool(k.get("score_is_squared"))
        offsets = k.get("offsets") or []
        toks = k.get("pair_tokens") or [None] * len(k.get("pairs") or [])
        for i, (pair, scores) in enumerate(zip(k.get("pairs") or [], k.get("scores") or [])):
            if i >= n_pairs:
                break
            names = toks[i] if i < len(toks) and toks[i] else (None, None)
            label = f"{_label(names[0], pair[0], 9)}\u2192{_label(names[1], pair[1], 9)}"
            ys = [float("nan") if v is None else v for v in scores]
            ax.plot(offsets[: len(ys)], ys, lw=0.9, label=label)
        ax.set_xlabel("query \u2212 key offset", fontsize=7)
        ax.legend(fontsize=6, frameon=False, loc="upper right")
    axes[0, 0].set_ylabel("score = form\u00b2" if squared else "score", fontsize=7)
    return _png(fig, f"layer {layer} positional kernel")


def _profile_plot(layer: int, heads: list[dict]) -> str | None:
    profs = [(h, h.get("positional_profile")) for h in heads]
    if not any(p for _, p in profs):
        return None
    fig, axes = _grid_figure(1, 1, 6.8, 1.9, left=0.7, bottom=0.5, top=0.4)
    ax = axes[0, 0]
    for h, p in profs:
        if p:
            ax.plot(range(len(p)), [float("nan") if v is None else v for v in p], lw=1, label=f"head {layer}.{h.get('head')}")
    ax.set_xlabel("query \u2212 key offset", fontsize=8)
    ax.set_ylabel("mean W_pos QK score", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(f"Layer {layer}: learned positions, mean QK score by offset", fontsize=10)
    return _png(fig, f"layer {layer} positional profile")


def _mlp_plot(layer: int, outputs: list[dict], n: int = 16) -> str | None:
    if not outputs:
        return None
    rows, cols = _grid(len(outputs), 3)
    fig, axes = _grid_figure(rows, cols, 2.8, 1.7, left=0.5, bottom=0.5, top=0.3, hspace=0.8)
    for ax in axes.flat[len(outputs):]:
        ax.set_axis_off()
    for ax, out in zip(axes.flat, outputs):
        ev = [v for v in (out.get("eigenvalues") or []) if v is not None]
        ev = [v[0] if isinstance(v, (list, tuple)) else v for v in ev][:n]
        ax.bar(range(1, len(ev) + 1), ev, color=[_C_POS if v >= 0 else _C_NEG for v in ev], width=0.8)
        ax.axhline(0, color="#999", lw=0.6)
        ax.tick_params(labelsize=7)
        tok = out.get("output_token")
        ax.set_title(_short(out.get("output") or f"token {tok}", 40), fontsize=8)
        ax.set_xlabel("eigenvector (by |eigenvalue|)", fontsize=7)
    return _png(fig, f"layer {layer} MLP eigenvalues")


def _short(s: str, n: int) -> str:
    s = str(s).replace("\n", "\u21b5")
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def _composition_plot(comp: dict, n_factors: int) -> str:
    import numpy as np

    panels = []
    for kind in ("q", "k"):
        mats = comp.get(kind) or []
        for f, m in enumerate(mats):
            name = kind.upper() + (f" (QK pair {f})" if len(mats) > 1 else "")
            panels.append((name, kind, m))
    panels.append(("V", "v", comp.get("v") or []))
    base = comp.get("baseline") or {}
    vmax = max([float(np.nanmax(np.array(m, dtype=float))) for _, _, m in panels if m] +
               [2 * v for v in base.values() if isinstance(v, (int, float))] + [1e-6])
    fig, axes = _grid_figure(1, len(panels), 2.3, 2.1, left=0.55, bottom=0.5, top=0.4, wspace=0.7,
                             extra_right=0.7)
    axes = axes[0]
    im = None
    lf, lt = comp.get("layer_from"), comp.get("layer_to")
    for ax, (name, kind, m) in zip(axes, panels):
        a = np.array([[float("nan") if v is None else v for v in row] for row in m], dtype=float)
        if a.size == 0:
            ax.set_axis_off()
            continue
        im = ax.imshow(a, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                if a.size <= 64 and np.isfinite(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if a[i, j] < 0.6 * vmax else "black")
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
        ax.tick_params(labelsize=7)
        ax.set_xlabel(f"layer {lt} head (reads)", fontsize=8)
        ax.set_ylabel(f"layer {lf} head (writes)", fontsize=8)
        b = base.get(kind)
        ax.set_title(f"{name}-composition (random: {format_number(b)})", fontsize=9)
    if im is not None:
        w, h = fig.get_size_inches()
        cax = fig.add_axes([1 - 0.62 / w, 0.5 / h, 0.14 / w, 1 - 0.9 / h])
        fig.colorbar(im, cax=cax)
        cax.tick_params(labelsize=7)
    return _png(fig, f"composition {lf} to {lt}")


# ------------------------------------------------------------------------------------ sections
def _pairs_table(tp: dict | None, *, kind: str) -> str:
    """A TopPairs dict as a table. kind: 'direct', 'qk' or 'ov'."""
    if not tp or not tp.get("pairs"):
        return '<p class="muted">no pairs</p>'
    pairs = tp["pairs"]
    has_score = any(p.get("score") is not None for p in pairs)
    has_other = any(p.get("other_factor") is not None for p in pairs)
    if kind == "qk":
        head = ["query token", "key token", "form"] + (["other form"] if has_other else []) + \
            (["score" + (" = form\u00b2" if tp.get("score_is_squared") else "")] if has_score else [])
    elif kind == "ov":
        head = ["source token", "output logit", "value"]
    else:
        has_logit = any(p.get("logit") is not None for p in pairs)
        ranked = str(tp.get("ranked_by") or "logit")
        head = ["current token", "next token", "centred logit" if "centred" in ranked else "logit"] + \
            (["raw logit"] if has_logit else [])
    rows = []
    for i, p in enumerate(pairs):
        cells = [f'<td class="tok">{_tok(p.get("row_token"), p.get("row"))}</td>',
                 f'<td class="tok">{_tok(p.get("col_token"), p.get("col"))}</td>', _td(p.get("value"))]
        if kind == "direct" and has_logit:
            cells.append(_td(p.get("logit")))
        if kind == "qk":
            if has_other:
                cells.append(_td(p.get("other_factor")))
            if has_score:
                cells.append(_td(p.get("score")))
        rows.append(f'<tr><th scope="row">{i + 1}</th>{"".join(cells)}</tr>')
    foot = ""
    if tp.get("exact") is False:
        foot = (f'<div class="muted small">searched the {_esc(tp.get("searched_rows"))} \u00d7 '
                f'{_esc(tp.get("searched_cols"))} strongest rows/columns; not certified exact</div>')
    return (f'<table class="pairs"><thead><tr><th></th>{"".join(f"<th>{_esc(h)}</th>" for h in head)}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>{foot}')


def _section(id_: str, title: str, body: str, level: int = 2) -> str:
    return f'<section id="{_esc(id_)}"><h{level}>{_esc(title)}</h{level}>{body}</section>'


def _note(text: str, cls: str = "note") -> str:
    return f'<div class="{cls}">{_esc(text)}</div>'


def _model_card(data: dict) -> str:
    m = data.get("model") or {}
    meta = data.get("meta") or {}
    cfg = meta.get("model_config") or {}
    rows = [("model type", cfg.get("model_type")), ("attention", m.get("attention")), ("MLP", m.get("mlp")),
            ("positional", m.get("positional")), ("norm", m.get("norm")), ("layers", m.get("n_layers")),
            ("heads", m.get("n_head")), ("d_model", m.get("d_model")), ("d_head", m.get("d_head")),
            ("vocab", m.get("vocab_size")), ("n_ctx", m.get("n_ctx")), ("tied embeddings", m.get("tie_embeddings"))]
    cells = []
    for k, v in rows:
        if v is None:
            continue
        value = format_number(v) if isinstance(v, (int, float)) else str(v)
        cells.append(f'<div class="kv"><span class="k">{_esc(k)}</span><span class="v">{_esc(value)}</span></div>')
    return f'<div class="card model">{"".join(cells)}</div>'


def _direct_path(data: dict) -> str:
    dp = data.get("direct_path")
    if not dp:
        return _section("direct-path", "Direct path", _note("no direct path in this report"))
    body = (f'<p class="lead">{_esc(dp.get("note") or "W_E W_U")}. Largest entries: the bigrams the embedding '
            f'and unembedding alone predict, without any attention (ranked by '
            f'{_esc(dp.get("ranked_by") or "value")}).</p>' + _pairs_table(dp, kind="direct"))
    return _section("direct-path", "Direct path: top bigrams", body)


def _head_summary(layer: int, heads: list[dict], squared: bool = False) -> str:
    from .circuits import DOMINANT_EIGENVALUE_SHARE as DOMINANT_SHARE

    n_f = max((len(h.get("qk") or []) for h in heads), default=0)
    qk_cols = "".join(f"<th>QK{f if n_f > 1 else ''} copying score</th><th>QK{f if n_f > 1 else ''} "
                      f"top eigenvalue (re, im)</th>" for f in range(n_f))
    rows = []
    for h in heads:
        flag = ('<span class="pill" title="the top eigenvalue has at least half of \u03a3|\u03bb|: it alone sets '
                'the copying score">one eigenvalue</span>' if h.get("ov_one_eigenvalue") else "")
        cells = [_td(h.get("copying_score")),
                 _td(_get(h, "ov", "spectrum", "top_share")),
                 _td(_get(h, "ov", "spectrum", "copying_score_rest"))]
        ov_top = _complex(_get(h, "ov", "spectrum", "eigenvalues"))[:1]
        cells += [_td(ov_top[0][0]) + _td(ov_top[0][1])] if ov_top else [_td(None) + _td(None)]
        for f in range(n_f):
            qk = _get(h, "qk", f) or {}
            top = _complex(_get(qk, "spectrum", "eigenvalues"))[:1]
            cells.append(_td(_get(qk, "spectrum", "copying_score")))
            cells.append(f'<td class="num">{_esc(format_number(top[0][0]))}, {_esc(format_number(top[0][1]))}</td>'
                         if top else _td(None))
        best = _get(h, "ov", "top_pairs", "pairs", 0)
        ov = (f'{_tok(best.get("row_token"), best.get("row"))} \u2192 {_tok(best.get("col_token"), best.get("col"))}'
              if best else "")
        rows.append(f'<tr><th scope="row"><a href="#head-{layer}-{h.get("head")}">{layer}.{_esc(h.get("head"))}</a>'
                    f'{flag}</th>{"".join(cells)}<td class="tok">{ov}</td></tr>')
    return ('<table class="summary"><thead><tr><th>head</th><th>OV copying score</th><th>OV top |\u03bb| share</th>'
            '<th>OV copying without top \u03bb</th><th>OV top eigenvalue re</th>'
            f'<th>OV top eigenvalue im</th>{qk_cols}<th>strongest OV pair</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>'
            '<div class="muted small">copying score = \u03a3 Re(\u03bb) / \u03a3 |\u03bb| over the eigenvalues of the '
            'circuit. OV: +1 means attending to a token raises that same token\u2019s logit. QK: +1 means a token\u2019s '
            'query matches its own key best' + (' (quadratic attention squares the form, so \u22121 attends to itself '
            'just as strongly)' if squared else '') + '. Top |\u03bb| share = |\u03bb\u2081| / \u03a3 |\u03bb|; at '
            f'{DOMINANT_SHARE:g} or more (flag \u201cone eigenvalue\u201d) the top eigenvalue outweighs all the others '
            'together and alone sets the OV copying score, whose sign may differ from the rest\u2019s (next '
            'column; n/a when the rest is negligible).</div>')


def _head_card(layer: int, h: dict) -> str:
    parts = []
    for qk in h.get("qk") or []:
        tp = qk.get("top_pairs") or {}
        n_f = len(h.get("qk") or [])
        title = "QK circuit" + (f", pair {qk.get('factor')}" if n_f > 1 else "")
        scale = qk.get("scale")
        parts.append(f'<h4>{_esc(title)} <span class="muted small">query \u00d7 key, offset 0, scale '
                     f'{_esc(format_number(scale))}; ranked by {_esc(tp.get("ranked_by", ""))}</span></h4>'
                     + _pairs_table(tp, kind="qk"))
    ov = _get(h, "ov", "top_pairs")
    parts.append('<h4>OV circuit <span class="muted small">source token \u2192 logit it raises</span></h4>'
                 + _pairs_table(ov, kind="ov"))
    cs = h.get("copying_score")
    return (f'<div class="card head" id="head-{layer}-{_esc(h.get("head"))}"><h3>Head {layer}.{_esc(h.get("head"))}'
            f' <span class="pill">copying {_esc(format_number(cs))}</span></h3>{"".join(parts)}</div>')


def _attention_section(layer: int, entry: dict, data: dict, plots: bool) -> str:
    attn = entry.get("attention")
    kind = (data.get("model") or {}).get("attention") or "attention"
    if not attn:
        return _section(f"layer-{layer}-attention", f"Layer {layer} attention",
                        _note(f"blocks.{layer}.attn ({kind}) offers no weight views (weight_views()), so it has "
                              f"no QK/OV circuits in this report.", "note warn"), 2)
    heads = attn.get("heads") or []
    note = str(attn.get("note") or "")
    body = [f'<p class="lead"><b>{_esc(attn.get("type") or kind)}</b>' + (f' \u2014 {_esc(note[:1].upper() + note[1:])}'
                                                                       if note else "") + '</p>']
    if not heads:
        body.append(_note("no heads"))
    else:
        body.append(_head_summary(layer, heads, bool(attn.get("score_is_squared"))))
        if plots:
            body.append('<h3>Eigenvalue spectra</h3><p class="muted small">The top eigenvalues of each head\u2019s OV '
                        'circuit (\u25cf) and QK circuit (\u25b2) in the complex plane. Angles are exact; the radius is '
                        f'the log modulus, the largest at 1 and {_DECADES:g} decades down at the centre. OV eigenvalues '
                        'on the positive real axis mean copying.</p>' + _spectra_plot(layer, heads))
            kern = _kernel_plot(layer, heads)
            prof = _profile_plot(layer, heads)
            if kern or prof:
                body.append('<h3>Positional kernel</h3><p class="muted small">The attention score of the '
                            'heads\u2019 top QK token pairs (offset-0 ranking) when the query sits `offset` '
                            'positions after the key; every number is in the JSON under '
                            '<code>layers[i].attention.heads[h].qk[f].kernel</code>.</p>'
                            + (kern or "") + (prof or ""))
            else:
                pos = (data.get("model") or {}).get("positional")
                body.append('<h3>Positional kernel</h3>' + _note(
                    f"the positional encoding ({pos}) does not rotate queries and keys, so the QK circuit does "
                    f"not depend on the offset: no kernel."))
        body.append('<h3>Heads</h3><div class="heads">' + "".join(_head_card(layer, h) for h in heads) + "</div>")
    return _section(f"layer-{layer}-attention", f"Layer {layer} attention", "".join(body), 2)


def _mlp_section(layer: int, entry: dict, data: dict, plots: bool) -> str | None:
    mlp = entry.get("mlp")
    kind = (data.get("model") or {}).get("mlp")
    if not mlp:
        if kind in (None, "none"):
            return None
        return _section(f"layer-{layer}-mlp", f"Layer {layer} MLP",
                        _note(f"blocks.{layer}.mlp ({kind}) offers no bilinear weight views (W_l, W_r, W_out), so "
                              f"it has no eigendecomposition in this report.", "note warn"), 2)
    outputs = mlp.get("outputs") or []
    body = []
    body.append(f'<p class="lead">{_esc(mlp.get("type") or kind)}. Along an output direction u (here the '
                f'unembedding of the tokens this MLP writes to most) the MLP is exactly a quadratic form, '
                f'u \u00b7 mlp(x) = x\u1d40 Q_u x (biases left out). Its eigenvectors v, by |eigenvalue|, are read '
                f'through the embedding: the input tokens with the largest |W_E v|.</p>')
    if plots:
        img = _mlp_plot(layer, outputs)
        if img:
            body.append('<p class="muted small">Eigenvalues of Q_u, largest |\u03bb| first (blue: positive, '
                        'orange: negative).</p>' + img)
    for out in outputs:
        dirs = out.get("directions") or []
        tok = out.get("output_token")
        title = out.get("output") or f"token {tok}"
        head = "".join(f'<th colspan="2">v{i + 1}: \u03bb = {_esc(format_number(d.get("eigenvalue")))}</th>'
                       for i, d in enumerate(dirs))
        sub = "".join("<th>token</th><th>W_E v</th>" for _ in dirs)
        n = max((len(d.get("top_tokens") or []) for d in dirs), default=0)
        rows = []
        for r in range(n):
            cells = []
            for d in dirs:
                tt = d.get("top_tokens") or []
                if r < len(tt):
                    cells.append(f'<td class="tok">{_tok(tt[r].get("text"), tt[r].get("token"))}</td>'
                                 + _td(tt[r].get("projection")))
                else:
                    cells.append("<td></td><td></td>")
            rows.append(f'<tr><th scope="row">{r + 1}</th>{"".join(cells)}</tr>')
        body.append(f'<h4>{_esc(title)} <span class="muted small">trace {_esc(format_number(out.get("trace")))}'
                    f'</span></h4><div class="scroll"><table class="eig"><thead><tr><th></th>{head}</tr><tr><th></th>'
                    f'{sub}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
    return _section(f"layer-{layer}-mlp", f"Layer {layer} bilinear MLP: top eigenvectors", "".join(body), 2)


def _composition_section(data: dict, plots: bool) -> str | None:
    comps = data.get("composition") or []
    n_layers = (data.get("model") or {}).get("n_layers") or len(data.get("layers") or [])
    if not comps:
        if n_layers and n_layers > 1:
            return _section("composition", "Composition", _note(
                "no composition scores: composition needs attention circuits in two layers."))
        return None
    body = ['<p class="lead">How much each later head reads what an earlier head writes: ||W_OV W_QK|| / '
            '(||W_OV|| ||W_QK||) for Q-composition (the query side), the same with W_QK\u1d40 for '
            'K-composition (the key side) and with the later W_OV for V-composition. Random weights of these '
            'shapes score about the \u201crandom\u201d value in each title.</p>']
    for comp in comps:
        lf, lt = comp.get("layer_from"), comp.get("layer_to")
        n_f = len(comp.get("q") or [])
        if plots:
            body.append(f'<h3>Layer {_esc(lf)} \u2192 layer {_esc(lt)}</h3>' + _composition_plot(comp, n_f))
        base = comp.get("baseline") or {}
        body.append('<table class="small-table"><thead><tr><th>random baseline</th><th>Q</th><th>K</th><th>V</th>'
                    f'</tr></thead><tbody><tr><th scope="row">{_esc(lf)} \u2192 {_esc(lt)}</th>{_td(base.get("q"))}'
                    f'{_td(base.get("k"))}{_td(base.get("v"))}</tr></tbody></table>')
    pairs = data.get("head_pairs") or {}
    for kind, name in (("k", "K-composition (induction candidates)"), ("q", "Q-composition"), ("v", "V-composition")):
        ps = pairs.get(kind) or []
        if not ps:
            continue
        rows = []
        for i, p in enumerate(ps):
            rows.append(f'<tr><th scope="row">{i + 1}</th><td>{_esc(p.get("layer_from"))}.{_esc(p.get("head_from"))}'
                        f'</td><td>{_esc(p.get("layer_to"))}.{_esc(p.get("head_to"))}</td>{_td(p.get("score"))}'
                        f'{_td(p.get("baseline"))}{_td(p.get("copying_score_to"))}</tr>')
        body.append(f'<h3>Top head pairs: {_esc(name)}</h3><table class="pairs"><thead><tr><th></th>'
                    '<th>earlier head</th><th>later head</th><th>score</th><th>random</th>'
                    '<th>later head\u2019s OV copying</th></tr></thead>'
                    f'<tbody>{"".join(rows)}</tbody></table>')
    return _section("composition", "Composition between layers", "".join(body))


# ------------------------------------------------------------------- heads scored on behaviour
_KIND_NAMES = {"previous_token": "previous token", "duplicate_token": "duplicate token", "induction": "induction",
               "copying": "copying"}
_WEIGHT_SOURCES = {
    "previous_token": "positional pattern (learned W_pos forms; RoPE: averaged over token pairs)",
    "duplicate_token": "QK circuit copying score (|.| for quadratic; product of the two forms' for bilinear)",
    "induction": "largest K-composition with an earlier layer's head",
    "copying": "OV circuit copying score",
}


def _separator(tokenizer: Any) -> int | None:
    try:
        sep = getattr(tokenizer, "separator_id", None) if tokenizer is not None else None
    except Exception:  # noqa: BLE001 - separator_id raises when the tokenizer has none
        sep = None
    return None if sep is None else int(sep)


def behaviour_data(model: Any, tokenizer: Any = None, **kwargs: Any) -> dict:
    """The report's ``behaviour`` section: `qtoy_core.analysis.detectors.detectors_report` on repeated
    random sequences that start with the tokenizer's separator (as training documents do; never drawn
    otherwise), or None for a model without blocks."""
    from .detectors import detectors_report

    if not len(getattr(model, "blocks", [])):
        return None
    sep = _separator(tokenizer)
    kwargs.setdefault("bos", sep)
    return detectors_report(model, **kwargs)


def _loss_plot(il: dict) -> str | None:
    per = [float("nan") if v is None else v for v in il.get("per_position") or []]
    if not per:
        return None
    fig, axes = _grid_figure(1, 1, 6.8, 1.9, left=0.7, bottom=0.5, top=0.4)
    ax = axes[0, 0]
    ax.plot(range(len(per)), per, lw=1.2, color=_C_QK, marker="o", ms=2.5)
    start = il.get("second_half_start")
    if start is not None:
        ax.axvline(start - 0.5, color="#999", lw=0.8, ls="--")
    if il.get("uniform") is not None:
        ax.axhline(il["uniform"], color=_C_OV, lw=0.8, ls=":", label="ln(vocab)")
        ax.legend(fontsize=7, frameon=False)
    ax.set_xlabel("position of the prediction (dashed: second half)", fontsize=8)
    ax.set_ylabel("loss (nats)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("Loss on repeated random sequences", fontsize=10)
    return _png(fig, "induction loss per position")


def _behaviour_section(data: dict, plots: bool) -> str | None:
    beh = data.get("behaviour")
    if not beh:
        return None
    tok = beh.get("tokens") or {}
    kinds = list(_KIND_NAMES)
    body = [f'<p class="lead">Each head run on {_esc(tok.get("batch_size"))} repeated random sequences '
            f'({_esc(tok.get("subseq_len"))} random tokens, then the same again'
            + (f', after the separator #{_esc(tok.get("bos"))}' if tok.get("bos") is not None else "") +
            '), scored by what it does, beside the weight-based score of the same kind. Patterns here are not '
            'probability rows, so a detector scores the <b>share of the pattern’s |mass| on the target key</b> '
            'per query row (previous token: q−1; duplicate: an earlier copy of the current token; induction: '
            'the token after an earlier copy), averaged over rows with a target: 1 means all weight on the '
            'targets, and for softmax it is the mean attention probability. <i>signed</i> keeps the sign of the '
            'target weight (negative: a signed head subtracts the target’s value). Copying: where the '
            'attended tokens rank in the head’s output read through the unembedding, 2·percentile−1 '
            '(+1 top, 0 chance, −1 bottom), weighted by |pattern|.</p>']
    head = "".join(f'<th colspan="3">{_esc(_KIND_NAMES[k])}</th>' for k in kinds)
    sub = "".join("<th>behaviour</th><th>signed</th><th>weights</th>" for _ in kinds)
    rows = []
    for h in beh.get("heads") or []:
        cells = "".join(_td(h.get(k)) + _td(h.get(f"{k}_signed")) + _td(h.get(f"{k}_weights")) for k in kinds)
        rows.append(f'<tr><th scope="row">{_esc(h.get("layer"))}.{_esc(h.get("head"))}</th>{cells}</tr>')
    first = (beh.get("heads") or [{}])[0]
    chance = "".join(_td(first.get(f"{k}_uniform")) + "<td></td><td></td>" for k in kinds)
    body.append(f'<div class="scroll"><table class="behaviour"><thead><tr><th></th>{head}</tr><tr><th>head</th>{sub}'
                f'</tr></thead><tbody>{"".join(rows)}<tr class="muted"><th scope="row">uniform pattern '
                f'(head {_esc(first.get("layer"))}.{_esc(first.get("head"))})</th>{chance}</tr></tbody></table></div>')
    sp = beh.get("spearman") or {}
    srows = "".join(f'<tr><th scope="row">{_esc(_KIND_NAMES.get(k, k))}</th>{_td(v.get("spearman"))}'
                    f'{_td(v.get("n_heads"))}<td>{_esc(_WEIGHT_SOURCES.get(k, ""))}</td></tr>' for k, v in sp.items())
    body.append('<h3>Do the weights and the behaviour agree?</h3><p class="muted small">Spearman rank correlation '
                'between the behaviour score and the weight-based score of each kind, over the heads where both '
                'exist (n/a: fewer than 3 heads, or one score constant).</p>'
                '<table class="small-table"><thead><tr><th>kind</th><th>Spearman ρ</th><th>heads</th>'
                f'<th>weight-based score</th></tr></thead><tbody>{srows}</tbody></table>')
    il = beh.get("induction_loss") or {}
    if il:
        body.append('<h3>Induction loss</h3><table class="small-table"><thead><tr><th>second half (nats)</th>'
                    '<th>first half</th><th>ln(vocab)</th></tr></thead><tbody><tr>'
                    f'{_td(il.get("second_half_mean"))}{_td(il.get("first_half_mean"))}{_td(il.get("uniform"))}'
                    '</tr></tbody></table><p class="muted small">Loss predicting the second half’s tokens '
                    '2.. (the first cannot be inferred); an induction circuit brings it far below the first half. '
                    'Per position in the JSON: <code>behaviour.induction_loss.per_position</code>.</p>')
        if plots:
            img = _loss_plot(il)
            if img:
                body.append(img)
    for n in beh.get("notes") or []:
        body.append(_note(n, "note warn"))
    return _section("behaviour", "Heads scored on behaviour", "".join(body))


def _attention_page_section(data: dict) -> str | None:
    page = (data.get("meta") or {}).get("attention_page")
    if not page:
        return None
    return _section("attention-patterns", "Attention patterns", (
        f'<p class="lead">Every layer’s and head’s pattern on a text: <a href="{_esc(page)}">'
        f'{_esc(page)}</a> (written alongside this report by <code>qtoy analyze --attention-text</code> or '
        '<code>qtoy attention</code>; hover a token to see its weights over the keys).</p>'))


def _timing(data: dict) -> str:
    t = data.get("timing_s") or {}
    if not t:
        return ""
    rows = "".join(f'<tr><th scope="row">{_esc(k)}</th>{_td(v)}</tr>' for k, v in t.items())
    return _section("timing", "Timing", f'<table class="small-table"><thead><tr><th>part</th><th>seconds</th></tr>'
                                         f'</thead><tbody>{rows}</tbody></table>')


_PAGE_CSS = "body{margin:0;background:#f6f7f9}"

_CSS = """
.qtoy-report{max-width:1120px;margin:0 auto;padding:18px 26px 40px;color:#1d1d1f;font-size:14px;line-height:1.45;
  font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
.qtoy-report h1{font-size:1.55em;margin:.2em 0 .1em}
.qtoy-report h2{font-size:1.25em;margin:0 0 .5em;padding-bottom:.2em;border-bottom:2px solid #e2e5ea}
.qtoy-report h3{font-size:1.05em;margin:1.1em 0 .4em}
.qtoy-report h4{font-size:.95em;margin:.9em 0 .3em}
.qtoy-report section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:14px 18px;margin:14px 0}
.qtoy-report .sub{color:#555;margin-bottom:.6em}
.qtoy-report nav{font-size:.9em;margin:.4em 0 .2em}
.qtoy-report nav a{margin-right:.9em;color:#1f5fbf;text-decoration:none;white-space:nowrap}
.qtoy-report a{color:#1f5fbf}
.qtoy-report .card{border:1px solid #e2e5ea;border-radius:8px;padding:10px 14px;background:#fff}
.qtoy-report .card.model{display:flex;flex-wrap:wrap;gap:6px 22px;margin:.6em 0}
.qtoy-report .kv .k{color:#666;margin-right:.4em}
.qtoy-report .kv .v{font-weight:600}
.qtoy-report .heads{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:12px}
.qtoy-report .card.head h3{margin:.1em 0 .2em}
.qtoy-report .pill{display:inline-block;font-size:.75em;font-weight:500;background:#fdecea;color:#a93226;
  border-radius:10px;padding:1px 8px;margin-left:.4em;vertical-align:middle}
.qtoy-report table{border-collapse:collapse;font-size:.9em;margin:.2em 0}
.qtoy-report th,.qtoy-report td{border-bottom:1px solid #edf0f3;padding:2px 8px;text-align:left;vertical-align:middle}
.qtoy-report thead th{color:#555;font-weight:600;border-bottom:1px solid #cfd5dc;font-size:.92em}
.qtoy-report tbody th{color:#888;font-weight:500}
.qtoy-report td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:.95em}
.qtoy-report td.tok{white-space:nowrap}
.qtoy-report code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;background:#f1f3f6;
  padding:0 4px;border-radius:3px;font-size:.95em}
.qtoy-report .tid{color:#9aa3ad;font-size:.78em;margin-left:.35em}
.qtoy-report .lead{margin:.2em 0 .6em;color:#333}
.qtoy-report .muted{color:#6b7480}
.qtoy-report .small{font-size:.85em}
.qtoy-report .note{background:#f4f7fb;border-left:3px solid #7a9cd6;padding:5px 10px;margin:5px 0;color:#333}
.qtoy-report .note.warn{background:#fff8e6;border-left-color:#e0a100}
.qtoy-report img.plot{max-width:100%;height:auto;display:block;margin:.4em 0}
.qtoy-report .scroll{overflow-x:auto}
.qtoy-report footer{color:#888;font-size:.85em;margin-top:1.5em}
"""


def render_report(data: dict, *, title: str | None = None, plots: bool = True) -> str:
    """The report dict (`build_report`, or `analyze_model`'s dict) as a self-contained HTML page."""
    meta = data.get("meta") or {}
    m = data.get("model") or {}
    run = meta.get("run")
    title = title or ("Circuit report" + (f": {Path(str(run)).name}" if run else ""))
    sub = []
    if run:
        sub.append(f"run <code>{_esc(run)}</code>")
    if meta.get("qtoy_version"):
        sub.append(f"qtoy {_esc(meta['qtoy_version'])}")
    if meta.get("created"):
        sub.append(_esc(meta["created"]))
    if meta.get("top_k") is not None:
        sub.append(f"top {_esc(meta['top_k'])} per table")
    layers = data.get("layers") or []
    nav = ['<a href="#direct-path">Direct path</a>']
    sections = [_direct_path(data)]
    for entry in layers:
        i = entry.get("layer")
        nav.append(f'<a href="#layer-{i}-attention">Layer {i} attention</a>')
        sections.append(_attention_section(i, entry, data, plots))
        mlp = _mlp_section(i, entry, data, plots)
        if mlp:
            nav.append(f'<a href="#layer-{i}-mlp">Layer {i} MLP</a>')
            sections.append(mlp)
    comp = _composition_section(data, plots)
    if comp:
        nav.append('<a href="#composition">Composition</a>')
        sections.append(comp)
    for id_, name, sec in (("behaviour", "Behaviour", _behaviour_section(data, plots)),
                           ("attention-patterns", "Attention patterns", _attention_page_section(data))):
        if sec:
            nav.append(f'<a href="#{id_}">{name}</a>')
            sections.append(sec)
    notes = list(data.get("notes") or []) + list(meta.get("notes") or [])
    notes_html = "".join(_note(n, "note warn") for n in notes)
    timing = _timing(data)
    if timing:
        nav.append('<a href="#timing">Timing</a>')
    intro = ('<p class="lead">Read from the weights alone: the direct path (embedding \u2192 unembedding), '
             'each head\u2019s QK circuit (which query token attends to which key token) and OV circuit (what '
             'attending to a token writes to the logits), their eigenvalue spectra, the positional kernel, '
             'composition between layers and the bilinear MLP\u2019s eigenvectors. Circuits use weights only '
             '(no biases). Every number in the tables is in the JSON report.</p>')
    if any(_get(e, "attention", "score_is_squared") for e in layers):
        intro += ('<p class="note">Quadratic attention: the attention score is the <b>square</b> of the QK form '
                  '(no softmax), so QK pairs are ranked by |form| and the sign of the form does not matter.</p>')
    dot = " \u00b7 "
    page = (f'<div class="qtoy-report"><header><h1>{_esc(title)}</h1><div class="sub">{dot.join(sub)}</div>'
            f'{_model_card(data)}<nav>{"".join(nav)}</nav></header>{intro}{notes_html}{"".join(sections)}{timing}'
            f'<footer>Generated by qtoy ({_esc(REPORT_FORMAT)}).</footer></div>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_esc(title)}</title><style>{_PAGE_CSS}{_CSS}</style></head><body>{page}</body></html>\n')


# ------------------------------------------------------------------------------- building
def _component_notes(model: Any, data: dict) -> list[str]:
    """Notes for components that offer no weight views (the report shows a note in their place)."""
    notes = []
    for entry in data.get("layers") or []:
        i = entry.get("layer")
        block = None
        try:
            block = model.blocks[i]
        except Exception:  # noqa: BLE001
            pass
        mlp = getattr(block, "mlp", None) if block is not None and getattr(block, "has_mlp", False) else None
        if mlp is not None and not entry.get("mlp"):
            notes.append(f"blocks.{i}.mlp ({type(mlp).__name__}) offers no bilinear weight views: no MLP "
                         f"eigenvectors for it")
    return notes


def build_report(model: Any, tokenizer: Any = None, *, top_k: int = 10, run: str | Path | None = None,
                 behaviour: bool = True, attention_page: str | None = None, **analyze_kwargs: Any) -> dict:
    """`analyze_model(model, tokenizer, top_k)` plus ``meta``: report format, run path, the model config,
    the qtoy version, the tokenizer's description, when it was made, and notes for components without
    weight views. ``behaviour``: add the ``behaviour`` section (`behaviour_data`: heads scored on
    repeated random sequences beside their weight-based scores); ``attention_page``: the (relative)
    path of an attention-viewer page written alongside, which the report links to."""
    from ..checkpoint import qtoy_version
    from .circuits import analyze_model

    data = analyze_model(model, tokenizer, top_k=top_k, **analyze_kwargs)
    config = getattr(model, "config", None)
    tok = None
    if tokenizer is not None and hasattr(tokenizer, "describe"):
        try:
            tok = tokenizer.describe()
        except Exception:  # noqa: BLE001
            tok = None
    data["meta"] = {
        "format": REPORT_FORMAT,
        "run": None if run is None else str(run),
        "model_config": config.model_dump(mode="json") if hasattr(config, "model_dump") else None,
        "qtoy_version": qtoy_version(),
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "top_k": int(top_k),
        "tokenizer": tok,
        "notes": _component_notes(model, data),
        "attention_page": attention_page,
    }
    if behaviour:
        data["behaviour"] = behaviour_data(model, tokenizer)
    return data


class Report:
    """A circuit report: ``data`` (the JSON-able dict) and ``html``; displays itself in a notebook."""

    def __init__(self, data: dict, *, title: str | None = None, plots: bool = True):
        self.data = data
        self.title = title
        self.plots = plots
        self._html: str | None = None

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any = None, *, top_k: int = 10, run: str | Path | None = None,
                   title: str | None = None, plots: bool = True, **analyze_kwargs: Any) -> "Report":
        return cls(build_report(model, tokenizer, top_k=top_k, run=run, **analyze_kwargs), title=title, plots=plots)

    @property
    def html(self) -> str:
        if self._html is None:
            self._html = render_report(self.data, title=self.title, plots=self.plots)
        return self._html

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.data, indent=indent, allow_nan=False)

    def save(self, path: str | Path | None = None, *, json_path: str | Path | None = None) -> list[Path]:
        """Write the HTML page to ``path`` and/or the JSON to ``json_path``; returns what was written."""
        written = []
        for p, text in ((path, lambda: self.html), (json_path, lambda: self.to_json() + "\n")):
            if p is None:
                continue
            p = Path(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text(), encoding="utf-8")
            written.append(p)
        return written

    def _repr_html_(self) -> str:
        page = self.html
        body = page[page.index("<body>") + len("<body>"):page.index("</body>")]
        return f"<style>{_CSS}</style>{body}"

    def __repr__(self) -> str:
        m = self.data.get("model") or {}
        return f"Report({m.get('n_layers')} layer(s), {m.get('attention')} attention, {m.get('mlp')} MLP)"
