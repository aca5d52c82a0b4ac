"""Per-token loss view: where does the model's prediction go wrong?

    from qtoy_core.analysis.loss_view import loss_view, loss_view_html
    view = loss_view(model, tokenizer, "Once upon a time ...")   # displays itself in a notebook
    view.mean_loss, view.worst(5), view.save("loss.html")
    html = loss_view_html(model, tokenizer, text)                 # the same page as one string

Each token of the text is shown as the tokenizer's piece of text on a white-to-red background: the
cross-entropy of predicting that token from the tokens before it, white at 0 nats and full red
from `SATURATION` (7 nats) on. Hovering (or focusing, or clicking to pin) a token shows its loss,
the probability the model gave it and the model's top predictions with their probabilities.

The page is self-contained: inline CSS and a few lines of inline JavaScript, no network. Without
JavaScript everything but pinning still works (the tooltips are CSS). Spaces are real spaces with a
faint dot drawn over them (a checkbox hides the dots), newlines show as a ``↵`` followed by the line
break, tabs as ``⇥``; tooltips and tables spell whitespace as ``␣``, ``↵``, ``⇥``.

Which tokens get a loss: the model predicts token ``t`` from tokens ``< t``. With
``prepend_separator`` (default, when the tokenizer has an end-of-text token) the text is preceded by
that separator, as every document is in qtoy's packed training data, so the first token is
predicted too; otherwise the first token has no loss (shown grey). Texts longer than the model's
``n_ctx`` are cut into consecutive windows of ``n_ctx`` tokens, each window starting with the last
token of the previous one (so every token is predicted once, but the first tokens of a window see
little context: the view says so).

**Colouring by excess loss** (``color_by="excess"``, ``qtoy visualize --color-by excess``): on a
corpus that knows the nats its generator spent on each token (the built-in ``synthetic``:
``dataset.ground_truth(story)`` gives ids, labels and nats per token), a token's background shows
its *excess*, ``loss - nats``, on a blue-white-red scale (blue below 0, red above, both full from
``SATURATION`` on), and every tooltip shows the token's label and nats. Per token the excess is a
bookkeeping quantity, not a per-token distance to the optimum: the generator charges a span's
(a word's, a name's) whole entropy to the token holding its first character, so a span's first
token can go blue (its loss is below the span's nats) while its later tokens, charged 0 nats, go
red for the same bits. Summed over a span, a story or a label (the summary line, `qtoy eval`) the
excess is the distance to the optimum; read single tokens with that in mind.
"""

from __future__ import annotations

import html
import json
import math
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from qtoy_registry import QtoyError

__all__ = ["COLOR_MODES", "SATURATION", "LossView", "LossViewInputError", "TokenLoss", "attach_ground_truth",
           "excess_color", "loss_color", "loss_view", "loss_view_html", "token_losses", "visible"]

#: Loss (nats) at which the background is full red (excess: full red / full blue at +- this).
SATURATION = 7.0
#: What a token's background shows: its loss, or its loss minus the generator's nats.
COLOR_MODES = ("loss", "excess")


class LossViewInputError(QtoyError, ValueError):
    """Loss-view input that cannot work (an unknown colour mode, excess without ground truth...)."""


@dataclass
class TokenLoss:
    """One token of the text. ``loss``/``prob`` are None for a token nothing predicts (the first,
    without a separator). ``top`` holds the model's top predictions at this position as
    ``(token id, text, probability)``, best first."""

    position: int
    token_id: int
    piece: str
    text: str
    loss: float | None = None
    prob: float | None = None
    rank: int | None = None
    top: list[tuple[int, str, float]] = field(default_factory=list)
    context: int = 0  # how many tokens (separator included) the model saw before this one
    label: str | None = None  # ground truth (synthetic): fixed / copyable / free
    nats: float | None = None  # the nats the generator charged to this token (a span's go to its first token)

    @property
    def excess(self) -> float | None:
        """``loss - nats`` (None without a loss or without ground truth)."""
        return None if self.loss is None or self.nats is None else self.loss - self.nats


# ------------------------------------------------------------------------------------- computing
def separator_token(tokenizer: Any) -> int | None:
    """The token a training document starts after (the separator; else eos, else bos), or None: the
    views put it before a text so its first token is read as in training."""
    for name in ("separator_id", "eos_id", "bos_id"):
        try:
            sep = getattr(tokenizer, name, None)
        except Exception:  # noqa: BLE001 - separator_id raises when there is none
            sep = None
        if sep is not None:
            return int(sep)
    return None


def _pieces(tokenizer: Any, text: str) -> tuple[list[int], list[str], str]:
    """Token ids and the piece of (normalised) text each one covers.

    Pieces tile the text: a piece runs from the end of the previous token to the end of its own, so
    the pieces joined give the text back (whitespace included) whatever the offsets convention.
    Tokens sharing one character (bytes of a multi-byte character) give it to the first of them; the
    others get an empty piece.
    """
    if hasattr(tokenizer, "encode_with_offsets"):
        ids, offsets, norm = tokenizer.encode_with_offsets(text)
    else:
        ids, norm = list(tokenizer.encode(text)), text
        offsets = None
    ids = [int(i) for i in ids]
    if offsets is None or len(offsets) != len(ids):
        return ids, [_decode(tokenizer, [i]) for i in ids], norm
    pieces, prev = [], 0
    for k, (_, end) in enumerate(offsets):
        end = int(end)
        pieces.append(norm[prev:end] if end > prev else "")
        prev = max(prev, end)
    if prev < len(norm) and pieces:  # text after the last token (should not happen): keep it visible
        pieces[-1] += norm[prev:]
    return ids, pieces, norm


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    try:
        return tokenizer.decode(list(ids))
    except Exception:  # noqa: BLE001 - one odd id must not break a view
        return "".join(f"<{i}>" for i in ids)


def token_losses(model: Any, tokenizer: Any, text: str, *, top: int = 5,
                 prepend_separator: bool = True) -> tuple[list[TokenLoss], dict]:
    """Per-token cross-entropy of ``text`` under ``model``: (tokens, info).

    ``info`` says whether a separator was prepended, the window length and how many windows the
    text needed. See the module docstring for which tokens are predicted.
    """
    import torch

    ids, pieces, _ = _pieces(tokenizer, text)
    if not ids:
        raise ValueError("the text encodes to no tokens; give some text")
    sep = separator_token(tokenizer) if prepend_separator else None
    seq = ([int(sep)] if sep is not None else []) + ids
    shift = len(seq) - len(ids)  # 1 with a separator
    n_ctx = int(getattr(getattr(model, "config", None), "n_ctx", 0) or len(seq))
    n_ctx = max(2, n_ctx)
    top = max(1, int(top))
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")

    losses: dict[int, tuple[float, float, int, list[tuple[int, float]], int]] = {}
    was_training = getattr(model, "training", False)
    model.eval()
    windows = 0
    try:
        with torch.no_grad():
            start = 0
            while True:
                window = seq[start:start + n_ctx]
                windows += 1
                if len(window) >= 2:
                    x = torch.tensor([window], dtype=torch.long, device=device)
                    logits = model(x)[0, :-1].float()
                    logp = torch.log_softmax(logits, dim=-1)
                    targets = torch.tensor(window[1:], dtype=torch.long, device=device)
                    tok_logp = logp.gather(1, targets[:, None])[:, 0]
                    ranks = (logp > tok_logp[:, None]).sum(-1)
                    k = min(top, logp.shape[-1])
                    top_p, top_i = logp.topk(k, dim=-1)
                    for j in range(len(window) - 1):
                        pos = start + j + 1  # index in seq of the predicted token
                        losses[pos] = (float(-tok_logp[j]), float(tok_logp[j].exp()), int(ranks[j]),
                                       list(zip(top_i[j].tolist(), top_p[j].exp().tolist())), j + 1)
                if start + n_ctx >= len(seq):
                    break
                start += n_ctx - 1
    finally:
        if was_training:
            model.train()

    texts: dict[int, str] = {}

    def text_of(i: int) -> str:
        if i not in texts:
            texts[i] = _decode(tokenizer, [i])
        return texts[i]

    out = []
    for p, (tid, piece) in enumerate(zip(ids, pieces)):
        entry = TokenLoss(p, tid, piece, text_of(tid))
        got = losses.get(p + shift)
        if got is not None:
            entry.loss, entry.prob, entry.rank = got[0], got[1], got[2]
            entry.top = [(int(i), text_of(int(i)), float(pr)) for i, pr in got[3]]
            entry.context = got[4]
        out.append(entry)
    info = {"separator": None if sep is None else {"id": int(sep), "text": text_of(int(sep))},
            "n_ctx": n_ctx, "windows": windows, "n_tokens": len(ids),
            "n_predicted": sum(t.loss is not None for t in out)}
    return out, info


def attach_ground_truth(tokens: list[TokenLoss], ground_truth: Any, text: str) -> None:
    """Set each token's ``label`` and ``nats`` from ``ground_truth``: the dict a dataset's
    ``ground_truth(story)`` returns (``ids``, ``labels``, ``nats`` per token of the text), or the
    dataset itself (its ``ground_truth(text)`` is asked). The ids must be the text's tokens."""
    if ground_truth is None:
        raise LossViewInputError(
            "color_by='excess' needs the nats the corpus' generator spent on each token, and none were given. "
            "Only a corpus with ground truth has them (the synthetic corpus): pass "
            "ground_truth=dataset.ground_truth(story) with text=dataset.story(story).text, or colour by 'loss'.")
    truth = ground_truth
    if not isinstance(truth, dict):
        method = getattr(truth, "ground_truth", None)
        if not callable(method):
            raise LossViewInputError(
                f"{type(truth).__name__} offers no ground_truth(): this corpus does not know the nats its documents "
                f"cost, so there is no excess loss to colour by. Use a corpus with ground truth (synthetic), or "
                f"colour by 'loss'.")
        try:
            truth = method(text)
        except QtoyError as exc:
            raise LossViewInputError(
                f"the corpus has no ground truth for this text ({exc}) Pass the story itself: "
                f"ground_truth=dataset.ground_truth(index) with text=dataset.story(index).text.") from None
    missing = [k for k in ("ids", "nats") if k not in truth]
    if missing:
        raise LossViewInputError(f"ground_truth lacks {', '.join(missing)}: give the dict a dataset's "
                                 f"ground_truth(story) returns (ids, labels, nats per token).")
    ids = [int(i) for i in truth["ids"]]
    if ids != [t.token_id for t in tokens]:
        raise LossViewInputError(
            f"the ground truth describes {len(ids)} tokens that are not this text's {len(tokens)} tokens: it belongs "
            f"to another text or another tokenizer. Pass the ground truth of this very text, encoded with the "
            f"corpus' own tokenizer.")
    labels = truth.get("labels") or [None] * len(ids)
    for t, label, nat in zip(tokens, labels, truth["nats"]):
        t.label, t.nats = label, float(nat)


# --------------------------------------------------------------------------------------- drawing
def loss_color(loss: float | None, saturation: float = SATURATION) -> str:
    """The background of a token: ``rgb(255, g, g)`` with g from 255 (loss 0) to 0 (loss >= saturation);
    a token without a loss is light grey."""
    if loss is None or not math.isfinite(loss):
        return "rgb(230,230,230)" if loss is None else "rgb(255,0,0)"
    frac = min(max(loss / saturation, 0.0), 1.0)
    g = round(255 * (1.0 - frac))
    return f"rgb(255,{g},{g})"


def excess_color(excess: float | None, saturation: float = SATURATION) -> str:
    """The background of a token coloured by excess loss: white at 0, towards red
    (``rgb(255, g, g)``) above, towards blue (``rgb(g, g, 255)``) below, full at +- saturation; a
    token without an excess (nothing predicts it) is light grey."""
    if excess is None:
        return "rgb(230,230,230)"
    if not math.isfinite(excess):
        return "rgb(255,0,0)" if excess > 0 else "rgb(0,0,255)"
    frac = min(abs(excess) / saturation, 1.0)
    g = round(255 * (1.0 - frac))
    return f"rgb(255,{g},{g})" if excess >= 0 else f"rgb({g},{g},255)"


_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def visible(s: str | None) -> str:
    """A token's text with whitespace and control characters spelled out (``␣``, ``↵``, ``⇥``)."""
    if s is None:
        return "?"
    if s == "":
        return "\u2205"
    out = []
    for ch in s:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _piece_html(piece: str, fallback: str) -> str:
    """The main-text form of a piece: real whitespace, with markers for spaces, newlines and tabs."""
    if piece == "":
        return f'<span class="frag" title="{_esc("part of a character split over several tokens: " + visible(fallback))}">\u00b7</span>'
    out = []
    for ch in piece:
        if ch == " ":
            out.append('<span class="sp"> </span>')
        elif ch == "\n":
            out.append('<span class="ctl">\u21b5</span>\n')
        elif ch == "\t":
            out.append('<span class="ctl">\u21e5</span>\t')
        elif ch == "\r":
            out.append('<span class="ctl">\u240d</span>')
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f'<span class="ctl">\\x{ord(ch):02x}</span>')
        else:
            out.append(_esc(ch))
    return "".join(out)


def _fmt_p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _tip_html(t: TokenLoss, saturation: float) -> str:
    head = (f'<span class="tip-tok"><code>{_esc(visible(t.text))}</code></span>'
            f'<span class="tip-meta">id {t.token_id} \u00b7 position {t.position}</span>')
    if t.loss is None:
        return (f'<span class="tip" role="tooltip">{head}<span class="tip-line">no prediction: nothing '
                f'precedes this token</span></span>')
    rows = []
    for i, txt, p in t.top:
        mine = ' class="target"' if i == t.token_id else ""
        width = max(1, round(90 * p))
        rows.append(f'<span class="tip-row"{mine}><code>{_esc(visible(txt))}</code><span class="bar" '
                    f'style="width:{width}px"></span><span class="p">{_fmt_p(p)}</span></span>')
    rank = "" if t.rank is None else f" \u00b7 rank {t.rank + 1}"
    truth = ""
    if t.nats is not None:
        label = "" if t.label is None else f"{_esc(t.label)} \u00b7 "
        truth = (f'<span class="tip-line">{label}generator {t.nats:.3f} nats \u00b7 <b>excess {t.excess:+.3f} '
                 f'nats</b></span>')
    return (f'<span class="tip" role="tooltip">{head}'
            f'<span class="tip-line"><b>loss {t.loss:.3f} nats</b> \u00b7 p = {_fmt_p(t.prob or 0.0)}{rank}</span>'
            f'{truth}<span class="tip-line sub">top {len(t.top)} predictions:</span>{"".join(rows)}</span>')


_CSS = """
.qtoy-lv{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d1d1f;
  max-width:1100px;line-height:1.45}
.qtoy-lv h1{font-size:1.35em;margin:.2em 0 .1em}
.qtoy-lv h2{font-size:1.1em;margin:1.2em 0 .4em}
.qtoy-lv .summary{color:#444;margin:.2em 0 .6em}
.qtoy-lv .legend{display:flex;align-items:center;gap:.5em;font-size:.85em;color:#444;margin:.3em 0 .6em;flex-wrap:wrap}
.qtoy-lv .ramp{width:220px;height:12px;border:1px solid #bbb;
  background:linear-gradient(to right,rgb(255,255,255),rgb(255,0,0))}
.qtoy-lv .ramp.diverging{background:linear-gradient(to right,rgb(0,0,255),rgb(255,255,255),rgb(255,0,0))}
.qtoy-lv .controls{font-size:.85em;color:#444;margin-bottom:.4em}
.qtoy-lv .note{font-size:.85em;color:#666;margin:.2em 0}
.qtoy-lv .text{white-space:pre-wrap;word-wrap:break-word;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;
  font-size:15px;line-height:1.9;border:1px solid #ddd;border-radius:6px;padding:12px 14px;background:#fff}
.qtoy-lv .tok{position:relative;white-space:pre;border-right:1px solid rgba(0,0,0,.13);border-radius:2px;padding:1px 0;cursor:default}
.qtoy-lv .tok.hi{color:#fff}
.qtoy-lv .tok.nopred{color:#777}
.qtoy-lv .tok:hover,.qtoy-lv .tok:focus,.qtoy-lv .tok.pinned{outline:2px solid #1f5fbf;outline-offset:0;z-index:5}
.qtoy-lv .sp{position:relative}
.qtoy-lv .sp::after{content:"\\00b7";position:absolute;left:0;right:0;text-align:center;color:rgba(0,0,0,.3);pointer-events:none}
.qtoy-lv .tok.hi .sp::after{color:rgba(255,255,255,.55)}
.qtoy-lv.hide-ws .sp::after{content:none}
.qtoy-lv .ctl{color:rgba(0,0,0,.4);font-size:.85em}
.qtoy-lv .tok.hi .ctl{color:rgba(255,255,255,.7)}
.qtoy-lv .frag{color:rgba(0,0,0,.4)}
.qtoy-lv .tip{display:none;position:absolute;left:0;top:calc(100% + 4px);z-index:20;min-width:230px;max-width:340px;
  white-space:normal;background:#fff;color:#1d1d1f;border:1px solid #999;border-radius:6px;padding:7px 9px;
  box-shadow:0 4px 14px rgba(0,0,0,.18);font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
  font-size:13px;line-height:1.35;user-select:none;-webkit-user-select:none}
.qtoy-lv .tip.flip-x{left:auto;right:0}
.qtoy-lv .tip.flip-y{top:auto;bottom:calc(100% + 4px)}
.qtoy-lv .tok:hover>.tip,.qtoy-lv .tok:focus>.tip,.qtoy-lv .tok.pinned>.tip{display:block}
.qtoy-lv .tip code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;background:#f2f2f2;padding:0 3px;border-radius:3px}
.qtoy-lv .tip-tok{display:inline-block;font-size:1.1em;margin-right:.5em}
.qtoy-lv .tip-meta{color:#777;font-size:.9em}
.qtoy-lv .tip-line{display:block;margin-top:3px}
.qtoy-lv .tip-line.sub{color:#666;font-size:.92em;margin-top:5px}
.qtoy-lv .tip-row{display:flex;align-items:center;gap:6px;margin-top:2px}
.qtoy-lv .tip-row code{min-width:90px}
.qtoy-lv .tip-row .bar{display:inline-block;height:9px;background:#7a9cd6;border-radius:2px}
.qtoy-lv .tip-row .p{color:#333;font-variant-numeric:tabular-nums}
.qtoy-lv .tip-row.target code{background:#ffe08a;font-weight:600}
.qtoy-lv table{border-collapse:collapse;font-size:.9em}
.qtoy-lv th,.qtoy-lv td{border-bottom:1px solid #e5e5e5;padding:3px 10px;text-align:left;vertical-align:top}
.qtoy-lv td.num{text-align:right;font-variant-numeric:tabular-nums}
.qtoy-lv td code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;background:#f4f4f4;padding:0 3px;border-radius:3px}
.qtoy-lv .swatch{display:inline-block;width:12px;height:12px;border:1px solid #bbb;vertical-align:middle;margin-right:4px}
"""

_JS = """
(function(){
  var root=document.getElementById("%(id)s"); if(!root) return;
  var box=root.querySelector(".ws-toggle");
  if(box) box.addEventListener("change",function(){root.classList.toggle("hide-ws",!box.checked);});
  function place(tok){
    var tip=tok.querySelector(".tip"); if(!tip) return;
    tip.classList.remove("flip-x","flip-y");
    var r=tip.getBoundingClientRect(), w=document.documentElement.clientWidth, h=window.innerHeight;
    if(r.right>w-4) tip.classList.add("flip-x");
    if(r.bottom>h-4 && tok.getBoundingClientRect().top>r.height+8) tip.classList.add("flip-y");
  }
  root.querySelectorAll(".tok").forEach(function(tok){
    tok.addEventListener("mouseenter",function(){place(tok);});
    tok.addEventListener("focus",function(){place(tok);});
    tok.addEventListener("click",function(){
      var was=tok.classList.contains("pinned");
      root.querySelectorAll(".tok.pinned").forEach(function(t){t.classList.remove("pinned");});
      if(!was){tok.classList.add("pinned");place(tok);}
    });
  });
  var m=/pin=(\\d+)/.exec(window.location.hash||"");
  if(m){var t=root.querySelector('.tok[data-pos="'+m[1]+'"]'); if(t){t.classList.add("pinned");place(t);}}
})();
"""


class FragmentPage:
    """What a view with a `title` and a self-contained `fragment()` (inline CSS and JS) offers: the
    whole page (`html`), notebook display (`_repr_html_`) and `save(path)`."""

    @property
    def html(self) -> str:
        """A complete, self-contained HTML page."""
        return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f'<title>{_esc(self.title)}</title><style>body{{margin:20px 28px;background:#fafafa}}</style>'
                f'</head><body>{self.fragment()}</body></html>\n')

    def _repr_html_(self) -> str:
        return self.fragment()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html, encoding="utf-8")
        return path


class LossView(FragmentPage):
    """Per-token losses of one text, displayable in a notebook (``_repr_html_``) and as a page.

    ``tokens``: `TokenLoss` per token; ``info``: separator, windows; ``html``: the full page;
    ``save(path)`` writes it. ``to_dict()`` gives everything as plain data. ``color_by``: "loss"
    (white to red) or "excess" (loss minus the generator's nats, blue-white-red; the tokens must
    carry ``nats``, see `attach_ground_truth`).
    """

    def __init__(self, tokens: list[TokenLoss], info: dict, *, title: str = "Per-token loss",
                 subtitle: str | None = None, saturation: float = SATURATION, color_by: str = "loss"):
        if color_by not in COLOR_MODES:
            raise LossViewInputError(f"color_by={color_by!r} is not a colour mode: use one of "
                                     f"{', '.join(repr(m) for m in COLOR_MODES)}.")
        if color_by == "excess" and not any(t.nats is not None for t in tokens):
            raise LossViewInputError("color_by='excess' needs tokens that carry the generator's nats: build the view "
                                     "with loss_view(..., color_by='excess', ground_truth=...), or colour by 'loss'.")
        self.tokens = tokens
        self.info = info
        self.title = title
        self.subtitle = subtitle
        self.saturation = float(saturation)
        self.color_by = color_by
        self._id = "qtoy-lv-" + uuid.uuid4().hex[:10]

    # -- numbers ----------------------------------------------------------------------------------
    @property
    def losses(self) -> list[float | None]:
        return [t.loss for t in self.tokens]

    @property
    def excesses(self) -> list[float | None]:
        return [t.excess for t in self.tokens]

    @property
    def mean_loss(self) -> float | None:
        vals = [t.loss for t in self.tokens if t.loss is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def mean_excess(self) -> float | None:
        """Mean of ``loss - nats`` over the predicted tokens that have nats (None without ground truth)."""
        vals = [t.excess for t in self.tokens if t.excess is not None]
        return math.fsum(vals) / len(vals) if vals else None

    def worst(self, n: int = 10, *, by: str = "loss") -> list[TokenLoss]:
        """The ``n`` tokens with the highest loss (``by="excess"``: excess), worst first."""
        if by not in COLOR_MODES:
            raise LossViewInputError(f"worst(by={by!r}): use one of {', '.join(repr(m) for m in COLOR_MODES)}.")
        key = (lambda t: t.loss) if by == "loss" else (lambda t: t.excess)
        return sorted((t for t in self.tokens if key(t) is not None), key=lambda t: -key(t))[:n]

    def color_of(self, token: TokenLoss) -> str:
        """The background ``token`` gets in this view's colour mode."""
        if self.color_by == "excess":
            return excess_color(token.excess, self.saturation)
        return loss_color(token.loss, self.saturation)

    def to_dict(self) -> dict:
        tokens = [{**asdict(t), "excess": t.excess} for t in self.tokens]
        return {"title": self.title, "saturation": self.saturation, "color_by": self.color_by,
                "mean_loss": self.mean_loss, "mean_excess": self.mean_excess, **self.info, "tokens": tokens}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    # -- HTML -------------------------------------------------------------------------------------
    def _legend(self) -> str:
        sat = self.saturation
        if self.color_by == "loss":
            return (f'<div class="legend"><span>0 nats</span><span class="ramp"></span><span>\u2265 {sat:g} nats '
                    f'(cross-entropy of each token given the ones before it)</span></div>')
        return (f'<div class="legend"><span>\u2264 \u2212{sat:g}</span><span class="ramp diverging"></span>'
                f'<span>\u2265 +{sat:g} nats of excess loss (each token\u2019s loss minus the nats the generator '
                f'charged to it; white: as the generator)</span></div>'
                '<div class="note">Per token the excess is bookkeeping, not a distance to the optimum: the generator '
                'charges a span\u2019s whole entropy (a free word, a name) to the token holding its first character, '
                'so that token can go blue (its loss is below the span\u2019s nats) while the span\u2019s later tokens, '
                'charged 0 nats, go red for the same uncertainty. Summed over a span, the text or a label (the summary '
                'above, <code>qtoy eval</code>) the excess is the distance to the optimum.</div>')

    def fragment(self) -> str:
        """The view as an HTML fragment (style, content, script), scoped so that several can share a page."""
        sat = self.saturation
        spans = []
        for t in self.tokens:
            shade = t.loss if self.color_by == "loss" else (None if t.excess is None else abs(t.excess))
            frac = 0.0 if shade is None else min(max(shade / sat, 0.0), 1.0)
            cls = "tok" + (" hi" if frac > 0.72 else "") + (" nopred" if t.loss is None else "")
            attrs = "" if t.loss is None else f' data-loss="{t.loss:.4f}"'
            if t.excess is not None:
                attrs += f' data-excess="{t.excess:.4f}"'
            if t.label is not None:
                attrs += f' data-label="{_esc(t.label)}"'
            spans.append(f'<span class="{cls}" data-pos="{t.position}"{attrs} tabindex="0" '
                         f'style="background:{self.color_of(t)}">{_piece_html(t.piece, t.text)}'
                         f'{_tip_html(t, sat)}</span><wbr>')
        mean = self.mean_loss
        n_pred = self.info.get("n_predicted", 0)
        summary = (f"{len(self.tokens)} tokens \u00b7 {n_pred} predicted \u00b7 mean loss "
                   f"{'n/a' if mean is None else f'{mean:.3f} nats'}")
        if mean is not None:
            summary += f" (perplexity {math.exp(min(mean, 50)):.1f})"
        excess = self.mean_excess
        if excess is not None:
            scored = [t for t in self.tokens if t.excess is not None]
            entropy = math.fsum(t.nats for t in scored) / len(scored)
            summary += f" \u00b7 generator {entropy:.3f} nats \u00b7 mean excess {excess:.3f} nats"
        notes = []
        sep = self.info.get("separator")
        if sep is not None:
            notes.append(f"The text is preceded by the separator <code>{_esc(visible(sep['text']))}</code> "
                         f"(as documents are in training), so the first token is predicted too.")
        elif self.tokens and self.tokens[0].loss is None:
            notes.append("The first token has no loss: nothing precedes it (the tokenizer has no separator).")
        if self.info.get("windows", 1) > 1:
            notes.append(f"The text is longer than the model's context ({self.info['n_ctx']} tokens): it was "
                         f"read in {self.info['windows']} consecutive windows, so the first tokens of each "
                         f"window see little context.")
        with_truth = any(t.nats is not None for t in self.tokens)
        worst_rows = []
        for t in self.worst(10, by=self.color_by):
            best = t.top[0] if t.top else None
            pred = "" if best is None else f"<code>{_esc(visible(best[1]))}</code> ({_fmt_p(best[2])})"
            truth = ""
            if with_truth:
                truth = (f'<td>{_esc(t.label or "")}</td><td class="num">{t.nats:.3f}</td>'
                         f'<td class="num">{t.excess:+.3f}</td>' if t.nats is not None else "<td></td>" * 3)
            worst_rows.append(
                f'<tr><td class="num">{t.position}</td><td><span class="swatch" style="background:'
                f'{self.color_of(t)}"></span><code>{_esc(visible(t.text))}</code></td>'
                f'<td class="num">{t.loss:.3f}</td>{truth}<td class="num">{_fmt_p(t.prob or 0.0)}</td><td>{pred}</td></tr>')
        worst = ""
        if worst_rows:
            truth_head = "<th>label</th><th>generator nats</th><th>excess</th>" if with_truth else ""
            worst = (f'<h2>Highest-{self.color_by} tokens</h2><table><thead><tr><th>position</th><th>token</th>'
                     f'<th>loss (nats)</th>{truth_head}<th>p(token)</th><th>model\u2019s top prediction</th></tr>'
                     f'</thead><tbody>{"".join(worst_rows)}</tbody></table>')
        sub = f'<div class="note">{_esc(self.subtitle)}</div>' if self.subtitle else ""
        what = "its loss" + (", label, generator nats, excess" if with_truth else "")
        return (f'<style>{_CSS}</style><div class="qtoy-lv" id="{self._id}">'
                f'<h1>{_esc(self.title)}</h1>{sub}<div class="summary">{summary}</div>'
                f'{self._legend()}'
                f'<div class="controls"><label><input type="checkbox" class="ws-toggle" checked> mark spaces '
                f'(\u00b7)</label> \u00b7 hover or click a token for {what} and the model\u2019s top '
                f'predictions</div>'
                + "".join(f'<div class="note">{n}</div>' for n in notes)
                + f'<div class="text">{"".join(spans)}</div>{worst}</div>'
                f'<script>{_JS % {"id": self._id}}</script>')

    def __repr__(self) -> str:
        mean = self.mean_loss
        excess = self.mean_excess
        return (f"LossView({len(self.tokens)} tokens, mean loss {'n/a' if mean is None else f'{mean:.3f}'} nats"
                f"{'' if excess is None else f', mean excess {excess:.3f} nats'})")


def loss_view(model: Any, tokenizer: Any, text: str, *, top: int = 5, prepend_separator: bool = True,
              title: str = "Per-token loss", subtitle: str | None = None,
              saturation: float = SATURATION, color_by: str = "loss", ground_truth: Any = None) -> LossView:
    """Compute the per-token losses of ``text`` and return a `LossView` (displays in notebooks).

    ``color_by``: "loss" (default) or "excess" (loss minus the generator's nats; see the module
    docstring for what that means per token). ``ground_truth``: the dict ``dataset.ground_truth(story)``
    returns for this text (ids, labels, nats per token), or the dataset itself (asked for
    ``ground_truth(text)``); required for "excess", optional otherwise (the tooltips then show each
    token's label, nats and excess in either mode).
    """
    if color_by not in COLOR_MODES:
        raise LossViewInputError(f"color_by={color_by!r} is not a colour mode: use one of "
                                 f"{', '.join(repr(m) for m in COLOR_MODES)}.")
    if color_by == "excess" and ground_truth is None:
        attach_ground_truth([], None, text)  # raises the one message about missing ground truth
    tokens, info = token_losses(model, tokenizer, text, top=top, prepend_separator=prepend_separator)
    if ground_truth is not None:
        attach_ground_truth(tokens, ground_truth, text)
    return LossView(tokens, info, title=title, subtitle=subtitle, saturation=saturation, color_by=color_by)


def loss_view_html(model: Any, tokenizer: Any, text: str, **kwargs: Any) -> str:
    """The per-token loss view of ``text`` as one self-contained HTML page (see `loss_view`)."""
    return loss_view(model, tokenizer, text, **kwargs).html
