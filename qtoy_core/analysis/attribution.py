"""Exact logit attribution, and the path expansion of polynomial attention.

    from qtoy_core.analysis.attribution import logit_attribution, path_expansion, top_paths
    attr = logit_attribution(model, tokens, target=answer_id, position=-1)
    attr.top(5)                           # [(label, logit contribution), ...] largest |value| first
    attr.parts.sum(0) == attr.logits      # exact (no norm); float64 to ~1e-15 relative
    exp = path_expansion(model, tokens, layer=1, head=0, position=-1, target=answer_id)
    exp.top(5)                            # [PathGroup(name="L0H2 -> K of L1H0 (induction)", value=...), ...]

**Logit attribution.** The residual stream entering the unembedding is a sum of what was written
into it: the token embedding (``hook_embed``), the learned positional embedding
(``hook_pos_embed``, when the positional adds one), each head of each layer (``hook_result``,
(batch, pos, head, d_model)), each attention layer's output bias (``hook_attn_out`` minus the sum
of its heads), each MLP (``hook_mlp_out``, biases included). Without a final norm the logits are
linear in that stream, so ``logits = sum_parts part @ W_U`` exactly. With a final norm that scales
each position (RMSNorm: ``y = g * x / rms(x)``), the scale is frozen at its value on this input
(read off the norm's own output, so any per-position scaling norm works) and the result is
labelled ``approximate``: the parts still sum to the logit, but a part's share depends on the
others through the frozen scale (TransformerLens' ``apply_ln_to_stack`` does the same). The parts
come from hook points and weight views only; no component is recognised by its name.

**Path expansion** (`path_expansion`). For an attention whose pattern is a product of scaled QK
forms (``weight_views()["pattern"] == "product"``: quadratic attention is ``(scale q.k)^2``,
bilinear ``(scale q1.k1)(scale q2.k2)``) and whose layer has no norm in front of it, a head's
output is a polynomial in the residual parts feeding the layer. With ``q = sum_s q_s``,
``k = sum_s k_s``, ``v = sum_s v_s`` over those sources ``s`` (plus the projections' biases as one
more source), the output at query position ``i`` is exactly

    sum_{e, (a_1, b_1), ..., (a_F, b_F)}  sum_{j <= i} prod_f (scale_f q^f_{a_f, i} . k^f_{b_f, j})  v_{e, j} W_O

one term per value source ``e`` and (query source, key source) pair of each of the F factors
(RoPE rotates each source's q and k: it is linear per position). `PathExpansion.terms` holds every
term; `PathExpansion.groups` sums them by (value source, multiset of query sources, multiset of
key sources), which names the compositions: an earlier head in the key is K-composition, in the
query Q-composition, in the value V-composition. For a two-layer model this is the full path
expansion of the second layer's heads. A softmax pattern is not a polynomial and has no such
expansion; an RMSNorm in front of the layer makes it inexact: both are refused with an
`AttributionError`.

Cost: ``n_src^(2F + 1)`` terms per query position (``n_src`` = 2 + n_head * layer + ...), each
a contraction over the keys: see ``benchmarks/attribution_scaling.py`` and docs/analysis.md.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from qtoy_registry import QtoyError

from .circuits import Result
from .weights import _gain, _is_identity, component_views

__all__ = ["AttributionError", "LogitAttribution", "PathExpansion", "PathGroup", "ResidualParts",
           "PREVIOUS_TOKEN_SHARE", "logit_attribution", "path_expansion", "residual_parts", "top_paths"]

#: An earlier head whose pattern puts at least this share of each row's |weight| (mean over query
#: positions >= 1) on the previous token counts as a previous-token head when paths are named: a
#: K-composition path from it with direct query and value is named "(induction)".
PREVIOUS_TOKEN_SHARE = 0.5

_DIRECT_KINDS = ("embed", "pos", "bias")


class AttributionError(QtoyError, ValueError):
    """An attribution or path expansion that cannot be computed for this model or input."""


# ------------------------------------------------------------------------------ residual parts
@dataclass
class ResidualParts:
    """What was written into the residual stream before block ``layer`` (``layer == n_layers``: the
    final stream), in execution order. ``parts``: (n_parts, batch, pos, d_model); ``kinds``: "embed",
    "pos", "head", "attn_bias", "attn" (a whole attention layer without per-head results), "mlp"."""

    layer: int
    labels: list[str]
    kinds: list[str]
    layers: list[int | None]
    heads: list[int | None]
    parts: Tensor


def _hook_names(model: nn.Module, layer: int) -> set[str]:
    names = {"hook_embed", "hook_pos_embed"}
    for i in range(layer):
        names |= {f"blocks.{i}.attn.hook_result", f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"}
    if layer > 0:
        names.add(f"blocks.{layer - 1}.hook_resid_post")
    if layer < len(model.blocks):
        names.add(f"blocks.{layer}.hook_resid_pre")
    return names


def _stream(cache: dict[str, Tensor], layer: int, n_layers: int) -> Tensor:
    if layer < n_layers:
        return cache[f"blocks.{layer}.hook_resid_pre"]
    return cache[f"blocks.{layer - 1}.hook_resid_post"]


def residual_parts(model: nn.Module, cache: dict[str, Tensor], layer: int | None = None) -> ResidualParts:
    """The parts of the residual stream entering block ``layer`` (default: the final stream) from a
    `run_with_cache` cache that holds the hooks they need (see `logit_attribution`). Checks that they
    sum to the stream the model computed; an `AttributionError` says what is off when they do not."""
    n_layers = len(model.blocks)
    layer = n_layers if layer is None else layer
    embed = cache["hook_embed"]
    B, T, d = embed.shape
    labels, kinds, layers, heads, parts = ["embed"], ["embed"], [None], [None], [embed]
    if "hook_pos_embed" in cache:
        labels.append("pos_embed"), kinds.append("pos"), layers.append(None), heads.append(None)
        parts.append(cache["hook_pos_embed"].expand(B, T, d))
    for i in range(layer):
        block = model.blocks[i]
        attn_out = cache[f"blocks.{i}.hook_attn_out"]
        result = cache.get(f"blocks.{i}.attn.hook_result")  # (batch, pos, head, d_model)
        if result is not None:
            for h in range(result.shape[2]):
                labels.append(f"L{i}H{h}"), kinds.append("head"), layers.append(i), heads.append(h)
                parts.append(result[:, :, h])
            if "b_O" in component_views(block.attn):
                labels.append(f"L{i} attn bias"), kinds.append("attn_bias"), layers.append(i), heads.append(None)
                parts.append(attn_out - result.sum(2))
        else:
            labels.append(f"L{i} attn"), kinds.append("attn"), layers.append(i), heads.append(None)
            parts.append(attn_out)
        mlp_out = cache.get(f"blocks.{i}.hook_mlp_out")
        if mlp_out is not None:
            labels.append(f"L{i} mlp"), kinds.append("mlp"), layers.append(i), heads.append(None)
            parts.append(mlp_out)
    stacked = torch.stack(parts)
    stream = _stream(cache, layer, n_layers)
    err = float((stacked.sum(0) - stream).abs().max())
    scale = float(stream.abs().max()) or 1.0
    if err > 1e3 * torch.finfo(stream.dtype).eps * scale * len(parts):
        raise AttributionError(
            f"the parts written into the residual stream (embedding, positions, heads, MLPs) do not add up to "
            f"the stream entering block {layer} (max error {err:.3g} at scale {scale:.3g}). Run the model in eval "
            f"mode (model.eval(): dropout off); a component that writes to the residual outside its hook points "
            f"cannot be attributed.")
    return ResidualParts(layer, labels, kinds, layers, heads, stacked)


# ------------------------------------------------------------------------------- attribution
@dataclass
class LogitAttribution(Result):
    """The logits split into the parts of the residual stream that wrote them.

    ``parts``: (n_parts, batch, *pos, *target): each part's contribution to the logit(s), where the
    position axis is dropped for an int ``position`` and the target axis is the vocabulary (target
    None), dropped (an int target, or one target per position) or the listed targets. ``logits``:
    the model's logits there, which ``parts.sum(0)`` equals (exactly without a final norm; with one,
    with its scale frozen at this input: ``approximate``). ``labels``/``kinds``/``layers``/``heads``
    name the parts (see `ResidualParts`; a constant "unembed bias" part when the unembedding has one).
    """

    labels: list[str]
    kinds: list[str]
    layers: list[int | None]
    heads: list[int | None]
    parts: Tensor
    logits: Tensor
    target: Any
    position: int | None
    approximate: bool
    note: str = ""

    def total(self) -> Tensor:
        return self.parts.sum(0)

    def top(self, k: int = 10, *, batch: int = 0) -> list[tuple[str, float]]:
        """The ``k`` parts with the largest |contribution| for one prediction (an int ``position`` and
        a single target), as (label, value)."""
        vals = self.parts[:, batch]
        if vals.ndim != 1:
            raise AttributionError(
                f"top() ranks the parts of one prediction, but this attribution has {tuple(vals.shape[1:])} "
                f"values per part: call logit_attribution with an int position and a single target token.")
        order = vals.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(vals[i])) for i in order.tolist()]


def _frozen_final_scale(model: nn.Module, stream: Tensor) -> tuple[Tensor, bool]:
    """(per-position factor (batch, pos, d_model) that ln_final applies, approximate?).

    The identity for no final norm. Otherwise the norm must scale each position by one number (and
    a per-dimension gain): ``ln_final(x) = s * g * x``; ``s`` is read off its output on ``stream``."""
    norm = getattr(model, "ln_final", None)
    if _is_identity(norm):
        return torch.ones_like(stream[..., :1]), False
    with torch.no_grad():
        y = norm(stream)
    g = _gain(norm, stream.shape[-1])
    gx = stream * (g.to(stream.dtype) if g is not None else 1.0)
    s = (y * gx).sum(-1, keepdim=True) / (gx * gx).sum(-1, keepdim=True).clamp_min(torch.finfo(stream.dtype).tiny)
    err = float((s * gx - y).abs().max())
    if err > 1e-4 * (float(y.abs().max()) or 1.0):
        raise AttributionError(
            f"the final norm ({type(norm).__name__}) is not a per-position scaling of its input (times a gain), so "
            f"its effect cannot be frozen into a linear map: logit attribution supports no norm or RMSNorm-like "
            f"norms. Train without a norm (--norm none) for exact attribution.")
    return s * (g.to(stream.dtype) if g is not None else 1.0), True


def _check_tokens(model: nn.Module, tokens: Tensor) -> Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[1] == 0:
        raise AttributionError(f"tokens must be a (batch, pos) or (pos,) integer tensor with at least one position, "
                               f"got shape {tuple(tokens.shape)} and dtype {tokens.dtype}.")
    vocab = model.config.vocab_size
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise AttributionError(f"token ids must lie in [0, {vocab}) for this model's vocabulary, got "
                               f"{int(tokens.min())}..{int(tokens.max())}.")
    return tokens.long()


def _check_position(position: int | None, T: int) -> int | None:
    if position is None:
        return None
    if not -T <= int(position) < T:
        raise AttributionError(f"position {position} is out of range for an input of {T} tokens: use 0..{T - 1} "
                               f"(or -1 for the last token).")
    return int(position) % T


def _targets(model: nn.Module, target: Any) -> tuple[Tensor | None, str]:
    """(token ids tensor or None, kind): kind "all", "one", "list" or "per_position"."""
    vocab = model.config.vocab_size
    if target is None:
        return None, "all"
    t = torch.as_tensor(target)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise AttributionError(f"target must be token ids (an int, a list of ints, or one id per position), "
                               f"got {target!r}.")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        bad = int(t.max()) if int(t.max()) >= vocab else int(t.min())
        raise AttributionError(f"target token {bad} is not in the vocabulary (ids 0..{vocab - 1}): pass a token id "
                               f"of this model's tokenizer.")
    kind = "one" if t.ndim == 0 else ("list" if t.ndim == 1 else "per_position")
    return t.long(), kind


@torch.no_grad()
def logit_attribution(model: nn.Module, tokens: Tensor, target: Any = None, position: int | None = None, *,
                      doc_ids: Tensor | None = None) -> LogitAttribution:
    """Split the logits of ``model`` on ``tokens`` into the parts of the residual stream (see the
    module docstring): ``parts.sum(0) == logits``.

    tokens: (batch, pos) or (pos,) ids. target: None (every vocabulary logit), a token id, a list of
    ids, or a (batch, pos) tensor of one id per position (e.g. the next tokens). position: None
    (all) or one position (negative counts from the end), which drops that axis. doc_ids: each
    token's document (`ToyTransformer.forward`; a doc_mask model finds them itself).
    """
    tokens = _check_tokens(model, tokens)
    B, T = tokens.shape
    pos = _check_position(position, T)
    ids, kind = _targets(model, target)
    if kind == "per_position" and tuple(ids.shape) != (B, T):
        raise AttributionError(f"a per-position target must have the tokens' shape {(B, T)}, got {tuple(ids.shape)}.")
    n_layers = len(model.blocks)
    logits, cache = model.run_with_cache(tokens, names_filter=_hook_names(model, n_layers), doc_ids=doc_ids)
    rp = residual_parts(model, cache, n_layers)
    parts = rp.parts  # (n, B, T, d)
    factor, approximate = _frozen_final_scale(model, _stream(cache, n_layers, n_layers))
    parts = parts * factor
    labels, kinds, layers, heads = list(rp.labels), list(rp.kinds), list(rp.layers), list(rp.heads)
    bias = getattr(model.unembed, "bias", None)
    W_U = model.unembed.weight.T.to(parts.dtype)  # (d_model, vocab)
    if pos is not None:
        parts, logits, factor = parts[:, :, pos], logits[:, pos], factor[:, pos]
        if kind == "per_position":
            ids = ids[:, pos]
            kind = "per_batch"
    if kind in ("all", "list", "one"):
        U = W_U if kind == "all" else W_U[:, ids]  # (d_model[, targets])
        out = parts @ U
        logit = logits if kind == "all" else logits[..., ids]
    else:  # one id per (batch[, pos])
        U = W_U.T[ids]  # (B[, T], d)
        out = (parts * U).sum(-1)
        logit = logits.gather(-1, ids[..., None])[..., 0]
    if bias is not None:
        b = bias.to(out.dtype)
        b = b if kind == "all" else b[ids]
        labels.append("unembed bias"), kinds.append("unembed_bias"), layers.append(None), heads.append(None)
        out = torch.cat([out, b.expand_as(out[0])[None]])
    note = ("exact: no final norm, so the logits are a sum of these parts" if not approximate else
            f"approximate: the final norm ({type(model.ln_final).__name__}) divides by the RMS of the whole residual "
            f"stream; its scale is frozen at its value on this input, so the parts sum to the logit but each part's "
            f"share depends on the others")
    return LogitAttribution(labels, kinds, layers, heads, out, logit, target, pos, approximate, note)


# ---------------------------------------------------------------------------- path expansion
@dataclass
class PathGroup(Result):
    """The terms of one (value source, query sources, key sources) group of a head's expansion.

    ``value``: their sum, with the expansion's trailing shape (a float for one prediction); ``name``
    says the compositions ("L0H2 -> K of L1H0 (induction)"); ``q``/``k`` list one source per QK
    factor (sorted: the grouping does not care which factor)."""

    layer: int
    head: int
    v: str
    q: tuple[str, ...]
    k: tuple[str, ...]
    name: str
    value: Any


@dataclass
class PathExpansion(Result):
    """A head's output split exactly over the sources of its value, query and key inputs.

    ``terms``: (n_src, [n_src, n_src] * n_factors, batch, *pos, *out) with axes (value source, then
    per QK factor its query source and key source); ``out`` is d_model, or dropped / the targets'
    axis when projected on target logits. ``sources`` name the axes' entries (the residual parts
    entering the layer, plus "bias" for the q/k/v projection biases). ``output``: the head's actual
    output there (``hook_result``, projected the same way), which ``terms`` summed over its source
    axes equals. ``previous_token``: the previous-token share of every earlier head on this input.
    """

    layer: int
    head: int
    sources: list[str]
    source_kinds: list[str]
    factors: list[tuple[str, str, float]]
    terms: Tensor
    output: Tensor
    position: int | None
    target: Any
    approximate: bool = False
    previous_token: dict[str, float] = field(default_factory=dict)

    @property
    def n_factors(self) -> int:
        return len(self.factors)

    def total(self) -> Tensor:
        return self.terms.flatten(0, 2 * self.n_factors).sum(0)

    def groups(self) -> list[PathGroup]:
        """Every (value source, query-source multiset, key-source multiset) group with its summed value,
        in no particular order; they sum exactly to ``output``."""
        F = self.n_factors
        n = len(self.sources)
        flat = self.terms.reshape(n ** (2 * F + 1), *self.terms.shape[2 * F + 1:])
        grid = torch.cartesian_prod(*[torch.arange(n)] * (2 * F + 1)).view(-1, 2 * F + 1)
        qs = grid[:, 1::2].sort(1).values
        ks = grid[:, 2::2].sort(1).values
        key = torch.cat([grid[:, :1], qs, ks], 1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        sums = torch.zeros(len(uniq), *flat.shape[1:], dtype=flat.dtype).index_add_(0, inverse, flat)
        out = []
        for row, val in zip(uniq.tolist(), sums):
            v, q, k = row[0], tuple(row[1:1 + F]), tuple(row[1 + F:])
            value = float(val) if val.numel() == 1 else val
            out.append(PathGroup(self.layer, self.head, self.sources[v], tuple(self.sources[i] for i in q),
                                 tuple(self.sources[i] for i in k), self._name(v, q, k), value))
        return out

    def top(self, k: int = 10) -> list[PathGroup]:
        """The ``k`` groups with the largest |value| (L2 norm over the trailing axes when not a scalar)."""
        groups = self.groups()

        def size(g: PathGroup) -> float:
            return abs(g.value) if isinstance(g.value, float) else float(torch.linalg.vector_norm(g.value))

        return sorted(groups, key=size, reverse=True)[:k]

    def _name(self, v: int, q: tuple[int, ...], k: tuple[int, ...]) -> str:
        me = f"L{self.layer}H{self.head}"
        direct = lambda i: self.source_kinds[i] in _DIRECT_KINDS  # noqa: E731
        bits = []
        for role, idx in (("Q", q), ("K", k), ("V", (v,))):
            for src in dict.fromkeys(self.sources[i] for i in idx if not direct(i)):
                bits.append(f"{src} -> {role}")
        if not bits:
            return f"direct -> {me} (Q {'+'.join(dict.fromkeys(self.sources[i] for i in q))}, K " \
                   f"{'+'.join(dict.fromkeys(self.sources[i] for i in k))}, V {self.sources[v]})"
        name = ", ".join(bits) + f" of {me}"
        k_heads = {self.sources[i] for i in k if not direct(i)}
        if (k_heads and all(direct(i) for i in q) and direct(v)
                and all(self.previous_token.get(s, 0.0) >= PREVIOUS_TOKEN_SHARE for s in k_heads)):
            name += " (induction)"
        return name


def _previous_token_shares(cache: dict[str, Tensor], layer: int) -> dict[str, float]:
    out = {}
    for i in range(layer):
        pattern = cache.get(f"blocks.{i}.attn.hook_pattern")  # (batch, head, q, k)
        if pattern is None or pattern.shape[-1] < 2:
            continue
        a = pattern.abs()
        prev = torch.diagonal(a, -1, dim1=-2, dim2=-1)  # (batch, head, q - 1): query i, key i - 1
        rows = a[..., 1:, :].sum(-1).clamp_min(torch.finfo(a.dtype).tiny)
        share = (prev / rows).mean((0, 2))
        for h, s in enumerate(share.tolist()):
            out[f"L{i}H{h}"] = s
    return out


def _einsum_spec(F: int, value: str, tail: str) -> str:
    """``terms[e, a1, b1, ..., aF, bF, z, p, *tail] = sum_j prod_f S_f[a_f, b_f, z, p, j] V[value]``:
    e value source, a/b query/key sources, z batch, p query position, j key position."""
    letters = iter(c for c in string.ascii_letters if c not in "ezpjmt")
    pairs = [(next(letters), next(letters)) for _ in range(F)]
    scores = ",".join(f"{a}{b}zpj" for a, b in pairs)
    return f"{scores},{value}->e{''.join(a + b for a, b in pairs)}zp{tail}"


@torch.no_grad()
def path_expansion(model: nn.Module, tokens: Tensor, layer: int, head: int, *, position: int | None = None,
                   target: Any = None, doc_ids: Tensor | None = None) -> PathExpansion:
    """Head ``head`` of ``layer``'s output split exactly by the sources of its value, query and key
    inputs (module docstring). position: None (every position) or one; target: None (d_model
    vectors), a token id or a list of ids (projected on those logits' unembedding directions, through
    the frozen final-norm scale if there is one). doc_ids: each token's document, as in
    `ToyTransformer.forward` (a doc_mask model finds them itself): keys of other documents drop out
    and positions restart per document."""
    tokens = _check_tokens(model, tokens)
    B, T = tokens.shape
    pos = _check_position(position, T)
    n_layers = len(model.blocks)
    from ..documents import document_positions, documents_for

    docs = documents_for(model, tokens, None, doc_ids)
    if not 0 <= layer < n_layers:
        raise AttributionError(f"layer {layer} is out of range: the model has {n_layers} layer(s).")
    block = model.blocks[layer]
    views = component_views(block.attn)
    name = f"blocks.{layer}.attn ({type(block.attn).__name__})"
    if not all(k in views for k in ("W_Q", "W_K", "W_V", "W_O")):
        raise AttributionError(f"{name} offers no W_Q/W_K/W_V/W_O weight views, so its output cannot be expanded "
                               f"over its inputs.")
    if views.get("pattern") != "product":
        raise AttributionError(
            f"{name}: its pattern is not a product of QK forms (weight_views()['pattern'] is "
            f"{views.get('pattern')!r}; softmax normalises), so its output is not a polynomial of its inputs and "
            f"has no exact path expansion. Use logit_attribution for its per-head contributions, or a polynomial "
            f"attention (quadratic, bilinear).")
    if not _is_identity(getattr(block, "ln1", None)):
        raise AttributionError(
            f"blocks.{layer}.ln1 ({type(block.ln1).__name__}) normalises the input of {name}, so its output is not "
            f"a polynomial of the residual parts and the path expansion would not be exact. Use logit_attribution "
            f"(it freezes only the final norm's scale), or train without a norm (--norm none).")
    n_head = views["W_Q"].shape[0]
    if not 0 <= head < n_head:
        raise AttributionError(f"head {head} is out of range: {name} has {n_head} heads.")
    ids, kind = _targets(model, target)
    if kind == "per_position":
        raise AttributionError("path_expansion takes one target token or a list of them, not one per position.")

    names = _hook_names(model, layer) | {f"blocks.{layer}.attn.hook_result"} | \
        {f"blocks.{i}.attn.hook_pattern" for i in range(layer)}
    if ids is not None:
        names |= _hook_names(model, n_layers)
    _, cache = model.run_with_cache(tokens, names_filter=names, doc_ids=docs)
    rp = residual_parts(model, cache, layer)
    X = rp.parts  # (n, B, T, d)
    dtype = X.dtype
    factors = [(q, k, float(s)) for q, k, s in views["qk"]]
    sources, kinds = list(rp.labels), list(rp.kinds)
    bias_names = {"b_V"} | {"b_" + q[2:] for q, _, _ in factors} | {"b_" + k[2:] for _, k, _ in factors}
    has_bias = any(b in views for b in bias_names)
    if has_bias:
        sources.append("bias"), kinds.append("bias")

    def project(view: str) -> Tensor:  # (n_src, B, T, d_head)
        W = views[view][head].to(dtype)
        out = X @ W
        if has_bias:
            b = views.get("b_" + view[2:])
            b = torch.zeros(W.shape[1], dtype=dtype) if b is None else b[head].to(dtype)
            out = torch.cat([out, b.expand(1, B, T, -1)])
        return out

    positions = torch.arange(T)
    positional = model.positional
    # with documents: per-row positions in each document, and keys of the query's document only
    rot_positions = positions if docs is None else document_positions(docs, 0, None)

    def rotated(view: str) -> Tensor:
        x = project(view)
        n = x.shape[0]
        at = rot_positions if docs is None else rot_positions.repeat(n, 1)
        return positional.rotate(x.reshape(n * B, 1, T, -1), at).reshape(n, B, T, -1)

    query_pos = positions if pos is None else positions[pos:pos + 1]
    causal = (positions[None, :] <= query_pos[:, None]).to(dtype)  # (P, T)
    if docs is not None:  # (B, P, T): broadcasts over the query-source and key-source axes
        causal = causal * (docs[:, query_pos, None] == docs[:, None, :]).to(dtype)
    scores = []
    for qv, kv, s in factors:
        q = rotated(qv)[:, :, query_pos]  # (n, B, P, d_head)
        k = rotated(kv)
        scores.append(torch.einsum("azpd,bzjd->abzpj", q, k) * s * causal)
    VO = project("W_V") @ views["W_O"][head].to(dtype)  # (n, B, T, d_model)
    output = cache[f"blocks.{layer}.attn.hook_result"][:, :, head].to(dtype)[:, query_pos]  # (B, P, d_model)
    approximate = False
    if ids is not None:
        factor, approximate = _frozen_final_scale(model, _stream(cache, n_layers, n_layers))
        W_U = model.unembed.weight.T.to(dtype)[:, ids]  # (d_model[, n_targets])
        # the final norm's frozen scale belongs to the query position
        fq = factor[:, query_pos]  # (B, P, d)
        VO_u = torch.einsum("ezjm,zpm,m...->ezpj...", VO, fq, W_U)  # (n, B, P, T[, t])
        tail = "t" if kind == "list" else ""
        terms = torch.einsum(_einsum_spec(len(factors), "ezpj" + tail, tail), *scores, VO_u)
        output = torch.einsum("zpm,zpm,m...->zp...", output, fq, W_U)
    else:
        terms = torch.einsum(_einsum_spec(len(factors), "ezjm", "m"), *scores, VO)
    if pos is not None:
        terms, output = terms.select(2 * len(factors) + 2, 0), output[:, 0]
    total = terms.flatten(0, 2 * len(factors)).sum(0)
    err = float((total - output).abs().max())
    scale = float(output.abs().max()) or 1.0
    if err > 1e-3 * scale + 1e3 * torch.finfo(dtype).eps:
        raise AttributionError(
            f"{name} head {head}: the expansion over its inputs does not add up to the head's output (max error "
            f"{err:.3g} at scale {scale:.3g}): the attention's forward is not the product of the QK forms its "
            f"weight_views() list ('qk'), so it cannot be expanded this way.")
    return PathExpansion(layer, head, sources, kinds, factors, terms, output, pos, target, approximate,
                         _previous_token_shares(cache, layer))


@torch.no_grad()
def top_paths(model: nn.Module, tokens: Tensor, *, target: int, position: int = -1, k: int = 10,
              layers: Sequence[int] | None = None) -> list[PathGroup]:
    """The ``k`` largest path groups (by |logit contribution| to ``target`` at ``position``) over every
    head of ``layers`` (default: every layer from 1 on, where heads can compose), each head expanded
    with `path_expansion`; a head's groups sum to its part in `logit_attribution`."""
    n_layers = len(model.blocks)
    layers = list(range(1, n_layers)) if layers is None else list(layers)
    if isinstance(target, (list, tuple)) or torch.as_tensor(target).ndim != 0:
        raise AttributionError("top_paths ranks the paths of one prediction: give a single target token id.")
    groups: list[PathGroup] = []
    for layer in layers:
        n_head = component_views(model.blocks[layer].attn).get("W_Q", torch.empty(0)).shape[0]
        for h in range(n_head):
            groups += path_expansion(model, tokens, layer, h, position=position, target=target).groups()
    groups.sort(key=lambda g: abs(g.value), reverse=True)
    return groups[:k]
