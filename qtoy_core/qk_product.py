"""One base for attentions whose pattern is a product of QK forms: quadratic, bilinear, cubic, ...

For factors ``f = 1..n`` declared by ``qk_factors()`` as ``(q_proj, k_proj, scale)`` triples::

    form_f[i, j] = scale_f * (q_f,i . k_f,j)        (q_f, k_f per head, rotated by the positional)
    pattern[i, j] = prod_f form_f[i, j]    for j <= i (within the window, when one is set), else 0
    z_i = sum_j pattern[i, j] v_j                      (no softmax: an exact polynomial)

A repeated triple is a power: quadratic attention lists ``(q_proj, k_proj, 1/d_head)`` twice (the
square), a cubic one three times; bilinear attention lists two distinct pairs. A subclass declares
the factors (and creates any projections beyond ``q_proj``/``k_proj``) and inherits everything else
from `QKProductAttention`, in one place:

* ``mix``: cached generation keeps a recurrent state of constant size (mode "recurrent", when the
  pattern has one, see below) or every key and value (mode "kv"); a hook on ``hook_scores`` or
  ``hook_pattern`` gets the explicit (T, T) pattern; otherwise two factors run the fast kernels of
  `qtoy_core.ops.quadratic` (blocked plain or linear-time chunked form, chosen by ``impl``) and any
  other number of factors the explicit pattern, which is correct for every count.
* the recurrent state: ``S = sum_j phi(k_j) v_j^T`` with ``phi(k) = k_1 (x) ... (x) k_n``, read as
  ``z = phi(q)^T S`` (``phi(q)`` from the scaled queries). Two factors use
  `qtoy_core.ops.quadratic.QuadraticAttentionState` (symmetric features for a square); other counts
  keep the D^n tensor-product features when D^n <= `MAX_STATE_FEATURES`, and a KV cache otherwise
  (the same outputs, memory growing with the prefix). A window has no running-sum form: windowed
  attentions always keep a KV cache.
* ``tensor_network``: the exact network (`qtoy_core.analysis.tensor_network`): one fresh copy of
  each factor's scaled scores per (query, key), multiplied (a shared index), times the value.
* ``weight_views``: the TransformerLens-style views of every projection a factor uses
  (``W_Q2``/``W_K2`` for ``q2_proj``/``k2_proj``), with ``qk`` listing the factors.

What the hook points see: ``hook_scores`` gets the one form when every factor is the same form
(quadratic, cubic: ``pattern = scores ** n``), otherwise the product of the distinct forms, each
once (bilinear: the pattern before masking; a repeated form is then multiplied in again after the
hook); ``hook_pattern`` gets the masked pattern.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .interfaces import ProjectedAttention, append_to_cache
from .ops.masks import causal_pattern
from .ops.quadratic import QuadraticAttentionState, quadratic_attention

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = ["MAX_STATE_FEATURES", "QKProductAttention", "window_mask"]

#: The recurrent state of a product of n != 2 QK forms keeps D^n features per head (a (D^n, D)
#: state); beyond this many features generation keeps a KV cache instead. 4096 is the largest
#: feature count the two-factor kernels are measured at (`qtoy_core.ops.quadratic`): cubic
#: attention has a recurrent state up to d_head 16, a one-factor (linear) attention always.
MAX_STATE_FEATURES = 4096

#: Tokens per slice when the general recurrent state absorbs or reads a long prompt, so the
#: (time, D^n) feature tensors stay small.
_STATE_SLICE = 256

Factor = tuple[Tensor, Tensor, float]  # (queries, keys, scale) of one QK form, per head


def window_mask(t_q: int, t_k: int, window: int, device: torch.device | str | None = None) -> Tensor:
    """(t_q, t_k) bool: the query at absolute position p (queries are the last t_q of t_k
    positions) sees keys p - window + 1 .. p."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def _power(x: Tensor, n: int) -> Tensor:
    """x * x * ... * x (n times), by repeated products (as the forms multiply in the network)."""
    out = x
    for _ in range(n - 1):
        out = out * x
    return out


def _tensor_features(xs: list[Tensor]) -> Tensor:
    """x_1 (x) ... (x) x_n over the last axis: (..., D) each -> (..., D^n)."""
    out = xs[0]
    for x in xs[1:]:
        out = (out[..., :, None] * x[..., None, :]).flatten(-2)
    return out


class _ProductState:
    """Running state of a product of n QK forms (n != 2) for generation: ``S = sum_j phi(k_j) v_j^T``
    (B, H, D^n, D) with ``phi(k) = k_1 (x) ... (x) k_n``; a query reads ``phi(s_1 q_1 (x) ...) S``.
    Kept in float32 at least (float64 for a float64 model)."""

    def __init__(self) -> None:
        self.S: Tensor | None = None
        self.doc: Tensor | None = None  # with documents: the document (B,) whose keys S holds

    def __call__(self, factors: list[Factor], v: Tensor, explicit: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        """``explicit``: z of the new tokens among themselves (their own causal pattern, within
        their documents); adds what the keys seen before contribute, then absorbs the new keys. v is
        already masked. ``doc_ids`` (B, T): the new tokens' documents; the earlier keys count only
        for queries of the document they belong to, and S then holds the last token's document."""
        dtype = torch.promote_types(v.dtype, torch.float32)
        qs = [q.to(dtype) * s for q, _, s in factors]
        ks = [k.to(dtype) for _, k, _ in factors]
        z = explicit
        if doc_ids is not None and self.S is not None and self.doc is not None:
            reads = (doc_ids == self.doc[:, None]).to(dtype)[:, None, :, None]  # (B, 1, T, 1)
        else:
            reads = None
        if self.S is not None:
            seen = [_tensor_features([q[:, :, t:t + _STATE_SLICE] for q in qs]) @ self.S
                    for t in range(0, v.shape[2], _STATE_SLICE)]
            seen = torch.cat(seen, dim=2)
            z = z + (seen if reads is None else seen * reads).to(z.dtype)
        if doc_ids is not None and v.shape[2]:
            last = doc_ids[:, -1]
            v = v * (doc_ids == last[:, None]).to(v.dtype)[:, None, :, None]  # only the last document's keys stay
            if self.S is not None and self.doc is not None:
                self.S = self.S * (last == self.doc).to(self.S.dtype)[:, None, None, None]
            self.doc = last
        new = sum(_tensor_features([k[:, :, t:t + _STATE_SLICE] for k in ks]).transpose(-1, -2)
                  @ v[:, :, t:t + _STATE_SLICE].to(dtype) for t in range(0, v.shape[2], _STATE_SLICE))
        self.S = new if self.S is None else self.S + new
        return z


class QKProductAttention(ProjectedAttention):
    """Causal attention whose pattern is the product of the scaled QK forms of ``qk_factors()``
    (module docstring): implement ``qk_factors()``, inherit ``mix``, the recurrent state,
    ``tensor_network`` and ``weight_views``.

    Set by ``__init__``: ``scale = 1 / d_head`` (what the built-ins' factors use), ``impl`` from the
    config's ``impl`` field when it has one (else "auto": the kernels' measured choice), and
    ``window`` None (a subclass may set an int: each query sees only its last ``window`` keys).
    """

    window: int | None = None
    supports_doc_mask = True  # every path below takes doc_ids (the kernels, the explicit pattern, the states)

    def __init__(self, model: "ModelConfig", config: Any, layer: int):
        super().__init__(model, config, layer)
        self.scale = 1.0 / model.d_head
        self.impl = getattr(config, "impl", "auto")

    @abc.abstractmethod
    def qk_factors(self) -> list[tuple[nn.Linear, nn.Linear, float]]:
        """The (q_proj, k_proj, scale) triples whose scaled QK forms multiply into the pattern (used
        by the forward, the tensor network and the circuits); a repeated triple is a power."""

    # -- the forward -------------------------------------------------------------------------------
    def mix(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: dict | None, *, x: Tensor,
            positional, positions: Tensor, doc_ids: Tensor | None = None, **_: Any) -> Tensor:
        """``doc_ids`` (batch, new tokens): with document masking, a query sees only the keys of
        its own document (cached keys keep their documents in ``state``)."""
        specs = self._factor_specs()
        factors = self._factor_heads(specs, q, k, x, positional, positions)
        explicit = self.wants_pattern()
        if state is not None and state.get("mode", "recurrent") == "recurrent" and not explicit \
                and self._has_recurrent_form(len(specs)):
            return self._recurrent(state, specs, factors, v, key_mask, doc_ids)
        if state is not None:
            factors, v = self._cached(state, specs, factors, v)
            if doc_ids is not None:
                (doc_ids,) = append_to_cache(state, doc=doc_ids[:, None, :, None])
                doc_ids = doc_ids[:, 0, :, 0]  # kept like keys, (batch, 1, time, 1): the keys' documents
        if explicit or self.window is not None or len(factors) != 2:
            return self._explicit(specs, factors, v, key_mask, doc_ids)
        q1, k1, q2, k2, scale = self._kernel_inputs(specs, factors)
        return quadratic_attention(q1, k1, v, scale=scale, q2=q2, k2=k2, key_mask=key_mask, impl=self.impl,
                                   doc_ids=doc_ids)

    def _factor_specs(self) -> list[tuple[nn.Linear, nn.Linear, float]]:
        specs = [(qp, kp, float(s)) for qp, kp, s in self.qk_factors()]
        if not specs:
            raise TypeError(f"{type(self).__name__}.qk_factors() returned no factor: a QKProductAttention's pattern "
                            f"is the product of at least one (q_proj, k_proj, scale) form")
        for proj in (p for qp, kp, _ in specs for p in (qp, kp)):
            self._short_name(proj)  # a clear error for a projection that is not a submodule
        return specs

    def _factor_heads(self, specs, q: Tensor, k: Tensor, x: Tensor, positional, positions: Tensor) -> list[Factor]:
        """Each factor's (queries, keys, scale), per head and rotated; every projection computed once
        (q_proj and k_proj are forward's, which passed its hook points)."""
        done: list[tuple[nn.Module, Tensor]] = [(self.q_proj, q), (self.k_proj, k)]

        def heads(proj: nn.Module) -> Tensor:
            for module, h in done:
                if module is proj:
                    return h
            h = self.heads(proj, x, positional, positions)
            done.append((proj, h))
            return h

        return [(heads(qp), heads(kp), s) for qp, kp, s in specs]

    def _short_name(self, proj: nn.Module) -> str:
        """The projection's attribute name without ``_proj`` ("k", "k2", ...): its KV cache entry,
        network label and (upper-cased) weight-view name."""
        for name, module in self.named_children():
            if module is proj:
                return name.removesuffix("_proj")
        raise TypeError(f"{type(self).__name__}.qk_factors() names a projection that is not one of its own "
                        f"submodules: assign each projection to an attribute (self.q2_proj = nn.Linear(...))")

    def _cached(self, state: dict, specs, factors: list[Factor], v: Tensor) -> tuple[list[Factor], Tensor]:
        """Append the new keys of every distinct key projection, and the values, to the KV cache in
        ``state`` (entries named after the projections: "k", "k2", ..., "v"); the factors over all keys."""
        distinct: list[tuple[nn.Module, Tensor]] = []
        for (_, kp, _), (_, kh, _) in zip(specs, factors):
            if all(kp is not m for m, _ in distinct):
                distinct.append((kp, kh))
        *every, v = append_to_cache(state, **{self._short_name(m): kh for m, kh in distinct}, v=v)
        full = [(m, t) for (m, _), t in zip(distinct, every)]
        return [(qh, next(t for m, t in full if m is kp), s) for (_, kp, _), (qh, _, s) in zip(specs, factors)], v

    @staticmethod
    def _forms(specs, factors: list[Factor]) -> tuple[list[Factor], list[int]]:
        """The distinct forms (same projections and scale) among the factors, and how often each occurs."""
        forms: list[Factor] = []
        seen: list[tuple[nn.Module, nn.Module, float]] = []
        powers: list[int] = []
        for spec, factor in zip(specs, factors):
            for i, other in enumerate(seen):
                if other[0] is spec[0] and other[1] is spec[1] and other[2] == spec[2]:
                    powers[i] += 1
                    break
            else:
                seen.append(spec)
                forms.append(factor)
                powers.append(1)
        return forms, powers

    def _explicit(self, specs, factors: list[Factor], v: Tensor, key_mask: Tensor | None,
                  doc_ids: Tensor | None = None) -> Tensor:
        """The (T_q, T_k) pattern written out, through the hook points (module docstring)."""
        forms, powers = self._forms(specs, factors)
        values = [(fq @ fk.transpose(-1, -2)) * s for fq, fk, s in forms]
        if len(values) == 1:
            pattern = _power(self.hook_scores(values[0]), powers[0])
        else:
            scores = values[0]
            for value in values[1:]:
                scores = scores * value
            pattern = self.hook_scores(scores)
            for value, power in zip(values, powers):
                if power > 1:
                    pattern = pattern * _power(value, power - 1)
        pattern = causal_pattern(pattern, key_mask, doc_ids)  # zeros after any power, never -inf before it
        if self.window is not None:
            pattern = pattern * window_mask(pattern.shape[-2], pattern.shape[-1], self.window,
                                            pattern.device).to(pattern.dtype)
        return self.hook_pattern(pattern) @ v

    @staticmethod
    def _kernel_inputs(specs, factors: list[Factor]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, float]:
        """(q, k, q2, k2, scale) for the two-factor kernels: a square is their quadratic form, two
        distinct forms the bilinear one; unequal scales go into the queries."""
        (q1, k1, s1), (q2, k2, s2) = factors
        (p1, r1, _), (p2, r2, _) = specs
        if p1 is p2 and r1 is r2 and s1 == s2:
            return q1, k1, None, None, s1
        if s1 == s2:
            return q1, k1, q2, k2, s1
        return q1 * s1, k1, q2 * s2, k2, 1.0

    # -- generation: the recurrent state -------------------------------------------------------------
    def _has_recurrent_form(self, n_factors: int) -> bool:
        return self.window is None and (n_factors == 2 or self.d_head ** n_factors <= MAX_STATE_FEATURES)

    def _recurrent(self, state: dict, specs, factors: list[Factor], v: Tensor, key_mask: Tensor | None,
                   doc_ids: Tensor | None = None) -> Tensor:
        """Generation through the running state ``state["rnn"]``: constant cost per token; with
        ``doc_ids`` a row's state restarts where a new document begins."""
        if key_mask is not None:
            key_mask = key_mask[:, -v.shape[2]:]
        if len(factors) == 2:
            return self._recurrent_two(state, specs, factors, v, key_mask, doc_ids)
        if key_mask is not None:  # a padded key adds nothing to the state
            v = v * key_mask[:, None, :, None].to(v.dtype)
        rnn = state.setdefault("rnn", _ProductState())
        # the new tokens among themselves, then what the state adds
        return rnn(factors, v, self._explicit(specs, factors, v, None, doc_ids), doc_ids)

    def _recurrent_two(self, state: dict, specs, factors: list[Factor], v: Tensor, key_mask: Tensor | None,
                       doc_ids: Tensor | None = None) -> Tensor:
        q, k, q2, k2, scale = self._kernel_inputs(specs, factors)
        if "rnn" not in state:
            b, h, _, d = q.shape
            state["rnn"] = QuadraticAttentionState(b, h, d, bilinear=q2 is not None, dtype=q.dtype, device=q.device)
            return state["rnn"].prefill(q, k, v, scale=scale, q2=q2, k2=k2, key_mask=key_mask, doc_ids=doc_ids)
        rnn = state["rnn"]
        outs = []
        for t in range(q.shape[2]):
            sl = slice(t, t + 1)
            kt, vt = k[:, :, sl], v[:, :, sl]
            k2t = k2[:, :, sl] if k2 is not None else None
            if key_mask is not None:  # a padded key adds nothing to the state
                m = key_mask[:, None, sl, None].to(kt.dtype)
                kt, vt = kt * m, vt * m
            outs.append(rnn.step(q[:, :, sl], kt, vt, scale=scale, q2=q2[:, :, sl] if q2 is not None else None, k2=k2t,
                                 doc_ids=None if doc_ids is None else doc_ids[:, sl]))
        return torch.cat(outs, dim=2)

    # -- optional capability: exact tensor network (qtoy_core.analysis.tensor_network) ---------------
    def tensor_network(self, tn, x, *, positional):
        """z_i = sum_{j} prod_f ((q_f,i . k_f,j) scale_f) v_j over the keys j <= i (in the window),
        built with the `TNBuilder` ``tn``: each factor is a fresh copy of its scaled scores, the
        copies share one key index and multiply (a shared index, no tensor); the key sum is one key
        index over the query's keys."""
        streams: list[tuple[nn.Module, Any]] = []

        def rotated(proj: nn.Module):
            for module, stream in streams:
                if module is proj:
                    return stream
            stream = positional.tensor_network(tn, tn.project(x, proj, label=self._short_name(proj)), op="rotate")
            streams.append((proj, stream))
            return stream

        factors = [(rotated(qp), rotated(kp), s) for qp, kp, s in self._factor_specs()]
        v = tn.project(x, self.v_proj, label="v")

        def at(i):
            first = 0 if self.window is None else max(0, i - self.window + 1)
            keys = tn.key_sum(tn.visible_keys(i, first), label=f"key<={i}")  # within i's document
            scores = [tn.head_dot(fq(i), keys(fk), self.n_head, scale=s) for fq, fk, s in factors]
            pattern = tn.mul(*scores, label="pattern") if len(scores) > 1 else scores[0]
            z = tn.head_scale(pattern, keys(v), self.n_head)
            return tn.linear(keys.sum(z), self.out_proj.weight, self.out_proj.bias, label="attn_out")

        return tn.stream(at, self.out_proj.out_features, "attn_out")

    # -- optional capability: weight views (qtoy_core.analysis.circuits) -----------------------------
    def weight_views(self) -> dict[str, Any]:
        """`ProjectedAttention.weight_views` plus the views of every other projection a factor uses,
        named after it: ``q2_proj`` -> ``W_Q2`` (n_head, d_model, d_head) and ``b_Q2`` (n_head,
        d_head) with a bias. ``qk`` lists the factors (a repeated one is a power), ``pattern`` is
        "product"."""
        views = super().weight_views()
        for qp, kp, _ in self._factor_specs():
            for proj in (qp, kp):
                name = self._short_name(proj).upper()
                if f"W_{name}" in views:
                    continue
                views[f"W_{name}"] = proj.weight.detach().view(self.n_head, self.d_head, -1).transpose(1, 2)
                if proj.bias is not None:
                    views[f"b_{name}"] = proj.bias.detach().view(self.n_head, self.d_head)
        return views
