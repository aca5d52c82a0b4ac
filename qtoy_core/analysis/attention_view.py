"""Attention viewer: every layer's and head's pattern on one text, as one self-contained HTML page.

    from qtoy_core.analysis.attention_view import attention_view
    view = attention_view(model, tokenizer, "Once upon a time ...")   # displays itself in a notebook
    view.patterns[0][1]         # (T, T) pattern of layer 0, head 1 (hook_pattern, query x key)
    view.save("attention.html")

The page shows the text as tokens and a thumbnail heat map of every head's (query x key) pattern.
Hovering (or focusing) a query token colours the keys it attends to with the selected head's
weights and lists them; clicking a thumbnail selects that head. The URL fragment
``#layer=L&head=H&query=Q`` selects a head and query when the page opens.

Colour scales (they say which one applies, per layer, in the legend; a checkbox makes the end of the
scale the hovered query's largest |weight| instead of the head's, for rows that the head's largest
entry would wash out):

  probability   softmax attention: rows sum to 1; white (0) to blue (1), values shown as probabilities
  non-negative  quadratic attention: (q.k / d_head)**2, unbounded; white (0) to blue at the head's
                largest entry on this text (the legend prints that number)
  signed        bilinear attention: (q1.k1)(q2.k2) / d_head**2 can be negative; diverging, red for
                negative, white for 0, blue for positive, symmetric at the head's largest |entry|

``pattern_color(value, kind, vmax)`` is the colour formula (the page's script uses the same one).
The page is self-contained: inline CSS, inline JavaScript and the patterns as inline JSON, no network.
"""

from __future__ import annotations

import html
import json
import uuid
from typing import Any

from qtoy_registry import QtoyError

from .loss_view import FragmentPage, _pieces, separator_token, visible

__all__ = ["AttentionView", "AttentionViewError", "MAX_TOKENS", "SCALE_KINDS", "attention_view", "pattern_color"]

#: Texts longer than this many tokens are refused: the page holds len**2 numbers per head.
MAX_TOKENS = 512

_BLUE = (31, 95, 191)
_RED = (192, 57, 43)

SCALE_KINDS = {
    "probability": "softmax attention: probabilities (each row sums to 1); white = 0, blue = 1",
    "non-negative": ("quadratic attention: unnormalised pattern (q\u00b7k / d_head)\u00b2, non-negative and "
                     "unbounded (rows do not sum to 1); white = 0, blue = this head\u2019s largest entry"),
    "signed": ("bilinear attention: signed pattern (q1\u00b7k1)(q2\u00b7k2) / d_head\u00b2 (can be negative); "
               "diverging scale: red = negative, white = 0, blue = positive, \u00b1 this head\u2019s largest |entry|"),
}


class AttentionViewError(QtoyError, ValueError):
    """A text the attention viewer cannot show (empty, or longer than the model's positions allow)."""


def pattern_color(value: float, kind: str, vmax: float = 1.0) -> str:
    """The background of a key for a pattern entry: ``rgb(r, g, b)`` between white and blue (red below
    0 for "signed"); ``vmax``, the end of the scale, is 1 for probabilities, else the head's largest
    |entry| (with the page's row checkbox: the query row's largest |entry|; 0: all white)."""
    top = float(vmax)
    t = 0.0 if top <= 0 else max(-1.0, min(1.0, float(value) / top))
    if kind != "signed":
        t = max(0.0, t)
    c = _BLUE if t >= 0 else _RED
    a = abs(t)
    return "rgb({}, {}, {})".format(*(round(255 + a * (ch - 255)) for ch in c))


def _layer_kind(attn: Any, rows_sum_to_one: bool, any_negative: bool) -> str:
    views = getattr(attn, "weight_views", None)
    v = views() if callable(views) else {}
    qk = list(v.get("qk", []))
    if v.get("pattern") == "product":
        return "non-negative" if len(qk) == 2 and qk[0] == qk[1] else "signed"
    if rows_sum_to_one and not any_negative:
        return "probability"
    return "signed" if any_negative else "non-negative"


class AttentionView(FragmentPage):
    """The patterns of every head on one text. ``tokens``: (id, text, piece) per position;
    ``patterns[layer][head]``: (T, T) float tensor; ``kinds[layer]``: the colour scale (see module
    docstring); ``html`` the page, ``save(path)`` writes it, ``to_dict()`` gives plain data."""

    def __init__(self, tokens: list[tuple[int, str, str]], patterns: list, kinds: list[str], *,
                 attention: str = "", title: str = "Attention patterns", subtitle: str | None = None,
                 separator: bool = False):
        self.tokens = tokens
        self.patterns = patterns
        self.kinds = kinds
        self.attention = attention
        self.title = title
        self.subtitle = subtitle
        self.separator = separator
        self._id = "qtoy-av-" + uuid.uuid4().hex[:10]

    def to_dict(self) -> dict:
        return {"title": self.title, "attention": self.attention, "separator": self.separator,
                "tokens": [{"position": i, "id": t, "text": s} for i, (t, s, _) in enumerate(self.tokens)],
                "layers": [{"layer": l, "scale": self.kinds[l], "scale_label": SCALE_KINDS[self.kinds[l]],
                            "heads": [p.tolist() for p in heads]} for l, heads in enumerate(self.patterns)]}

    def _data(self) -> str:
        layers = []
        for l, heads in enumerate(self.patterns):
            hs = []
            for p in heads:
                rows = [[float(f"{x:.5g}") for x in p[i, : i + 1].tolist()] for i in range(p.shape[0])]
                hs.append({"rows": rows, "vmax": float(f"{float(p.abs().max()) if p.numel() else 0.0:.5g}")})
            layers.append({"kind": self.kinds[l], "label": SCALE_KINDS[self.kinds[l]], "heads": hs})
        data = {"tokens": [visible(s) for _, s, _ in self.tokens], "ids": [t for t, _, _ in self.tokens],
                "layers": layers, "blue": _BLUE, "red": _RED}
        return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")

    def fragment(self) -> str:
        """The view as an HTML fragment (style, content, script), scoped to its own id."""
        spans = []
        for i, (tid, text, piece) in enumerate(self.tokens):
            shown = piece if piece else text
            spans.append(f'<span class="tok" tabindex="0" data-pos="{i}" title="position {i} \u00b7 id {tid}">'
                         f'{_esc(visible(shown) if shown.strip() == "" else shown.replace(chr(10), chr(8629)))}'
                         f'</span>')
        n_layers = len(self.patterns)
        n_head = len(self.patterns[0]) if self.patterns else 0
        sub = f'<div class="note">{_esc(self.subtitle)}</div>' if self.subtitle else ""
        sep = ('<div class="note">Position 0 is the tokenizer\u2019s separator, put before the text as in '
               'training.</div>') if self.separator else ""
        summary = (f"{len(self.tokens)} tokens \u00b7 {n_layers} layer(s) \u00d7 {n_head} head(s)"
                   + (f" \u00b7 {_esc(self.attention)} attention" if self.attention else ""))
        return (f'<style>{_CSS}</style><div class="qtoy-av" id="{self._id}">'
                f'<h1>{_esc(self.title)}</h1>{sub}<div class="summary">{summary}</div>{sep}'
                '<div class="legend"><span class="scale-label"></span><div class="ramp-row">'
                '<span class="lo"></span><span class="ramp"></span><span class="hi"></span></div></div>'
                '<div class="hint">Hover or focus a token to make it the query; click a head below to select it. '
                '<label><input type="checkbox" class="row-scale"> colour relative to the query’s row (its '
                'largest |weight|) instead of the whole head</label></div>'
                f'<div class="text">{"".join(spans)}</div>'
                '<div class="main"><div class="heads"></div><div class="detail"></div></div>'
                f'<script type="application/json" class="av-data">{self._data()}</script>'
                f'<script>{_JS.replace("%ID%", self._id)}</script></div>')

    def __repr__(self) -> str:
        return f"AttentionView({len(self.tokens)} tokens, {len(self.patterns)} layer(s), scales {self.kinds})"


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def attention_view(model: Any, tokenizer: Any, text: str, *, prepend_separator: bool = True,
                   title: str = "Attention patterns", subtitle: str | None = None,
                   max_tokens: int = MAX_TOKENS) -> AttentionView:
    """Run ``model`` on ``text`` (preceded by the tokenizer's separator, as in training, unless
    ``prepend_separator`` is False), record every layer's ``hook_pattern`` and return an `AttentionView`."""
    import torch

    from .cache import hook_names, run_with_cache

    if not text:
        raise AttentionViewError("the text is empty: give the text whose attention patterns to show.")
    ids, pieces, _ = _pieces(tokenizer, text)
    if not ids:
        raise AttentionViewError("the text encodes to no tokens: give some text.")
    sep = separator_token(tokenizer) if prepend_separator else None
    seq = ([int(sep)] if sep is not None else []) + [int(i) for i in ids]
    pieces = (["" ] if sep is not None else []) + list(pieces)
    limit = getattr(getattr(model, "positional", None), "max_positions", None)
    with_sep = " (with the separator put first)" if sep is not None else ""
    if limit is not None and len(seq) > limit:
        raise AttentionViewError(
            f"the text is {len(seq)} tokens{with_sep} but the model's learned positions cover only n_ctx={limit}: "
            f"shorten the text to at most {limit - (sep is not None)} tokens.")
    if len(seq) > max_tokens:
        raise AttentionViewError(
            f"the text is {len(seq)} tokens{with_sep}; the viewer shows at most {max_tokens} (the page holds "
            f"tokens\u00b2 numbers per head): shorten the text, or pass a larger max_tokens.")
    names = set(hook_names(model))
    wanted = [f"blocks.{i}.attn.hook_pattern" for i in range(len(model.blocks))]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise AttentionViewError(f"{', '.join(m.rsplit('.', 1)[0] for m in missing)} record no hook_pattern, so "
                                 f"there is no pattern to show for them.")
    device = next(model.parameters()).device
    was = getattr(model, "training", False)
    model.eval()
    try:
        _, cache = run_with_cache(model, torch.tensor([seq], device=device), wanted, device="cpu")
    finally:
        if was:
            model.train()
    patterns, kinds = [], []
    for i, name in enumerate(wanted):
        p = cache[name][0].float()  # (head, T, T)
        T = p.shape[-1]
        low = torch.ones(T, T, dtype=torch.bool).tril()
        rows_one = bool(torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-3))
        kinds.append(_layer_kind(model.blocks[i].attn, rows_one, bool((p[:, low] < 0).any())))
        patterns.append([p[h] for h in range(p.shape[0])])

    def decode(t: int) -> str:
        try:
            return tokenizer.decode([t])
        except Exception:  # noqa: BLE001
            return f"<{t}>"

    tokens = [(t, decode(t), pc) for t, pc in zip(seq, pieces)]
    config = getattr(model, "config", None)
    attention = getattr(getattr(config, "attention", None), "name", "") or ""
    return AttentionView(tokens, patterns, kinds, attention=attention, title=title, subtitle=subtitle,
                         separator=sep is not None)


_CSS = """
.qtoy-av{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d1d1f;max-width:1200px;line-height:1.45}
.qtoy-av h1{font-size:1.35em;margin:.2em 0 .1em}
.qtoy-av .summary{color:#444;margin:.2em 0 .4em}
.qtoy-av .note,.qtoy-av .hint{font-size:.85em;color:#666;margin:.2em 0}
.qtoy-av .legend{border:1px solid #dde1e6;background:#fff;border-radius:6px;padding:6px 10px;margin:.5em 0;font-size:.88em}
.qtoy-av .scale-label{display:block;color:#333;margin-bottom:4px}
.qtoy-av .ramp-row{display:flex;align-items:center;gap:8px;font-variant-numeric:tabular-nums}
.qtoy-av .ramp{display:inline-block;width:240px;height:12px;border:1px solid #bbb}
.qtoy-av .text{white-space:pre-wrap;word-wrap:break-word;font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;
  font-size:15px;line-height:2;border:1px solid #ddd;border-radius:6px;padding:10px 12px;background:#fff;margin:.5em 0}
.qtoy-av .tok{white-space:pre;border:1px solid rgba(0,0,0,.12);border-radius:3px;padding:1px 1px;margin:0 1px;cursor:default}
.qtoy-av .tok.future{color:#bbb;border-color:rgba(0,0,0,.05)}
.qtoy-av .tok.query{outline:2px solid #e0a100;outline-offset:1px}
.qtoy-av .main{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}
.qtoy-av .heads{display:flex;flex-direction:column;gap:6px}
.qtoy-av .layer-row{display:flex;align-items:center;gap:6px;flex-wrap:wrap}
.qtoy-av .layer-name{width:70px;font-size:.8em;color:#555}
.qtoy-av .head{display:flex;flex-direction:column;align-items:center;font-size:.75em;color:#444;cursor:pointer;
  border:2px solid transparent;border-radius:4px;padding:2px}
.qtoy-av .head.selected{border-color:#1f5fbf;background:#eef3fb}
.qtoy-av .head canvas{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc;background:#fff}
.qtoy-av .detail{min-width:320px;flex:1;background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px 12px;font-size:.9em}
.qtoy-av .detail h2{font-size:1em;margin:.1em 0 .4em}
.qtoy-av .detail table{border-collapse:collapse}
.qtoy-av .detail td,.qtoy-av .detail th{padding:1px 8px;border-bottom:1px solid #eef0f3;text-align:left}
.qtoy-av .detail td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,"DejaVu Sans Mono",monospace}
.qtoy-av .detail code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;background:#f2f2f2;padding:0 3px;border-radius:3px}
.qtoy-av .sw{display:inline-block;width:14px;height:12px;border:1px solid #ccc;vertical-align:middle}
"""

_JS = r"""
(function(){
  var root=document.getElementById("%ID%"); if(!root) return;
  var D=JSON.parse(root.querySelector(".av-data").textContent);
  var toks=root.querySelectorAll(".tok"), T=D.tokens.length;
  var st={layer:0, head:0, query:T-1, row:false};
  function top(L,H){return L.kind==="probability"?1:H.vmax;}
  function rowTop(row){var m=0; row.forEach(function(v){m=Math.max(m,Math.abs(v));}); return m;}
  function color(v,kind,vmax){
    var t=vmax>0?Math.max(-1,Math.min(1,v/vmax)):0; if(kind!=="signed") t=Math.max(0,t);
    var c=t>=0?D.blue:D.red, a=Math.abs(t);
    return "rgb("+Math.round(255+a*(c[0]-255))+", "+Math.round(255+a*(c[1]-255))+", "+Math.round(255+a*(c[2]-255))+")";
  }
  function fmt(v){ if(v===0) return "0"; var a=Math.abs(v); return (a>=1e-3&&a<1e5)?String(Number(v.toPrecision(4))):v.toExponential(3); }
  function esc(s){return s.replace(/&/g,"&amp;").replace(/</g,"&lt;").replace(/>/g,"&gt;");}
  var heads=root.querySelector(".heads"), canvases=[];
  D.layers.forEach(function(L,l){
    var row=document.createElement("div"); row.className="layer-row";
    row.innerHTML='<span class="layer-name">layer '+l+'<br>'+L.kind+'</span>'; canvases.push([]);
    L.heads.forEach(function(H,h){
      var box=document.createElement("div"); box.className="head"; box.dataset.layer=l; box.dataset.head=h;
      box.title="layer "+l+" head "+h+" ("+L.kind+", max |entry| "+fmt(H.vmax)+")";
      var cv=document.createElement("canvas"); cv.width=T; cv.height=T; box.appendChild(cv);
      var cap=document.createElement("span"); cap.textContent="L"+l+"H"+h; box.appendChild(cap);
      box.addEventListener("click",function(){st.layer=l; st.head=h; render();});
      row.appendChild(box); canvases[l].push(cv);
      var ctx=cv.getContext("2d"), img=ctx.createImageData(T,T), vm=top(L,H);
      for(var q=0;q<T;q++) for(var k=0;k<T;k++){
        var i=4*(q*T+k), c=k<=q?color(H.rows[q][k],L.kind,vm):"rgb(238, 238, 238)";
        var m=/(\d+), (\d+), (\d+)/.exec(c); img.data[i]=+m[1]; img.data[i+1]=+m[2]; img.data[i+2]=+m[3]; img.data[i+3]=255;
      }
      cv._img=img;
    });
    heads.appendChild(row);
  });
  function render(){
    var L=D.layers[st.layer], H=L.heads[st.head], q=st.query, row=H.rows[q];
    var vm=st.row?rowTop(row):top(L,H);
    root.querySelector(".scale-label").textContent="Layer "+st.layer+" \u2014 "+L.label+"."+
      (st.row?" Colours relative to this query\u2019s row: its largest |weight| is the end of the scale.":"");
    root.querySelector(".ramp").style.background=L.kind==="signed"?
      "linear-gradient(to right,"+color(-1,"signed",1)+",#fff,"+color(1,"signed",1)+")":
      "linear-gradient(to right,#fff,"+color(1,"probability",1)+")";
    root.querySelector(".lo").textContent=L.kind==="signed"?fmt(-vm):"0";
    root.querySelector(".hi").textContent=fmt(vm);
    toks.forEach(function(el,k){
      el.classList.toggle("query",k===q); el.classList.toggle("future",k>q);
      el.style.background=k<=q?color(row[k],L.kind,vm):"";
      el.dataset.weight=k<=q?String(row[k]):"";
    });
    root.querySelectorAll(".head").forEach(function(b){
      b.classList.toggle("selected",+b.dataset.layer===st.layer&&+b.dataset.head===st.head);});
    canvases.forEach(function(cs){cs.forEach(function(cv){
      var ctx=cv.getContext("2d"); ctx.putImageData(cv._img,0,0);
      ctx.fillStyle="rgba(224,161,0,0.55)"; ctx.fillRect(0,q,T,1);});});
    var sum=0; row.forEach(function(v){sum+=v;});
    var rows=row.map(function(v,k){
      return '<tr class="key" data-key="'+k+'" data-weight="'+v+'"><td class="num">'+k+'</td><td><code>'+esc(D.tokens[k])+
        '</code></td><td><span class="sw" style="background:'+color(v,L.kind,vm)+'"></span></td><td class="num w">'+fmt(v)+'</td></tr>';});
    var what=L.kind==="probability"?"probability":"weight";
    root.querySelector(".detail").innerHTML='<h2>Layer '+st.layer+', head '+st.head+' \u00b7 query '+q+
      ' <code>'+esc(D.tokens[q])+'</code></h2><div class="rowsum">row sum '+fmt(sum)+
      (L.kind==="probability"?" (probabilities)":" (not normalised)")+'</div>'+
      '<table><thead><tr><th>key</th><th>token</th><th></th><th>'+what+'</th></tr></thead><tbody>'+rows.join("")+'</tbody></table>';
  }
  var rs=root.querySelector(".row-scale");
  if(rs) rs.addEventListener("change",function(){st.row=rs.checked; render();});
  toks.forEach(function(el,k){
    el.addEventListener("mouseenter",function(){st.query=k; render();});
    el.addEventListener("focus",function(){st.query=k; render();});
  });
  var h=window.location.hash||"", m;
  if((m=/layer=(\d+)/.exec(h))&&+m[1]<D.layers.length) st.layer=+m[1];
  if((m=/head=(\d+)/.exec(h))&&+m[1]<D.layers[st.layer].heads.length) st.head=+m[1];
  if((m=/query=(\d+)/.exec(h))&&+m[1]<T) st.query=+m[1];
  render();
})();
"""
