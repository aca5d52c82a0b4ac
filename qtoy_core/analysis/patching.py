"""Activation patching: run the corrupted prompt, put back one clean activation, measure how much of
the clean behaviour returns. Function names and result axes are TransformerLens's
(``transformer_lens.patching``).

    from qtoy_core.analysis.patching import activation_patching, logit_diff_metric, patching_html
    results = activation_patching(model, clean, corrupted, answer=7, wrong=9)   # dict kind -> PatchResult
    results["resid_pre"].values            # (layer, pos) logit diff with the clean resid_pre patched in
    results["resid_pre"].normalized()      # 0 = corrupted run, 1 = clean run
    open("patch.html", "w").write(patching_html(results, tokens=[...]))

Each ``get_act_patch_*`` takes ``(model, corrupted_tokens, clean_cache, patching_metric)`` like TL's:
``clean_cache`` from ``model.run_with_cache(clean_tokens)``, ``patching_metric(logits) -> scalar``.

  get_act_patch_resid_pre / _resid_mid / _attn_out / _mlp_out   dims (layer, pos)
  get_act_patch_attn_head_out_by_pos     hook_z[:, pos, head]     dims (layer, pos, head)
  get_act_patch_attn_head_out_all_pos    hook_z[:, :, head]       dims (layer, head)
  get_act_patch_attn_head_q/k/v_all_pos  hook_q/k/v[:, :, head]   dims (layer, head) (q, k before the rotation,
                                                                  which is the same for both prompts)
  get_act_patch_attn_head_pattern_all_pos  hook_pattern[:, head]  dims (layer, head)

Patching a head's z patches its output z_h W_O[h] (TL does the same). Clean and corrupted prompts
must have the same length (a position means the same slot in both).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from qtoy_registry import QtoyError

from .cache import ActivationCache, hook_names

__all__ = ["PatchResult", "PatchingError", "activation_patching", "get_act_patch_attn_head_k_all_pos",
           "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_out_by_pos",
           "get_act_patch_attn_head_pattern_all_pos", "get_act_patch_attn_head_q_all_pos",
           "get_act_patch_attn_head_v_all_pos", "get_act_patch_attn_out", "get_act_patch_mlp_out",
           "get_act_patch_resid_mid", "get_act_patch_resid_pre", "logit_diff_metric", "loss_metric",
           "patching_html", "PATCH_KINDS"]


class PatchingError(QtoyError, ValueError):
    """Patching inputs that do not fit (prompts of different lengths, tokens out of the vocabulary...)."""


@dataclass
class PatchResult:
    """A patching scan's metric values with named axes.

    ``values``: a tensor whose axes are ``dims`` (e.g. ("layer", "pos")); ``labels[dim]`` names each
    index along that axis ("L0", "3", "H1"). ``clean`` / ``corrupted``: the metric on the unpatched
    clean and corrupted runs, so `normalized()` is 0 where patching did nothing and 1 where it
    restored the clean value.
    """

    kind: str
    values: Tensor
    dims: tuple[str, ...]
    labels: dict[str, list[str]]
    metric: str
    clean: float
    corrupted: float
    hook: str = ""

    def normalized(self) -> Tensor:
        span = self.clean - self.corrupted
        if span == 0:
            raise PatchingError(f"the metric is {self.clean:.4g} on both the clean and the corrupted prompt, so "
                                f"there is nothing to restore: choose prompts (or answer tokens) the model tells apart")
        return (self.values - self.corrupted) / span

    def to_dict(self) -> dict:
        return {"kind": self.kind, "hook": self.hook, "dims": list(self.dims), "labels": self.labels,
                "metric": self.metric, "clean": self.clean, "corrupted": self.corrupted,
                "values": self.values.tolist()}

    def _repr_html_(self) -> str:
        return patching_html({self.kind: self}, fragment=True)


# -- metrics -------------------------------------------------------------------------------------
def logit_diff_metric(answer: int | Tensor, wrong: int | Tensor, position: int = -1) -> Callable[[Tensor], Tensor]:
    """``logits -> mean over the batch of logits[:, position, answer] - logits[:, position, wrong]``;
    answer / wrong: a token id or one per batch row."""
    def logit_diff(logits: Tensor) -> Tensor:
        last = logits[:, position]
        a = torch.as_tensor(answer, device=last.device).reshape(-1, 1).expand(last.shape[0], 1)
        w = torch.as_tensor(wrong, device=last.device).reshape(-1, 1).expand(last.shape[0], 1)
        return (last.gather(1, a) - last.gather(1, w)).mean()

    return logit_diff


def loss_metric(tokens: Tensor) -> Callable[[Tensor], Tensor]:
    """``logits -> mean next-token loss of tokens`` (predicting tokens[:, 1:] from logits[:, :-1])."""
    from ..model import cross_entropy

    def loss(logits: Tensor) -> Tensor:
        return cross_entropy(logits[:, :-1], tokens[:, 1:])

    return loss


# -- the scans -------------------------------------------------------------------------------------
def _check(model: nn.Module, corrupted: Tensor, clean_cache: ActivationCache, names: list[str]) -> None:
    if not isinstance(corrupted, Tensor) or corrupted.dim() != 2:
        raise PatchingError("corrupted_tokens must be a (batch, pos) token tensor")
    for name in names:
        if name not in clean_cache:
            have = set(hook_names(model))
            why = "this model has no such hook point" if name not in have else "the clean cache did not record it"
            raise PatchingError(f"cannot patch {name}: {why} (run_with_cache(clean_tokens) records every hook point)")
        t = clean_cache[name]
        pos_axis = 2 if name.endswith("hook_pattern") else 1
        if t.shape[0] != corrupted.shape[0] or t.shape[pos_axis] != corrupted.shape[1]:
            raise PatchingError(
                f"the clean cache is for tokens of shape ({t.shape[0]}, {t.shape[pos_axis]}), the corrupted tokens "
                f"are {tuple(corrupted.shape)}: activation patching needs clean and corrupted prompts of the same "
                f"length and batch size (pad or reword one of them so that positions line up)")


def _scan(model: nn.Module, corrupted: Tensor, clean_cache: ActivationCache, metric: Callable[[Tensor], Tensor],
          kind: str, hook: Callable[[int], str], dims: tuple[str, ...],
          selections: Callable[[int, Tensor], list[tuple[tuple[int, ...], tuple]]], sizes: Callable[[Tensor], tuple],
          metric_name: str = "metric", clean_value: float | None = None) -> PatchResult:
    n_layers = len(model.blocks)
    names = [hook(i) for i in range(n_layers)]
    _check(model, corrupted, clean_cache, names)
    shape = (n_layers, *sizes(clean_cache[names[0]]))
    values = torch.zeros(shape)
    with torch.no_grad():
        corrupted_value = float(metric(model(corrupted)))
        for layer, name in enumerate(names):
            clean = clean_cache[name]
            for coords, sel in selections(layer, clean):
                def patch(act: Tensor, hook: Any, sel: tuple = sel, clean: Tensor = clean) -> Tensor:
                    act = act.clone()
                    act[sel] = clean[sel].to(act.device, act.dtype)
                    return act

                values[(layer, *coords)] = float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])))
    labels = {"layer": [f"L{i}" for i in range(n_layers)]}
    for d, n in zip(dims[1:], shape[1:]):
        labels[d] = [f"H{i}" for i in range(n)] if d == "head" else [str(i) for i in range(n)]
    if clean_value is None:
        clean_value = _clean_value(model, corrupted, clean_cache, metric)
    return PatchResult(kind, values, dims, labels, metric_name, clean_value, corrupted_value,
                       hook=names[0].replace("blocks.0.", "blocks.{layer}."))


def _clean_value(model: nn.Module, corrupted: Tensor, clean_cache: ActivationCache, metric: Callable) -> float:
    """The metric on the clean run, from the cache alone: tokens enter only through the residual
    stream before block 0, so replacing all of it with the clean one replays the clean forward."""
    if "blocks.0.hook_resid_pre" not in clean_cache:
        return float("nan")
    whole = clean_cache["blocks.0.hook_resid_pre"]
    with torch.no_grad():
        logits = model.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: whole)])
        return float(metric(logits))


def _by_pos(name: str, kind: str):
    def fn(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
        """Patch the clean activation at each (layer, position): dims (layer, pos)."""
        return _scan(model, corrupted_tokens, clean_cache, patching_metric, kind, lambda i: f"blocks.{i}.{name}",
                     ("layer", "pos"), lambda layer, t: [((p,), (slice(None), p)) for p in range(t.shape[1])],
                     lambda t: (t.shape[1],), **kw)

    fn.__name__ = f"get_act_patch_{kind}"
    return fn


get_act_patch_resid_pre = _by_pos("hook_resid_pre", "resid_pre")
get_act_patch_resid_mid = _by_pos("hook_resid_mid", "resid_mid")
get_act_patch_attn_out = _by_pos("hook_attn_out", "attn_out")
get_act_patch_mlp_out = _by_pos("hook_mlp_out", "mlp_out")


def get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
    """Patch each head's z at each position: dims (layer, pos, head)."""
    return _scan(model, corrupted_tokens, clean_cache, patching_metric, "head_out_by_pos",
                 lambda i: f"blocks.{i}.attn.hook_z", ("layer", "pos", "head"),
                 lambda layer, t: [((p, h), (slice(None), p, h)) for p in range(t.shape[1]) for h in range(t.shape[2])],
                 lambda t: (t.shape[1], t.shape[2]), **kw)


def _head_all_pos(name: str, kind: str, head_axis: int):
    def fn(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> PatchResult:
        return _scan(model, corrupted_tokens, clean_cache, patching_metric, kind, lambda i: f"blocks.{i}.attn.{name}",
                     ("layer", "head"),
                     lambda layer, t: [((h,), (slice(None),) * head_axis + (h,)) for h in range(t.shape[head_axis])],
                     lambda t: (t.shape[head_axis],), **kw)

    fn.__name__ = f"get_act_patch_attn_head_{kind.removeprefix('head_')}_all_pos"
    fn.__doc__ = f"Patch each head's {name} at every position at once: dims (layer, head)."
    return fn


get_act_patch_attn_head_out_all_pos = _head_all_pos("hook_z", "head_out", 2)
get_act_patch_attn_head_q_all_pos = _head_all_pos("hook_q", "head_q", 2)
get_act_patch_attn_head_k_all_pos = _head_all_pos("hook_k", "head_k", 2)
get_act_patch_attn_head_v_all_pos = _head_all_pos("hook_v", "head_v", 2)
get_act_patch_attn_head_pattern_all_pos = _head_all_pos("hook_pattern", "head_pattern", 1)

PATCH_KINDS: dict[str, Callable[..., PatchResult]] = {
    "resid_pre": get_act_patch_resid_pre,
    "attn_out": get_act_patch_attn_out,
    "mlp_out": get_act_patch_mlp_out,
    "head_out_by_pos": get_act_patch_attn_head_out_by_pos,
    "head_out": get_act_patch_attn_head_out_all_pos,
    "head_q": get_act_patch_attn_head_q_all_pos,
    "head_k": get_act_patch_attn_head_k_all_pos,
    "head_v": get_act_patch_attn_head_v_all_pos,
    "head_pattern": get_act_patch_attn_head_pattern_all_pos,
}
DEFAULT_KINDS = ("resid_pre", "head_out_by_pos", "head_q", "head_k", "head_v", "head_pattern")


def activation_patching(model: nn.Module, clean_tokens: Tensor, corrupted_tokens: Tensor, *,
                        answer: int | Tensor | None = None, wrong: int | Tensor | None = None,
                        metric: str | Callable[[Tensor], Tensor] = "logit_diff", position: int = -1,
                        kinds: Sequence[str] = DEFAULT_KINDS) -> dict[str, PatchResult]:
    """Every patching scan in ``kinds`` (see `PATCH_KINDS`) from clean into corrupted, as a dict.

    ``metric``: "logit_diff" (logit of ``answer`` minus ``wrong`` at ``position``), "loss" (the
    next-token loss of the *clean* tokens: how well the patched run predicts the clean text), or a
    function logits -> scalar. A model without MLPs skips "mlp_out".
    """
    clean_tokens, corrupted_tokens = torch.as_tensor(clean_tokens), torch.as_tensor(corrupted_tokens)
    if clean_tokens.dim() == 1:
        clean_tokens = clean_tokens[None]
    if corrupted_tokens.dim() == 1:
        corrupted_tokens = corrupted_tokens[None]
    if clean_tokens.shape != corrupted_tokens.shape:
        raise PatchingError(
            f"the clean prompt has {clean_tokens.shape[-1]} tokens and the corrupted one {corrupted_tokens.shape[-1]} "
            f"(shapes {tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}): activation patching puts each "
            f"position's clean activation into the same position of the corrupted run, so both prompts must have the "
            f"same length in tokens; reword one (e.g. swap a name for a name of the same token length)")
    vocab = model.unembed.weight.shape[0]
    for what, t in (("clean", clean_tokens), ("corrupted", corrupted_tokens), ("answer", answer), ("wrong", wrong)):
        if t is not None:
            t = torch.as_tensor(t)
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
                raise PatchingError(f"the {what} token ids must be in 0..{vocab - 1} (the model's vocabulary), got "
                                    f"{int(t.min())}..{int(t.max())}")
    unknown = [k for k in kinds if k not in PATCH_KINDS]
    if unknown:
        raise PatchingError(f"unknown patching kind(s) {unknown}: choose from {', '.join(PATCH_KINDS)}")
    if callable(metric):
        metric_fn, metric_name = metric, getattr(metric, "__name__", "metric")
    elif metric == "logit_diff":
        if answer is None or wrong is None:
            raise PatchingError("the logit_diff metric needs answer= and wrong= token ids")
        metric_fn, metric_name = logit_diff_metric(answer, wrong, position), "logit_diff"
    elif metric == "loss":
        metric_fn, metric_name = loss_metric(clean_tokens), "loss"
    else:
        raise PatchingError(f"metric must be 'logit_diff', 'loss' or a function of the logits, not {metric!r}")
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    clean_value = float(metric_fn(clean_logits))
    has_mlp = any(getattr(b, "has_mlp", False) for b in model.blocks)
    return {k: PATCH_KINDS[k](model, corrupted_tokens, clean_cache, metric_fn, metric_name=metric_name,
                              clean_value=clean_value)
            for k in kinds if has_mlp or k != "mlp_out"}


# -- the HTML view ---------------------------------------------------------------------------------
_CSS = """
.qtoy-patch{max-width:1120px;margin:0 auto;padding:18px 26px 40px;color:#1d1d1f;font-size:14px;line-height:1.45;
  font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
.qtoy-patch h1{font-size:1.55em;margin:.2em 0 .1em}
.qtoy-patch h2{font-size:1.15em;margin:0 0 .4em;padding-bottom:.2em;border-bottom:2px solid #e2e5ea}
.qtoy-patch section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:14px 18px;margin:14px 0;
  overflow-x:auto}
.qtoy-patch .sub{color:#555;margin-bottom:.6em}
.qtoy-patch table.heat{border-collapse:collapse;font-size:12px;font-variant-numeric:tabular-nums}
.qtoy-patch table.heat th{font-weight:600;padding:2px 6px;color:#444;white-space:nowrap}
.qtoy-patch table.heat td{width:46px;height:26px;text-align:center;border:1px solid #fff;padding:0 2px}
.qtoy-patch .legend{font-size:12px;color:#555;margin:.3em 0}
.qtoy-patch .sw{display:inline-block;width:14px;height:12px;vertical-align:middle;margin:0 3px}
"""


def _color(x: float) -> str:
    """Diverging: 0 white, +1 full red (clean restored), -1 full blue; clipped beyond."""
    if not math.isfinite(x):
        return "#ddd"
    a = min(abs(x), 1.0)
    g = round(255 * (1 - a))
    return f"rgb(255,{g},{g})" if x >= 0 else f"rgb({g},{g},255)"


def _table(values: Tensor, rows: list[str], cols: list[str], raw: Tensor) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    body = []
    for i, r in enumerate(rows):
        cells = "".join(
            f'<td style="background:{_color(float(values[i, j]))}" title="{html.escape(r)} {html.escape(cols[j])}: '
            f'{float(raw[i, j]):.4g} (normalised {float(values[i, j]):.3f})">{float(values[i, j]):.2f}</td>'
            for j in range(len(cols)))
        body.append(f"<tr><th>{html.escape(r)}</th>{cells}</tr>")
    return f'<table class="heat">{head}{"".join(body)}</table>'


def patching_html(results: dict[str, PatchResult] | PatchResult, *, tokens: Sequence[str] | None = None,
                  title: str = "Activation patching", fragment: bool = False, note: str = "") -> str:
    """One self-contained offline HTML page (or a fragment for notebooks) with a heat map per scan:
    the normalised metric, 0 = the corrupted run (white), 1 = the clean run (red), negative blue.
    ``tokens``: the clean prompt's token texts, to label positions. Hover a cell for the raw value."""
    if isinstance(results, PatchResult):
        results = {results.kind: results}
    sections = []
    for kind, r in results.items():
        try:
            norm = r.normalized()
        except PatchingError:
            norm = torch.zeros_like(r.values)
        labels = dict(r.labels)
        if tokens is not None and "pos" in labels:
            labels["pos"] = [f"{p} {t}" for p, t in zip(labels["pos"], tokens)]
        if r.dims == ("layer", "pos", "head"):
            tables = "".join(f"<h3>{html.escape(labels['layer'][l])}</h3>"
                             + _table(norm[l].T, labels["head"], labels["pos"], r.values[l].T)
                             for l in range(norm.shape[0]))
        else:
            tables = _table(norm, labels[r.dims[0]], labels[r.dims[1]], r.values)
        sections.append(
            f"<section><h2>{html.escape(kind)}</h2><div class='sub'>patched hook: <code>{html.escape(r.hook)}</code>; "
            f"axes {' × '.join(r.dims)}; {html.escape(r.metric)}: clean {r.clean:.4g}, corrupted {r.corrupted:.4g}</div>"
            f"{tables}</section>")
    legend = ("<div class='legend'>cell = (patched − corrupted) / (clean − corrupted) of the metric:"
              "<span class='sw' style='background:rgb(255,0,0)'></span>1 clean restored"
              "<span class='sw' style='background:#fff;border:1px solid #ccc'></span>0 no effect"
              "<span class='sw' style='background:rgb(0,0,255)'></span>−1 (clipped at ±1; hover for the raw value)</div>")
    intro = f"<h1>{html.escape(title)}</h1>{legend}" + (f"<div class='sub'>{html.escape(note)}</div>" if note else "")
    body = f"<div class='qtoy-patch'>{intro}{''.join(sections)}</div>"
    if fragment:
        return f"<style>{_CSS}</style>{body}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>body{{margin:0;background:#f6f7f9}}{_CSS}</style></head><body>{body}</body></html>\n")
