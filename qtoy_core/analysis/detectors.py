"""Heads scored on behaviour: previous-token, duplicate-token, induction and copying detectors that
are correct for unnormalised patterns, `induction_loss`, and the weight-based scores they are
compared with.

    from qtoy_core.analysis.detectors import head_detectors, induction_loss, weight_head_scores
    det = head_detectors(model)                 # on repeated random token sequences
    det.scores["induction"]                     # (n_layers, n_head); NaN where a layer has no pattern
    induction_loss(model).second_half_mean      # TransformerLens' evals.induction_loss, per position too
    det.compare(weight_head_scores(model))      # Spearman rank correlation per kind, over all heads

**Normalisation.** qtoy patterns are not probability rows: quadratic attention's pattern is
``(q.k / d_head)**2`` (non-negative, unbounded, rows do not sum to 1), bilinear attention's is
``(q1.k1)(q2.k2) / d_head**2`` (signed). A detector therefore scores a head by the **share of the
pattern's absolute mass on the target keys**, per query row, averaged over the rows that have a
target::

    share(row q) = sum_{k in targets(q)} |A[q, k]|  /  sum_{k <= q} |A[q, k]|          in [0, 1]
    score        = mean over (batch, q) with a target and a nonzero row of share(row q)

For softmax attention ``|A| = A`` and every row sums to 1, so the score is the mean attention
probability on the targets (TransformerLens' ``detect_head`` with ``error_measure="mul"`` divides by
*all* rows instead, rows without a target counting 0). ``signed`` is the same with ``A[q, k]`` in
the numerator (in [-1, 1]): it equals ``score`` for non-negative patterns and is negative for a
signed head that attends to its targets with a negative weight (it subtracts their values).
``uniform`` is what a pattern spread evenly over the causal keys scores (the chance level).

Targets, for the query at position q of tokens ``t`` (with ``bos``, position 0 is never a target):

  previous_token   k = q - 1
  duplicate_token  k < q with t[k] == t[q]                   (an earlier copy of the current token)
  induction        k < q with t[k - 1] == t[q], k >= 1       (the token after an earlier copy)

**Copying** reads the head's output at each query through the unembedding, ``l = hook_result[q, h]
@ W_U`` (``ln_final``'s gain folded into W_U; its division by the RMS is a positive scalar per
position, which leaves ranks unchanged), and asks where the attended tokens rank in ``l``: the
percentile ``p`` of ``l[t[k]]`` among all vocabulary logits (ties at their mean rank), mapped to
``2p - 1`` in [-1, 1] (+1: the attended token gets the highest logit, 0: chance, -1: the lowest),
averaged over keys with the weights ``|A[q, k]| / sum |A[q, :]|`` and over queries.

Detection tokens are repeated random sequences (``repeated_random_tokens``): ``subseq_len`` random
tokens, then the same tokens again, so every second-half query has one induction target and one
duplicate target (more where a token repeats by chance). Only ``hook_pattern`` (batch, head, query,
key) and ``hook_result`` (batch, pos, head, d_model) are read from the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from qtoy_registry import QtoyError

from .cache import hook_names, run_with_cache
from .circuits import Result, _jsonable, composition_scores, ov_circuit, qk_circuit, spectrum
from .weights import model_weights, relative_rotations, rotates

__all__ = [
    "DETECTOR_KINDS", "DetectorInputError", "HeadDetectors", "InductionLoss", "detection_targets",
    "head_detectors", "induction_loss", "pattern_target_share", "repeated_random_tokens", "spearman",
    "weight_head_scores",
]

#: The pattern-based kinds (copying is read from the output, not from targets).
PATTERN_KINDS = ("previous_token", "duplicate_token", "induction")
DETECTOR_KINDS = PATTERN_KINDS + ("copying",)


class DetectorInputError(QtoyError, ValueError):
    """Detector or induction-loss input that cannot work (too long for the positions, no tokens left...)."""


# ---------------------------------------------------------------------------------------- tokens
def _n_ctx_limit(model: Any) -> int | None:
    return getattr(getattr(model, "positional", None), "max_positions", None)


def _default_subseq_len(model: Any, bos: bool, cap: int = 32) -> int:
    limit = _n_ctx_limit(model) or int(getattr(getattr(model, "config", None), "n_ctx", 0) or 2 * cap + 1)
    return max(2, min(cap, (limit - int(bos)) // 2))


def repeated_random_tokens(vocab_size: int, *, batch_size: int = 8, subseq_len: int = 16, seed: int = 0,
                           bos: int | None = None, exclude: Sequence[int] = ()) -> Tensor:
    """(batch_size, [1 +] 2 * subseq_len) int64: ``subseq_len`` uniform random tokens (never one in
    ``exclude`` or ``bos``), then the same tokens again; ``bos`` (a token id) is put first when given."""
    banned = set(int(e) for e in exclude) | ({int(bos)} if bos is not None else set())
    allowed = torch.tensor([t for t in range(vocab_size) if t not in banned], dtype=torch.long)
    if allowed.numel() < 2:
        raise DetectorInputError(f"only {allowed.numel()} token(s) of the {vocab_size}-token vocabulary are left "
                                 f"after excluding {sorted(banned)}: detection needs at least 2; exclude fewer tokens.")
    if subseq_len < 2:
        raise DetectorInputError(f"subseq_len={subseq_len}: a repeated sequence needs at least 2 tokens per half.")
    g = torch.Generator().manual_seed(seed)
    half = allowed[torch.randint(0, allowed.numel(), (batch_size, subseq_len), generator=g)]
    seq = torch.cat([half, half], dim=1)
    if bos is not None:
        seq = torch.cat([torch.full((batch_size, 1), int(bos), dtype=torch.long), seq], dim=1)
    return seq


def detection_targets(tokens: Tensor, kind: str, *, bos: bool = False) -> Tensor:
    """(batch, query, key) bool: the target keys of each query for detector ``kind`` (module docstring).
    With ``bos``, position 0 is never a target."""
    b, T = tokens.shape
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    if kind == "previous_token":
        out = (k == q - 1).expand(b, T, T)
    elif kind == "duplicate_token":
        out = (tokens[:, :, None] == tokens[:, None, :]) & (k < q)
    elif kind == "induction":
        prev = torch.cat([torch.full((b, 1), -1, dtype=tokens.dtype), tokens[:, :-1]], dim=1)  # t[k - 1]
        out = (tokens[:, :, None] == prev[:, None, :]) & (k < q) & (k >= 1)
    else:
        raise ValueError(f"detector kind must be one of {PATTERN_KINDS}, not {kind!r}")
    out = out.clone()
    if bos:
        out[:, :, 0] = False
    return out


def pattern_target_share(pattern: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Share of |pattern| mass on the targets per head: ``(score, signed, uniform)``, each (head,).

    pattern: (batch, head, query, key), any sign and scale (entries above the diagonal are ignored);
    targets: (batch, query, key) bool. Rows without a target or with zero mass are left out; a head
    with no such row scores NaN. ``uniform`` is the score of a pattern spread evenly over the causal keys.
    """
    T = pattern.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=pattern.device).tril()
    A = torch.where(causal, pattern.double(), 0.0)
    tg = (targets.to(pattern.device) & causal)[:, None]  # (b, 1, q, k)
    mass = A.abs().sum(-1)  # (b, h, q)
    on = torch.where(tg, A.abs(), 0.0).sum(-1)
    on_signed = torch.where(tg, A, 0.0).sum(-1)
    rows = tg.any(-1) & (mass > 0)
    n = rows.sum((0, 2)).double()
    safe = torch.where(mass > 0, mass, 1.0)
    score = torch.where(rows, on / safe, 0.0).sum((0, 2)) / n
    signed = torch.where(rows, on_signed / safe, 0.0).sum((0, 2)) / n
    chance = tg[:, 0].sum(-1).double() / causal.sum(-1).double()  # (b, q)
    uniform = torch.where(rows, chance[:, None], 0.0).sum((0, 2)) / n
    return score, signed, uniform


def _copying(pattern: Tensor, result: Tensor, W_U: Tensor, tokens: Tensor, bos: bool) -> Tensor:
    """(head,): the |pattern|-weighted 2 * percentile - 1 of the attended tokens in result @ W_U."""
    b, H, T, _ = pattern.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if bos:
        causal[:, 0] = False
    w = torch.where(causal, pattern.double().abs(), 0.0)
    mass = w.sum(-1, keepdim=True)
    w = w / torch.where(mass > 0, mass, 1.0)  # (b, h, q, k)
    logits = torch.einsum("bqhm,mv->bhqv", result.double(), W_U.double())  # (b, h, q, vocab)
    V = logits.shape[-1]
    ordered = logits.sort(-1).values.contiguous()
    idx = tokens[:, None, None, :].expand(b, H, T, T)
    vals = logits.gather(-1, idx).contiguous()  # (b, h, q, k): l_q[t[k]]
    below = torch.searchsorted(ordered, vals, right=False)
    upto = torch.searchsorted(ordered, vals, right=True)
    pct = ((below + upto - 1).double() / 2) / max(V - 1, 1)  # mean rank of ties, in [0, 1]
    row = (w * (2 * pct - 1)).sum(-1)  # (b, h, q)
    rows = mass[..., 0] > 0
    return torch.where(rows, row, 0.0).sum((0, 2)) / rows.sum((0, 2)).double()


# -------------------------------------------------------------------------------------- detectors
@dataclass
class HeadDetectors(Result):
    """Behaviour scores of every head. ``scores[kind]``, ``signed[kind]`` and ``uniform[kind]`` are
    (n_layers, n_head) tensors (NaN for a layer whose attention records no pattern); see the module
    docstring for the definitions. ``pattern_kind[layer]`` says what the layer's pattern is:
    "probability" (softmax), "non-negative" (quadratic) or "signed" (bilinear)."""

    scores: dict[str, Tensor]
    signed: dict[str, Tensor]
    uniform: dict[str, Tensor]
    pattern_kind: list[str | None]
    batch_size: int
    subseq_len: int
    seed: int
    bos: int | None
    notes: list[str] = field(default_factory=list)

    def top(self, kind: str, n: int = 5) -> list[tuple[int, int, float]]:
        """The ``n`` best (layer, head, score) for ``kind``, best first (NaN left out)."""
        s = self.scores[kind]
        flat = [(l, h, float(s[l, h])) for l in range(s.shape[0]) for h in range(s.shape[1])
                if math.isfinite(float(s[l, h]))]
        return sorted(flat, key=lambda x: -x[2])[:n]

    def compare(self, weight_scores: dict[str, Tensor]) -> dict[str, dict]:
        """Spearman rank correlation between these scores and ``weight_scores`` (`weight_head_scores`)
        per kind, over the heads where both are defined: ``{kind: {"spearman", "n_heads"}}``."""
        out = {}
        for kind, w in weight_scores.items():
            b = self.scores.get(kind)
            if b is None:
                continue
            x, y = w.flatten().double(), b.flatten().double()
            ok = torch.isfinite(x) & torch.isfinite(y)
            out[kind] = {"spearman": spearman(x[ok], y[ok]), "n_heads": int(ok.sum())}
        return out


def _pattern_kind(views: dict) -> str | None:
    if not views:
        return None
    qk = list(views.get("qk", []))
    if views.get("pattern") == "product":
        return "non-negative" if len(qk) == 2 and qk[0] == qk[1] else "signed"
    return "probability" if views.get("pattern") == "other" else None


def _eval_mode(model: Any):
    was = getattr(model, "training", False)
    model.eval()
    return was


@torch.no_grad()
def head_detectors(model: Any, tokens: Tensor | None = None, *, batch_size: int = 8, subseq_len: int | None = None,
                   seed: int = 0, bos: int | None = None, exclude: Sequence[int] = ()) -> HeadDetectors:
    """Score every head as a previous-token, duplicate-token, induction and copying head (module
    docstring) on ``tokens`` (batch, time), by default `repeated_random_tokens` of the model's vocabulary
    (``subseq_len`` default: as long as the positions allow, at most 32; ``bos`` put first and never a
    target; ``exclude`` token ids never drawn, e.g. special tokens)."""
    n_layers = len(model.blocks)
    vocab = int(model.config.vocab_size)
    if tokens is None:
        subseq_len = subseq_len or _default_subseq_len(model, bos is not None)
        limit = _n_ctx_limit(model)
        if limit is not None and 2 * subseq_len + (bos is not None) > limit:
            raise DetectorInputError(
                f"repeated sequences of 2 x {subseq_len} tokens{' plus bos' if bos is not None else ''} do not fit "
                f"the learned positions (n_ctx={limit}): pass subseq_len <= {(limit - (bos is not None)) // 2}.")
        tokens = repeated_random_tokens(vocab, batch_size=batch_size, subseq_len=subseq_len, seed=seed, bos=bos,
                                        exclude=exclude)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise DetectorInputError(f"tokens must be (batch, time) with time >= 2, got shape {tuple(tokens.shape)}.")
    names = set(hook_names(model))
    wanted = [f"blocks.{i}.attn.hook_pattern" for i in range(n_layers)] + \
             [f"blocks.{i}.attn.hook_result" for i in range(n_layers)]
    device = next(model.parameters()).device
    was = _eval_mode(model)
    try:
        _, cache = run_with_cache(model, tokens.to(device), [n for n in wanted if n in names], device="cpu")
    finally:
        if was:
            model.train()
    has_bos = bos is not None
    targets = {kind: detection_targets(tokens, kind, bos=has_bos) for kind in PATTERN_KINDS}
    W_U = model_weights(model).W_U.cpu()  # the cache is on the CPU
    n_head = int(model.config.n_head)
    nan = lambda: torch.full((n_layers, n_head), float("nan"), dtype=torch.float64)  # noqa: E731
    scores = {k: nan() for k in DETECTOR_KINDS}
    signed = {k: nan() for k in DETECTOR_KINDS}
    uniform = {k: nan() for k in DETECTOR_KINDS}
    kinds, notes = [], []
    for i, block in enumerate(model.blocks):
        views_fn = getattr(block.attn, "weight_views", None)
        kinds.append(_pattern_kind(views_fn() if callable(views_fn) else {}))
        pattern = cache.get(f"blocks.{i}.attn.hook_pattern")
        if pattern is None:
            notes.append(f"blocks.{i}.attn ({type(block.attn).__name__}) records no hook_pattern: no behaviour scores")
            continue
        H = pattern.shape[1]
        for kind in PATTERN_KINDS:
            s, sg, u = pattern_target_share(pattern, targets[kind])
            scores[kind][i, :H], signed[kind][i, :H], uniform[kind][i, :H] = s, sg, u
        result = cache.get(f"blocks.{i}.attn.hook_result")
        if result is None:
            notes.append(f"blocks.{i}.attn offers no W_O view (so no hook_result): no copying score")
            continue
        c = _copying(pattern, result, W_U, tokens, has_bos)
        scores["copying"][i, :H] = signed["copying"][i, :H] = c
        uniform["copying"][i, :H] = 0.0
    return HeadDetectors(scores, signed, uniform, kinds, int(tokens.shape[0]), int(subseq_len or 0), int(seed), bos,
                         notes)


# --------------------------------------------------------------------------------- induction loss
@dataclass
class InductionLoss(Result):
    """Next-token loss on repeated random sequences (``subseq_len`` tokens, then the same again).

    ``per_position[i]``: mean loss (nats, over the batch) of predicting token ``i + 1`` of the
    sequence (``bos`` included when given); ``second_half``: the entries predicting the second half's
    tokens 2..subseq_len (its first token cannot be inferred by induction), ``second_half_mean`` their
    mean (an induction circuit brings it far below ``uniform`` = ln(vocab)); ``first_half_mean`` the
    mean over the first half's predictions, for comparison."""

    per_position: Tensor
    second_half: Tensor
    second_half_start: int
    second_half_mean: float
    first_half_mean: float
    uniform: float
    batch_size: int
    subseq_len: int
    seed: int
    bos: int | None


@torch.no_grad()
def induction_loss(model: Any, *, batch_size: int = 8, subseq_len: int | None = None, seed: int = 0,
                   bos: int | None = None, exclude: Sequence[int] = ()) -> InductionLoss:
    """Loss of ``model`` on `repeated_random_tokens` per position (see `InductionLoss`).

    TransformerLens' ``evals.induction_loss`` returns the mean over ``[:, subseq_len + 1:]`` of the
    per-token loss; ``second_half_mean`` is the same set of predictions when ``bos`` is given."""
    subseq_len = subseq_len or _default_subseq_len(model, bos is not None)
    limit = _n_ctx_limit(model)
    if limit is not None and 2 * subseq_len + (bos is not None) > limit:
        raise DetectorInputError(
            f"repeated sequences of 2 x {subseq_len} tokens{' plus bos' if bos is not None else ''} do not fit the "
            f"learned positions (n_ctx={limit}): pass subseq_len <= {(limit - (bos is not None)) // 2}.")
    vocab = int(model.config.vocab_size)
    tokens = repeated_random_tokens(vocab, batch_size=batch_size, subseq_len=subseq_len, seed=seed, bos=bos,
                                    exclude=exclude)
    device = next(model.parameters()).device
    was = _eval_mode(model)
    try:
        logits = model(tokens.to(device)).float().cpu()
    finally:
        if was:
            model.train()
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                                                  reduction="none").view(batch_size, -1)
    per_position = per_token.mean(0)
    b = int(bos is not None)
    start = b + subseq_len  # index predicting the second half's token 2 (sequence position b + L + 1)
    first = per_position[b: b + subseq_len - 1] if subseq_len > 1 else per_position[:0]
    second = per_position[start:]
    return InductionLoss(per_position, second, start, float(second.mean()), float(first.mean()), math.log(vocab),
                         batch_size, subseq_len, seed, bos)


# ------------------------------------------------------------------------------- weight-based scores
def _kernel_pattern(forms: list[Tensor], kind: str | None) -> Tensor:
    """The pattern from a layer's QK forms (product, or a row softmax for "probability")."""
    if kind == "probability":
        T = forms[0].shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return forms[0].masked_fill(~causal, float("-inf")).softmax(-1)
    out = forms[0]
    for f in forms[1:]:
        out = out * f
    return out


@torch.no_grad()
def _positional_pattern(w: Any, layer: int, T: int, kind: str | None) -> Tensor | None:
    """(n_head, T, T) the pattern's positional part: learned W_pos forms (tokens left out), or for a
    rotating positional the pattern averaged over all (query token, key token) pairs at each offset."""
    lw = w.layers[layer]
    qk = lw.qk if kind != "probability" else lw.qk[:1]
    view = lambda name: lw.attn[name].detach().double().cpu()  # noqa: E731 - small: done on the CPU
    if w.W_pos is not None:
        P = w.W_pos[:T].double().cpu()
        forms = [float(s) * torch.einsum("qm,hmd,hnd,kn->hqk", P, view(a), view(b), P)
                 for a, b, s in qk]
        return _kernel_pattern(forms, kind)
    if w.positional is None or not rotates(w.positional, max(T, 2), lw.d_head):
        return None
    V = w.W_E.shape[0]
    E = w.W_E.double().cpu()
    G = E.T @ E  # (d_model, d_model)
    K = relative_rotations(w.positional, range(T), lw.d_head, torch.float64).cpu()  # (T, d, d)
    mean_e = E.mean(0)
    per_offset = []
    if kind == "probability":
        a, b, s = qk[0]
        q, k = mean_e @ view(a), mean_e @ view(b)  # (H, d)
        per_offset = [float(s) * torch.einsum("hd,ode,he->ho", q, K, k)]  # form of the mean embedding
    else:
        # mean over token pairs of prod_f form_f = <QK_1(o), QK_2(o)>_F / V^2 for two factors
        (a1, b1, s1), (a2, b2, s2) = (qk + qk)[:2] if len(qk) == 1 else qk[:2]
        QA = torch.einsum("hmd,mn,hne->hde", view(a1), G, view(a2))  # Q1^T G Q2
        KB = torch.einsum("hmd,mn,hne->hde", view(b2), G, view(b1))  # K2^T G K1
        # trace(K(o)^T Q1^T G Q2 K(o) K2^T G K1)
        val = torch.einsum("odx,hde,oey,hyx->ho", K, QA, K, KB) * (s1 * s2) / V ** 2
        per_offset = [val]
    off = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    dense = per_offset[0][:, off.clamp_min(0)]  # (H, T, T)
    if kind == "probability":
        return _kernel_pattern([dense], kind)
    return torch.where(off >= 0, dense, 0.0)


@torch.no_grad()
def weight_head_scores(model: Any, *, n_positions: int | None = None) -> dict[str, Tensor]:
    """Weight-based scores of every head, (n_layers, n_head) float64 each, NaN where undefined:

    ``previous_token``: the share of the positional pattern's |mass| on key q-1 (as the behaviour
      detector, over queries 1..n_positions-1): learned positions: the pattern of the W_pos forms alone;
      RoPE: the pattern averaged over all token pairs at each offset (exact for products of forms;
      softmax: the softmax of the mean embedding's form); NaN without positional information.
    ``duplicate_token``: the QK circuit's copying score (sum Re eig / sum |eig| of W_E W_QK W_E^T);
      quadratic: its absolute value (the square ignores the sign), bilinear: the product of the two
      forms' scores.
    ``induction``: the largest K-composition score with any head of an earlier layer (NaN in layer 0).
    ``copying``: the OV circuit's copying score.
    """
    w = model_weights(model)
    L = len(w.layers)
    # as wide as head_detectors' tables (the config's heads) when no layer offers weight views
    H = max((lw.n_head for lw in w.layers if lw.has_circuits), default=int(getattr(model.config, "n_head", 0)))
    T = int(n_positions or w.n_ctx or 16)
    out = {k: torch.full((L, H), float("nan"), dtype=torch.float64) for k in DETECTOR_KINDS}
    for i, lw in enumerate(w.layers):
        if not lw.has_circuits:
            continue
        kind = _pattern_kind(lw.attn)
        pat = _positional_pattern(w, i, T, kind)
        if pat is not None:
            tg = detection_targets(torch.zeros(1, T, dtype=torch.long), "previous_token")
            out["previous_token"][i, :lw.n_head] = pattern_target_share(pat[None], tg)[0]
        qk_scores = [torch.tensor([s.copying_score for s in spectrum(qk_circuit(w, i, factor=f))], dtype=torch.float64)
                     for f in range(len(lw.qk_pairs))]
        dup = qk_scores[0].abs() if kind == "non-negative" else qk_scores[0]
        if len(qk_scores) == 2:
            dup = qk_scores[0] * qk_scores[1]
        out["duplicate_token"][i, :lw.n_head] = dup
        out["copying"][i, :lw.n_head] = torch.tensor(
            [s.copying_score for s in spectrum(ov_circuit(w, i))], dtype=torch.float64)
        if i > 0:
            best = torch.full((lw.n_head,), float("nan"), dtype=torch.float64)
            for j in range(i):
                if not w.layers[j].has_circuits:
                    continue
                k = composition_scores(w, j, i).k.double().cpu().amax(0).amax(0)  # over QK pairs, earlier heads
                best = torch.where(torch.isnan(best), k, torch.maximum(best, k))
            out["induction"][i, :lw.n_head] = best
    return out


def spearman(x: Tensor | Sequence[float], y: Tensor | Sequence[float]) -> float | None:
    """Spearman's rank correlation of two equal-length samples (ties get their mean rank): the
    Pearson correlation of the ranks. None for fewer than 3 points or a constant sample."""
    x, y = torch.as_tensor(x, dtype=torch.float64).flatten(), torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs two samples of the same length, got {x.numel()} and {y.numel()}")
    if x.numel() < 3:
        return None

    def ranks(v: Tensor) -> Tensor:
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(v.numel(), dtype=torch.float64)
        for u in v.unique():  # ties: the mean of their ranks
            m = v == u
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else None


def detectors_report(model: Any, *, batch_size: int = 8, subseq_len: int | None = None, seed: int = 0,
                     bos: int | None = None, exclude: Sequence[int] = ()) -> dict:
    """The report's ``behaviour`` section (JSON-able): per head the behaviour scores, the weight-based
    scores, the Spearman correlation per kind, and `induction_loss`."""
    det = head_detectors(model, batch_size=batch_size, subseq_len=subseq_len, seed=seed, bos=bos, exclude=exclude)
    T = 2 * det.subseq_len + (bos is not None)
    ws = weight_head_scores(model, n_positions=T)
    il = induction_loss(model, batch_size=batch_size, subseq_len=det.subseq_len, seed=seed, bos=bos, exclude=exclude)
    heads = []
    L, H = det.scores["induction"].shape
    for layer in range(L):
        for head in range(H):
            entry = {"layer": layer, "head": head}
            for kind in DETECTOR_KINDS:
                entry[kind] = float(det.scores[kind][layer, head])
                entry[f"{kind}_signed"] = float(det.signed[kind][layer, head])
                entry[f"{kind}_uniform"] = float(det.uniform[kind][layer, head])
                entry[f"{kind}_weights"] = float(ws[kind][layer, head])
            heads.append(entry)
    return _jsonable({
        "tokens": {"kind": "repeated random sequences", "batch_size": det.batch_size, "subseq_len": det.subseq_len,
                   "seed": det.seed, "bos": det.bos},
        "pattern_kind": det.pattern_kind,
        "heads": heads,
        "spearman": det.compare(ws),
        "induction_loss": {"second_half_mean": il.second_half_mean, "first_half_mean": il.first_half_mean,
                           "uniform": il.uniform, "per_position": il.per_position,
                           "second_half_start": il.second_half_start},
        "notes": det.notes,
    })
