"""Weight-based circuits of qtoy models: direct path, QK and OV circuits, composition, bilinear MLPs.

Every vocab x vocab circuit is a `FactoredMatrix` (two thin factors), never materialised, so a
50257-token vocabulary works in a few hundred MB. Orientation: rows are the "input" token, columns
the "output" one:

* `direct_path`: ``W_E W_U`` (current token x next-token logit): bigram statistics.
  `direct_path_top` ranks it by the **row-centred** logit (the entry minus its row's mean over next
  tokens: what the softmax sees, so a row's overall level does not count) and, with tied embeddings,
  **leaves out the diagonal** t -> t: ``W_E W_E^T`` is then a Gram matrix whose diagonal holds the
  squared embedding norms, so the raw top entries are just the tokens with the largest embeddings.
* `qk_circuit`: ``scale * W_E W_Q[h] K(o) W_K[h]^T W_E^T`` (query token x key token), the scaled
  bilinear form of one QK pair for a query ``o`` positions after the key (``K(o)`` the relative
  rotation of RoPE, the identity at offset 0 and without RoPE). **Quadratic attention squares
  this form**: the pattern entry is ``form**2`` (no softmax), so its sign does not matter and top
  pairs are ranked by ``|form|``; bilinear attention multiplies its two forms (two QK circuits).
* `ov_circuit`: ``W_E W_V[h] W_O[h] W_U`` (source token x output logit); `FactoredMatrix.copying_score`
  of it is > 0 for a head that copies what it attends to. `Spectrum.top_share` is the top
  eigenvalue's share of ``sum |eig|``; at or above `DOMINANT_EIGENVALUE_SHARE` (0.5) that one
  eigenvalue outweighs all the others together, so it alone sets the score's sign
  (``HeadCircuits.ov_one_eigenvalue``; ``Spectrum.copying_score_rest`` is the score without it).
* `qk_kernel`: the position-resolved form of chosen token pairs, offset 0..n_ctx-1, computed along
  the model's own q/k path (``positional.rotate``).
* `composition_scores`: Q-, K-, V-composition of later heads with earlier heads' OV circuits
  (||W_QK W_OV|| / (||W_QK|| ||W_OV||), "A Mathematical Framework for Transformer Circuits"), and
  `rank_head_pairs` / `induction_heads` to read them.
* `mlp_interaction` / `mlp_eigen`: the bilinear MLP read along an output direction u:
  ``u . mlp(x) = x^T Q_u x`` with ``Q_u = sym(sum_h (u . W_out[:, h]) W_l[h]^T W_r[h])`` (no biases),
  eigendecomposed, eigenvectors read through the embedding.
* `analyze_model`: everything above for a report, as one JSON-able dict.

Circuits use weights only (no biases, no positional embeddings unless said), with norm gains folded
and the normalisation itself ignored (see `qtoy_core.analysis.weights`). Results are dataclasses
with ``to_dict()``.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .factored import FactoredMatrix, composition_score
from .weights import LayerWeights, ModelWeights, model_weights, relative_rotations, rotates

__all__ = [
    "CompositionScores", "EigenDirection", "HeadCircuits", "HeadPair", "MLPEigen", "OVCircuit",
    "PositionalKernel", "QKCircuit", "Result", "Spectrum", "TokenPair", "TopPairs",
    "DEFAULT_MAX_TOKENS", "DOMINANT_EIGENVALUE_SHARE", "QUADRATIC_NOTE",
    "analyze_layer_heads", "analyze_model", "composition_baseline", "composition_scores", "direct_path",
    "direct_path_top", "embeddings_tied", "few_threads", "induction_heads", "mlp_eigen", "mlp_interaction", "ov_circuit", "ov_matrix", "positional_qk",
    "qk_circuit", "qk_kernel", "qk_matrix", "rank_head_pairs", "search_topk", "spectrum", "top_pairs",
]

#: `top_pairs` searches at most this many rows and columns exhaustively (those with the largest
#: factor norms); beyond that the result carries ``exact`` (certified or not) - see `search_topk`.
DEFAULT_MAX_TOKENS = 4096

#: A circuit whose largest eigenvalue has at least this share of ``sum |eig|`` has a copying score
#: set by that one eigenvalue: it outweighs all the others together, so (when it is real) the sign of
#: ``sum Re(eig)`` is its sign whatever the others do. Nearly rank-one OV circuits land here.
DOMINANT_EIGENVALUE_SHARE = 0.5

QUADRATIC_NOTE = ("quadratic attention: the attention score (pattern entry, no softmax) is the SQUARE of this "
                  "bilinear form, so its sign does not matter; pairs are ranked by |form| and `squared` is the score")
BILINEAR_NOTE = ("bilinear attention: the attention score is the product of the two QK forms (factor 0 and 1); "
                 "`other_factor` is the other form at the pair and `score` the product")
OTHER_NOTE = "this attention's pattern is not a product of QK forms: the form is its pre-normalisation score"


# --------------------------------------------------------------------------------------- results
def _jsonable(x: Any) -> Any:
    if is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.is_complex():
            return _jsonable(torch.stack([x.real, x.imag], -1).tolist())
        return _jsonable(x.tolist())
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, complex):
        return [_jsonable(x.real), _jsonable(x.imag)]
    return x


class Result:
    """Mixin: ``to_dict()`` gives plain JSON-able data (tensors as lists, NaN/inf as None)."""

    def to_dict(self) -> dict:
        return _jsonable(self)


@dataclass
class TokenPair(Result):
    """One entry of a circuit. ``value`` is the circuit entry (for QK: the scaled form)."""

    row: int
    col: int
    value: float
    row_token: str | None = None
    col_token: str | None = None
    squared: float | None = None  # quadratic attention: value**2, the attention score
    other_factor: float | None = None  # bilinear attention: the other QK form at this pair
    score: float | None = None  # the attention score at this pair (squared, or the product of forms)
    logit: float | None = None  # direct path: the raw W_E W_U entry (``value`` is then row-centred)


@dataclass
class TopPairs(Result):
    """The top entries of a circuit, best first.

    ``exact`` is True when the search was exhaustive or provably found the true top entries (see
    `search_topk`); ``searched_rows``/``searched_cols`` say how much was searched exhaustively.
    """

    circuit: str
    rows: str
    cols: str
    ranked_by: str
    pairs: list[TokenPair]
    layer: int | None = None
    head: int | None = None
    factor: int | None = None
    score_is_squared: bool = False
    note: str = ""
    exact: bool = True
    searched_rows: int = 0
    searched_cols: int = 0


@dataclass
class Spectrum(Result):
    """Eigenvalues of a square circuit (largest modulus first, ``[re, im]`` in JSON), all its
    nonzero ones among them; ``copying_score`` = sum(Re eig) / sum(|eig|) in [-1, 1].

    ``top_share`` = |eig_1| / sum(|eig|) (1 for a rank-one circuit); ``copying_score_rest`` is the
    copying score of the other eigenvalues (None when they are below 1e-6 of the total): when ``top_share`` is at
    least `DOMINANT_EIGENVALUE_SHARE` the score is set by the top eigenvalue alone (``one_eigenvalue``)
    and the rest may well have the opposite sign."""

    eigenvalues: Tensor
    copying_score: float
    n_nonzero_max: int
    top_share: float = 0.0
    copying_score_rest: float | None = None

    @property
    def one_eigenvalue(self) -> bool:
        return self.top_share >= DOMINANT_EIGENVALUE_SHARE


@dataclass
class PositionalKernel(Result):
    """The QK form of token pairs as a function of the query-key offset (query at position
    ``offset``, key at position 0, through the model's own rotation). ``forms[p][o]`` is the scaled
    form of pair ``p`` at offset ``offsets[o]``; ``scores`` the attention score (squared for
    quadratic attention, else the form)."""

    layer: int
    head: int
    factor: int
    pairs: list[tuple[int, int]]
    offsets: list[int]
    forms: Tensor
    scores: Tensor
    score_is_squared: bool
    position_dependent: bool
    pair_tokens: list[tuple[str | None, str | None]] | None = None
    note: str = ""


@dataclass
class QKCircuit(Result):
    """One QK pair of one head: top pairs at offset 0, its spectrum, the positional kernel."""

    factor: int
    scale: float
    top_pairs: TopPairs
    spectrum: Spectrum
    kernel: PositionalKernel | None = None


@dataclass
class OVCircuit(Result):
    top_pairs: TopPairs
    spectrum: Spectrum

    @property
    def copying_score(self) -> float:
        return self.spectrum.copying_score


@dataclass
class HeadCircuits(Result):
    layer: int
    head: int
    qk: list[QKCircuit]
    ov: OVCircuit
    copying_score: float
    positional_profile: list[float] | None = None  # learned W_pos: mean W_pos QK form per offset
    ov_top_share: float = 0.0  # the top OV eigenvalue's share of sum |eig| (see Spectrum.top_share)
    ov_one_eigenvalue: bool = False  # ov_top_share >= DOMINANT_EIGENVALUE_SHARE: the score is that eigenvalue's


@dataclass
class CompositionScores(Result):
    """Scores of heads in ``layer_to`` reading heads in ``layer_from``: ``q``/``k`` are
    (n_qk_factors, heads_from, heads_to), ``v`` is (heads_from, heads_to); ``baseline`` is the mean
    score of random Gaussian weights of the same shapes (what an untrained model would show)."""

    layer_from: int
    layer_to: int
    q: Tensor
    k: Tensor
    v: Tensor
    baseline: dict[str, float]


@dataclass
class HeadPair(Result):
    kind: str
    layer_from: int
    head_from: int
    layer_to: int
    head_to: int
    score: float
    baseline: float
    factor: int | None = None
    copying_score_to: float | None = None


@dataclass
class EigenDirection(Result):
    """One eigenvector v of Q_u (eigenvalue ``eigenvalue``): ``top_tokens`` are the input tokens
    whose embedding has the largest |W_E v| (their contribution to u . mlp is eigenvalue * (x.v)^2)."""

    eigenvalue: float
    top_tokens: list[dict]


@dataclass
class MLPEigen(Result):
    layer: int
    output: str
    output_token: int | None
    eigenvalues: Tensor
    directions: list[EigenDirection]
    trace: float
    note: str = "u . mlp(x) = x^T Q_u x exactly (no biases); eigenvalues sorted by |value|"


# ---------------------------------------------------------------------------------- circuits
@contextmanager
def few_threads(n: int = 1):
    """Run small dense decompositions (eig, eigh, QR of d_head-sized matrices) on ``n`` threads:
    they gain nothing from more, and multi-threaded LAPACK on an oversubscribed CPU can be 100x
    slower. Restores the previous count afterwards."""
    old = torch.get_num_threads()
    if old <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _weights(model: Any) -> ModelWeights:
    return model if isinstance(model, ModelWeights) else model_weights(model)


def _layer(w: ModelWeights, layer: int) -> LayerWeights:
    if not 0 <= layer < len(w.layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(w.layers)} layer(s)")
    lw = w.layers[layer]
    if not lw.has_circuits:
        raise TypeError(f"blocks.{layer}.attn ({lw.attn_type}) offers no W_Q/W_K/W_V/W_O weight views")
    return lw


def _qk_pair(lw: LayerWeights, factor: int) -> tuple[Tensor, Tensor, float]:
    pairs = lw.qk_pairs
    if not 0 <= factor < len(pairs):
        raise ValueError(f"factor {factor} is out of range: blocks.{lw.layer}.attn has {len(pairs)} QK pair(s)")
    q, k, scale = pairs[factor]
    return lw.attn[q], lw.attn[k], scale


def direct_path(model: Any) -> FactoredMatrix:
    """``W_E W_U`` (vocab x vocab): row = current token, column = next-token logit."""
    w = _weights(model)
    return FactoredMatrix(w.W_E, w.W_U)


def _heads_matmul(x: Tensor, W: Tensor) -> Tensor:
    """x (n, d_model) @ W (H, d_model, d) for every head as one matmul -> (H, n, d) (a view)."""
    H, d_model, d = W.shape
    return (x @ W.permute(1, 0, 2).reshape(d_model, H * d)).view(x.shape[0], H, d).transpose(0, 1)


def _rotated(A: Tensor, w: ModelWeights, offset: int) -> Tensor:
    """A (..., d_head) times the relative rotation K(offset) (skipped when it is the identity)."""
    K = relative_rotations(w.positional, [offset], A.shape[-1], A.dtype)[0]
    return A if torch.equal(K, torch.eye(K.shape[0], dtype=K.dtype)) else A @ K


def qk_matrix(model: Any, layer: int, *, factor: int = 0, offset: int = 0) -> FactoredMatrix:
    """``scale * W_Q[h] K(o) W_K[h]^T`` (n_head, d_model, d_model): residual (query) x residual (key)."""
    w = _weights(model)
    lw = _layer(w, layer)
    W_Q, W_K, scale = _qk_pair(lw, factor)
    return FactoredMatrix(_rotated(scale * W_Q, w, offset), W_K.mT)


def qk_circuit(model: Any, layer: int, *, factor: int = 0, offset: int = 0) -> FactoredMatrix:
    """QK circuit (n_head, vocab, vocab): query token x key token, the scaled bilinear form
    ``scale * W_E W_Q[h] K(o) W_K[h]^T W_E^T`` for a query ``offset`` positions after the key.
    For quadratic attention the pattern entry is this form squared."""
    w = _weights(model)
    lw = _layer(w, layer)
    W_Q, W_K, scale = _qk_pair(lw, factor)
    A = _rotated(_heads_matmul(w.W_E, W_Q * scale), w, offset)
    return FactoredMatrix(A, _heads_matmul(w.W_E, W_K).mT)


def ov_matrix(model: Any, layer: int) -> FactoredMatrix:
    """``W_V[h] W_O[h]`` (n_head, d_model, d_model): what a head writes for a residual it attends to."""
    lw = _layer(_weights(model), layer)
    return FactoredMatrix(lw.attn["W_V"], lw.attn["W_O"])


def ov_circuit(model: Any, layer: int) -> FactoredMatrix:
    """OV circuit (n_head, vocab, vocab): source token x output logit, ``W_E W_V[h] W_O[h] W_U``."""
    w = _weights(model)
    lw = _layer(w, layer)
    W_O = lw.attn["W_O"]
    H, d_head, d_model = W_O.shape
    OU = (W_O.reshape(H * d_head, d_model) @ w.W_U).view(H, d_head, -1)
    return FactoredMatrix(_heads_matmul(w.W_E, lw.attn["W_V"]), OU)


def positional_qk(model: Any, layer: int, *, factor: int = 0) -> FactoredMatrix | None:
    """``scale * W_pos W_Q[h] W_K[h]^T W_pos^T`` (n_head, n_ctx, n_ctx) for learned positions, else None."""
    w = _weights(model)
    if w.W_pos is None:
        return None
    lw = _layer(w, layer)
    W_Q, W_K, scale = _qk_pair(lw, factor)
    return FactoredMatrix(_heads_matmul(w.W_pos, W_Q * scale), _heads_matmul(w.W_pos, W_K).mT)


@torch.no_grad()
def qk_kernel(model: Any, layer: int, head: int, pairs: Sequence[tuple[int, int]], *, factor: int = 0,
              offsets: Iterable[int] | None = None) -> Tensor:
    """(len(pairs), len(offsets)): the scaled QK form of each (query token, key token) pair for a
    query at position ``offset`` and a key at position 0 (default offsets 0..n_ctx-1), through the
    model's own ``positional.rotate``. With RoPE the form depends on the offset only; for quadratic
    attention the attention score is its square."""
    w = _weights(model)
    lw = _layer(w, layer)
    W_Q, W_K, scale = _qk_pair(lw, factor)
    offsets = torch.as_tensor(list(range(max(w.n_ctx, 1)) if offsets is None else offsets), dtype=torch.long)
    idx = torch.as_tensor([list(p) for p in pairs], dtype=torch.long).view(-1, 2)
    q = w.W_E[idx[:, 0]] @ W_Q[head]  # (P, d_head)
    k = w.W_E[idx[:, 1]] @ W_K[head]
    P, d = q.shape
    if w.positional is None:
        return scale * (q * k).sum(-1)[:, None].expand(P, len(offsets)).clone()
    q_rot = w.positional.rotate(q[None, :, None, :].expand(1, P, len(offsets), d).contiguous(), offsets)
    k_rot = w.positional.rotate(k[None, :, None, :].contiguous(), torch.zeros(1, dtype=torch.long))
    return scale * (q_rot * k_rot).sum(-1)[0]


def spectrum(fm: FactoredMatrix, top: int | None = None) -> list[Spectrum]:
    """Eigenvalues and copying score of each square matrix in ``fm`` (one `Spectrum` per batch entry)."""
    with few_threads():
        eig = fm.eigenvalues()
    eig = eig.reshape(-1, eig.shape[-1])
    out = []
    for e in eig:
        mod = e.abs()
        denom = float(mod.sum())
        score = float(e.real.sum()) / denom if denom > 0 else 0.0
        # eigenvalues come largest modulus first: e[0] is the top one
        share = float(mod[0]) / denom if denom > 0 else 0.0
        rest_denom = float(mod[1:].sum())
        # the rest of a rank-one circuit is rounding noise: no score for it
        rest = float(e.real[1:].sum()) / rest_denom if rest_denom > 1e-6 * denom else None
        out.append(Spectrum(e[:top] if top else e, score, e.shape[-1], share, rest))
    return out


# ------------------------------------------------------------------------------------ top-k
@dataclass
class _Found:
    values: Tensor
    rows: Tensor
    cols: Tensor
    exact: bool
    searched_rows: int
    searched_cols: int


def search_topk(fm: FactoredMatrix, k: int, *, abs: bool = False, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                rows: Tensor | None = None, cols: Tensor | None = None) -> list[_Found]:
    """Top-``k`` entries of each 2-D slice of ``fm`` (largest value, or largest |value|).

    Exhaustive (`FactoredMatrix.topk`, streamed, never materialised) when both sides have at most
    ``max_tokens`` (None: no limit). Beyond that only the ``max_tokens`` rows and columns with the
    largest factor norms are searched (or the given ``rows``/``cols``), which bounds the cost at
    ``max_tokens^2 * inner`` per slice; the result is still ``exact`` (certified) when the
    Cauchy-Schwarz bound ``||a_i|| ||b_j||`` of every entry outside the searched block is below the
    k-th value found, as it usually is for trained embeddings whose norms vary a lot. Exhaustive
    search of a vocab-50257 circuit costs 50257^2 * d_head multiply-adds per head: see
    benchmarks/analysis_scaling.py.
    """
    A = fm.A.expand(*fm.batch_shape, *fm.A.shape[-2:]).reshape(-1, *fm.A.shape[-2:])
    B = fm.B.expand(*fm.batch_shape, *fm.B.shape[-2:]).reshape(-1, *fm.B.shape[-2:])
    m, n = fm.ldim, fm.rdim
    out = []
    for a, b in zip(A, B):
        r_idx, c_idx = rows, cols
        if r_idx is None and max_tokens is not None and m > max_tokens:
            r_idx = torch.linalg.vector_norm(a, dim=1).topk(max_tokens).indices
        if c_idx is None and max_tokens is not None and n > max_tokens:
            c_idx = torch.linalg.vector_norm(b, dim=0).topk(max_tokens).indices
        sub_a = a if r_idx is None else a.index_select(0, r_idx)
        sub_b = b if c_idx is None else b.index_select(1, c_idx)
        kk = min(k, sub_a.shape[0] * sub_b.shape[1])
        res = FactoredMatrix(sub_a, sub_b).topk(kk, abs=abs)
        rr = res.rows if r_idx is None else r_idx[res.rows]
        cc = res.cols if c_idx is None else c_idx[res.cols]
        exact = True
        if r_idx is not None or c_idx is not None:
            exact = _certified(a, b, r_idx, c_idx, res.values, k, abs)
        out.append(_Found(res.values, rr, cc, exact, sub_a.shape[0], sub_b.shape[1]))
    return out


def _certified(a: Tensor, b: Tensor, r_idx: Tensor | None, c_idx: Tensor | None, values: Tensor, k: int,
               abs: bool) -> bool:
    """True when no entry outside the searched block can beat the k-th value found."""
    if values.numel() < k:
        return False
    kth = float(values.abs().min() if abs else values.min())
    rn = torch.linalg.vector_norm(a, dim=1)
    cn = torch.linalg.vector_norm(b, dim=0)

    def outside(norms: Tensor, idx: Tensor | None) -> float:
        if idx is None:
            return 0.0
        mask = torch.ones_like(norms, dtype=torch.bool)
        mask[idx] = False
        return float(norms[mask].max()) if mask.any() else 0.0

    bound = max(outside(rn, r_idx) * float(cn.max()), float(rn.max()) * outside(cn, c_idx))
    slack = 1.0 + 4 * (a.shape[1] + 2) * torch.finfo(a.dtype).eps
    return bound * slack < kth


def _decode(tokenizer: Any, i: int) -> str | None:
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode([int(i)])
    except Exception:  # noqa: BLE001 - a report must not fail on one odd token
        return None


def _entries(fm2d: FactoredMatrix, rows: Tensor, cols: Tensor) -> Tensor:
    return (fm2d.A[rows] * fm2d.B[:, cols].T).sum(-1)


def top_pairs(fm: FactoredMatrix, k: int = 10, *, circuit: str, rows: str, cols: str, abs: bool = False,
              tokenizer: Any = None, layer: int | None = None, heads: Sequence[int] | None = None,
              factor: int | None = None, score_is_squared: bool = False, note: str = "",
              other: FactoredMatrix | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> list[TopPairs]:
    """`TopPairs` for each 2-D slice of ``fm`` (heads in order). ``score_is_squared`` adds the
    squared value of each pair; ``other`` (same batch shape) adds the other QK form and the product."""
    found = search_topk(fm, k, abs=abs, max_tokens=max_tokens)
    others = None
    if other is not None:
        oa = other.A.expand(*other.batch_shape, *other.A.shape[-2:]).reshape(-1, *other.A.shape[-2:])
        ob = other.B.expand(*other.batch_shape, *other.B.shape[-2:]).reshape(-1, *other.B.shape[-2:])
        others = list(zip(oa, ob))
    out = []
    for i, f in enumerate(found):
        extra = None
        if others is not None:
            extra = _entries(FactoredMatrix(*others[i]), f.rows, f.cols)
        pairs = []
        for j in range(f.values.numel()):
            v, r, c = float(f.values[j]), int(f.rows[j]), int(f.cols[j])
            p = TokenPair(r, c, v, _decode(tokenizer, r), _decode(tokenizer, c))
            if score_is_squared:
                p.squared = p.score = v * v
            if extra is not None:
                p.other_factor = float(extra[j])
                p.score = v * p.other_factor
            pairs.append(p)
        out.append(TopPairs(circuit, rows, cols, "abs(value)" if abs else "value", pairs, layer,
                            None if heads is None else heads[i], factor, score_is_squared, note, f.exact,
                            f.searched_rows, f.searched_cols))
    return out


def embeddings_tied(model: Any) -> bool:
    """Whether ``W_U`` is ``W_E^T`` up to a per-dimension gain (tied embeddings, with a final norm's
    gain folded in): then ``W_E W_U`` is a (weighted) Gram matrix. Read off the weights."""
    w = _weights(model)
    E, U = w.W_E.T, w.W_U  # both (d_model, vocab)
    if E.shape != U.shape:
        return False
    g = (U * E).sum(1) / (E * E).sum(1).clamp_min(torch.finfo(E.dtype).tiny)
    return bool(torch.allclose(g[:, None] * E, U, rtol=1e-5, atol=1e-7 * float(U.abs().max().clamp_min(1e-30))))


def direct_path_top(model: Any, k: int = 10, *, tokenizer: Any = None,
                    max_tokens: int | None = DEFAULT_MAX_TOKENS, centre: bool = True,
                    exclude_diagonal: bool | None = None) -> TopPairs:
    """The top bigrams of the direct path: what the embedding and unembedding alone predict next.

    Ranked by the row-centred logit ``W_E W_U[t, u] - mean_u' W_E W_U[t, u']`` (``centre``; the
    softmax over next tokens ignores a row's constant) with the diagonal ``t -> t`` left out when
    ``exclude_diagonal`` (default: when the embeddings are tied, `embeddings_tied`): ``W_E W_E^T``'s
    diagonal is the squared embedding norms, not a prediction. Each pair's ``value`` is the ranked
    (centred) entry and ``logit`` the raw ``W_E W_U`` entry. Exhaustive up to ``max_tokens`` rows and
    columns, beyond that certified or not as in `search_topk`.
    """
    w = _weights(model)
    if exclude_diagonal is None:
        exclude_diagonal = embeddings_tied(w)
    a = w.W_E
    b = w.W_U - w.W_U.mean(1, keepdim=True) if centre else w.W_U
    m, n = a.shape[0], b.shape[1]
    r_idx = c_idx = None
    if max_tokens is not None and m > max_tokens:
        r_idx = torch.linalg.vector_norm(a, dim=1).topk(max_tokens).indices
    if max_tokens is not None and n > max_tokens:
        c_idx = torch.linalg.vector_norm(b, dim=0).topk(max_tokens).indices
    sub_a = a if r_idx is None else a.index_select(0, r_idx)
    sub_b = b if c_idx is None else b.index_select(1, c_idx)
    # every one of the top-k off-diagonal entries is among its row's top k + 1 entries
    per_row = min(k + int(exclude_diagonal), sub_b.shape[1])
    rt = FactoredMatrix(sub_a, sub_b).topk_rows(per_row)
    rows = (torch.arange(m) if r_idx is None else r_idx)[:, None].expand_as(rt.indices)
    cols = rt.indices if c_idx is None else c_idx[rt.indices]
    vals = rt.values.clone()
    if exclude_diagonal:
        vals[rows == cols] = float("-inf")
    vals, rows, cols = vals.flatten(), rows.flatten(), cols.flatten()
    kk = min(k, int(torch.isfinite(vals).sum()))
    best = vals.topk(kk)
    vals, rows, cols = best.values, rows[best.indices], cols[best.indices]
    exact = True
    if r_idx is not None or c_idx is not None:
        exact = _certified(a, b, r_idx, c_idx, vals, k, False)
    raw = (w.W_E[rows] * w.W_U[:, cols].T).sum(-1)
    pairs = [TokenPair(int(r), int(c), float(v), _decode(tokenizer, int(r)), _decode(tokenizer, int(c)),
                       logit=float(x)) for v, r, c, x in zip(vals, rows, cols, raw)]
    how = ("row-centred logit" if centre else "logit") + (", diagonal left out" if exclude_diagonal else "")
    note = ("W_E W_U: the logit the direct path gives the next token (bigram statistics)"
            + ("; ranked by the row-centred logit (the entry minus its row's mean: what the softmax sees)"
               if centre else "")
            + ("; t -> t left out: with tied embeddings W_E W_U is a Gram matrix whose diagonal is the squared "
               "embedding norms" if exclude_diagonal else "")
            + "; `logit` is the raw entry")
    return TopPairs("direct_path", "current token", "next-token logit", how, pairs, note=note, exact=exact,
                    searched_rows=sub_a.shape[0], searched_cols=sub_b.shape[1])


# ------------------------------------------------------------------------------ composition
def _gaussian_fm(g: torch.Generator, batch: int, m: int, r: int, n: int) -> FactoredMatrix:
    return FactoredMatrix(torch.randn(batch, m, r, generator=g), torch.randn(batch, r, n, generator=g))


def composition_baseline(d_model: int, d_head: int, *, samples: int = 16, seed: int = 0) -> dict[str, float]:
    """Mean Q/K/V composition score of random Gaussian weights with these shapes (rank-``d_head``
    OV and QK matrices in ``d_model`` dimensions): the level an untrained model shows. Scores are
    invariant to the weights' scale, so i.i.d. init of any std gives the same baseline."""
    return dict(_baseline(d_model, d_head, samples, seed))


@lru_cache(maxsize=32)
def _baseline(d_model: int, d_head: int, samples: int, seed: int) -> tuple[tuple[str, float], ...]:
    g = torch.Generator().manual_seed(seed)
    ov1 = _gaussian_fm(g, samples, d_model, d_head, d_model)
    qk2 = _gaussian_fm(g, samples, d_model, d_head, d_model)
    ov2 = _gaussian_fm(g, samples, d_model, d_head, d_model)
    with few_threads():
        return (("q", float(composition_score(ov1, qk2).mean())), ("k", float(composition_score(ov1, qk2.T).mean())),
                ("v", float(composition_score(ov1, ov2).mean())))


def _safe_composition(W_A: FactoredMatrix, W_B: FactoredMatrix) -> Tensor:
    """`composition_score`, 0 where either matrix is zero (e.g. a zero-initialised W_O)."""
    with few_threads():
        num = (W_A @ W_B).norm()
        den = W_A.norm() * W_B.norm()
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


@torch.no_grad()
def composition_scores(model: Any, layer_from: int, layer_to: int) -> CompositionScores:
    """Q-, K- and V-composition of every head of ``layer_to`` with every head of ``layer_from``.

    With ``W_OV = W_V W_O`` of the earlier head and ``W_QK = W_Q W_K^T`` of the later one (row
    form, d_model x d_model): Q: ||W_OV W_QK|| / (||W_OV|| ||W_QK||) (the earlier head writes what
    the query reads), K: the same with W_QK^T (what the key reads), V: with the later W_OV. One Q/K
    score per QK pair (bilinear attention has two). RoPE: W_QK at offset 0.
    """
    w = _weights(model)
    if not 0 <= layer_from < layer_to:
        raise ValueError(f"composition needs layer_from < layer_to, got {layer_from} and {layer_to}")
    l1, l2 = _layer(w, layer_from), _layer(w, layer_to)
    ov1 = FactoredMatrix(l1.attn["W_V"][:, None], l1.attn["W_O"][:, None])  # (H1, 1, d, d)
    ov2 = FactoredMatrix(l2.attn["W_V"][None], l2.attn["W_O"][None])  # (1, H2, d, d)
    q, k = [], []
    for f in range(len(l2.qk_pairs)):
        W_Q, W_K, _ = _qk_pair(l2, f)
        qk2 = FactoredMatrix(W_Q[None], W_K.mT[None])
        q.append(_safe_composition(ov1, qk2))
        k.append(_safe_composition(ov1, qk2.T))
    v = _safe_composition(ov1, ov2)
    return CompositionScores(layer_from, layer_to, torch.stack(q), torch.stack(k), v,
                             composition_baseline(w.d_model, l2.d_head))


def rank_head_pairs(model: Any, kind: str = "k", *, top: int | None = 10,
                    scores: Sequence[CompositionScores] | None = None) -> list[HeadPair]:
    """Head pairs (earlier head -> later head) by their ``kind`` ("q", "k" or "v") composition
    score, best first, over every pair of layers; Q/K scores take the best QK pair of the later head.
    An induction head is the later head of a strong K-composition pair whose earlier head attends
    to the previous token (and whose own OV circuit copies: see ``copying_score_to``)."""
    kind = kind.lower()
    if kind not in ("q", "k", "v"):
        raise ValueError(f"kind must be 'q', 'k' or 'v', not {kind!r}")
    w = _weights(model)
    if scores is None:
        scores = [composition_scores(w, a, b) for b in range(len(w.layers)) for a in range(b)
                  if w.layers[a].has_circuits and w.layers[b].has_circuits]
    copying = {}
    out = []
    for cs in scores:
        if cs.layer_to not in copying:
            copying[cs.layer_to] = [s.copying_score for s in spectrum(ov_circuit(w, cs.layer_to))]
        s = getattr(cs, kind)
        factor = None
        if kind in ("q", "k"):
            best, arg = s.max(0)
            s, factors = best, arg
        for h1 in range(s.shape[0]):
            for h2 in range(s.shape[1]):
                out.append(HeadPair(kind, cs.layer_from, h1, cs.layer_to, h2, float(s[h1, h2]),
                                    cs.baseline[kind], None if kind == "v" else int(factors[h1, h2]),
                                    copying[cs.layer_to][h2]))
    out.sort(key=lambda p: -p.score)
    return out[:top] if top else out


def induction_heads(model: Any, *, top: int = 5) -> list[HeadPair]:
    """Candidate induction circuits: K-composition pairs ranked by score (the later head's OV
    copying score alongside); a clear induction head scores well above ``baseline`` and copies."""
    return rank_head_pairs(model, "k", top=top)


# ----------------------------------------------------------------------------- bilinear MLP
def _mlp_views(w: ModelWeights, layer: int) -> dict:
    if not 0 <= layer < len(w.layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(w.layers)} layer(s)")
    lw = w.layers[layer]
    if not lw.is_bilinear_mlp:
        raise TypeError(f"blocks.{layer}.mlp ({lw.mlp_type or 'none'}) offers no bilinear W_l/W_r/W_out views")
    return lw.mlp


def mlp_interaction(model: Any, layer: int, u: Tensor) -> Tensor:
    """``Q_u = sym(sum_h (u . W_out[:, h]) W_l[h]^T W_r[h])`` (d_model, d_model): ``u . mlp(x) =
    x^T Q_u x`` for the bilinear MLP of ``layer`` (biases left out). ``u`` (d_model,) is any output
    direction, e.g. a token's unembedding ``W_U[:, t]``; a (n, d_model) batch gives (n, d, d)."""
    mlp = _mlp_views(_weights(model), layer)
    u = u.to(mlp["W_out"].dtype)
    c = u @ mlp["W_out"]  # (..., d_mlp)
    Q = mlp["W_l"].T @ (c[..., :, None] * mlp["W_r"])
    return 0.5 * (Q + Q.mT)


@torch.no_grad()
def mlp_eigen(model: Any, layer: int, u: Tensor | int, *, top: int = 4, top_tokens: int = 10,
              tokenizer: Any = None, output: str | None = None) -> MLPEigen:
    """Eigendecomposition (``torch.linalg.eigh``) of `mlp_interaction` for output direction ``u`` (a
    d_model vector, or an int: that token's unembedding ``W_U[:, u]``); the ``top`` eigenvectors by
    |eigenvalue| read through the embedding: the input tokens with the largest |W_E v|."""
    w = _weights(model)
    token = None
    if isinstance(u, int):
        token = u
        output = output or f"logit of token {u}" + (f" {_decode(tokenizer, u)!r}" if tokenizer else "")
        u = w.W_U[:, u]
    Q = mlp_interaction(w, layer, u)
    with few_threads():
        evals, evecs = torch.linalg.eigh(Q)
    order = evals.abs().argsort(descending=True)
    evals, evecs = evals[order], evecs[:, order]
    directions = []
    for i in range(min(top, evals.numel())):
        proj = w.W_E @ evecs[:, i]
        idx = proj.abs().topk(min(top_tokens, proj.numel())).indices
        directions.append(EigenDirection(float(evals[i]), [
            {"token": int(t), "text": _decode(tokenizer, int(t)), "projection": float(proj[t]),
             "contribution": float(evals[i] * proj[t] ** 2)} for t in idx]))
    return MLPEigen(layer, output or "direction u", token, evals, directions, float(evals.sum()))


def _mlp_output_tokens(w: ModelWeights, layer: int, n: int) -> list[int]:
    """The tokens the MLP can write to most: largest ||W_out^T W_U[:, t]|| (through the Gram matrix)."""
    W_out = w.layers[layer].mlp["W_out"]
    G = W_out @ W_out.T  # (d_model, d_model)
    with few_threads():
        evals, evecs = torch.linalg.eigh(G)
    L = evecs * evals.clamp_min(0).sqrt()
    strength = torch.linalg.vector_norm(w.W_U.T @ L, dim=1)
    return strength.topk(min(n, strength.numel())).indices.tolist()


# ------------------------------------------------------------------------------ the report
def _head_qk_note(lw: LayerWeights) -> tuple[bool, str]:
    if lw.score_is_squared:
        return True, QUADRATIC_NOTE
    if lw.attn.get("pattern") == "product" and len(lw.qk_pairs) > 1:
        return False, BILINEAR_NOTE
    if lw.attn.get("pattern") == "product":
        return False, "the attention score is the product of these forms"
    return False, OTHER_NOTE


@torch.no_grad()
def analyze_layer_heads(model: Any, layer: int, *, top_k: int = 10, tokenizer: Any = None,
                        kernel: bool = True, spectrum_top: int = 16,
                        max_tokens: int | None = DEFAULT_MAX_TOKENS) -> list[HeadCircuits]:
    """QK and OV circuits of every head of ``layer`` (see `analyze_model`)."""
    w = _weights(model)
    lw = _layer(w, layer)
    heads = list(range(lw.n_head))
    squared, note = _head_qk_note(lw)
    pairs = lw.qk_pairs
    qk_fms = [qk_circuit(w, layer, factor=f) for f in range(len(pairs))]
    qk_results: list[list[QKCircuit]] = [[] for _ in heads]
    position_dependent = rotates(w.positional, w.n_ctx, lw.d_head)
    for f, fm in enumerate(qk_fms):
        other = qk_fms[1 - f] if len(qk_fms) == 2 else None
        tops = top_pairs(fm, top_k, circuit="qk", rows="query token", cols="key token", abs=True,
                         tokenizer=tokenizer, layer=layer, heads=heads, factor=f, score_is_squared=squared,
                         note=note + ("; RoPE: this is the offset-0 form, see `kernel` for other offsets"
                                      if position_dependent else ""), other=other, max_tokens=max_tokens)
        specs = spectrum(fm, spectrum_top)
        for h in heads:
            kern = None
            if kernel and position_dependent and tops[h].pairs:
                pp = [(p.row, p.col) for p in tops[h].pairs]
                forms = qk_kernel(w, layer, h, pp, factor=f)
                kern = PositionalKernel(layer, h, f, pp, list(range(forms.shape[1])), forms,
                                        forms.square() if squared else forms, squared, True,
                                        [(_decode(tokenizer, a), _decode(tokenizer, b)) for a, b in pp]
                                        if tokenizer is not None else None,
                                        "query at position `offset`, key at 0 (RoPE: depends on the offset only)")
            qk_results[h].append(QKCircuit(f, pairs[f][2], tops[h], specs[h], kern))
    ov_fm = ov_circuit(w, layer)
    ov_tops = top_pairs(ov_fm, top_k, circuit="ov", rows="source token", cols="output logit", tokenizer=tokenizer,
                        layer=layer, heads=heads, max_tokens=max_tokens,
                        note="W_E W_V W_O W_U: the logit a head raises when it attends to the source token")
    ov_specs = spectrum(ov_fm, spectrum_top)
    profiles = [None] * len(heads)
    pos = positional_qk(w, layer)
    if pos is not None:
        dense = pos.AB  # (H, n_ctx, n_ctx): small
        if squared:
            dense = dense.square()
        n = dense.shape[-1]
        profiles = [[float(torch.diagonal(dense[h], -o).mean()) for o in range(n)] for h in heads]
    return [HeadCircuits(layer, h, qk_results[h], OVCircuit(ov_tops[h], ov_specs[h]), ov_specs[h].copying_score,
                         profiles[h], ov_specs[h].top_share, ov_specs[h].one_eigenvalue) for h in heads]


@torch.no_grad()
def analyze_model(model: Any, tokenizer: Any = None, top_k: int = 10, *, mlp_tokens: Sequence[int] | int = 3,
                  mlp_top: int = 4, kernel: bool = True, spectrum_top: int = 16,
                  max_tokens: int | None = DEFAULT_MAX_TOKENS) -> dict:
    """Everything weight-based about ``model`` for a report, as one JSON-able dict.

    Keys:
      ``model``: sizes and component names; ``notes``: caveats (folded norms, biases left out...).
      ``direct_path``: `TopPairs` of W_E W_U (top bigrams: current token -> next-token logit).
      ``layers``: one dict per layer with
        ``attention``: ``{"type", "pattern", "score_is_squared", "note", "heads": [HeadCircuits]}``;
          each head has ``qk`` (one `QKCircuit` per QK pair: ``top_pairs`` by |form| for quadratic
          attention with the squared score, ``spectrum``, ``kernel`` = `PositionalKernel` of the top
          pairs over offsets 0..n_ctx-1 when the positional rotates), ``ov`` (`OVCircuit`:
          ``top_pairs``, ``spectrum`` with ``copying_score``), ``copying_score`` and, for learned
          positions, ``positional_profile`` (mean W_pos QK score per offset).
        ``mlp``: for a bilinear MLP, `MLPEigen` for a few output tokens (``mlp_tokens``: token ids,
          or how many of the tokens the MLP writes to most), else None.
      ``composition``: for models with 2+ layers, `CompositionScores` per layer pair; ``head_pairs``:
        the top K-, Q-, V-composition pairs (`HeadPair`); else both empty.
      ``timing_s``: seconds per part.
    Token strings are added when ``tokenizer`` (with ``.decode([id])``) is given. Top pairs search
    at most ``max_tokens`` rows/columns exhaustively (see `search_topk`; ``exact`` says whether the
    result is certified).
    """
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    w = _weights(model)
    config = getattr(model, "config", None)
    info = {"vocab_size": w.vocab_size, "d_model": w.d_model, "n_layers": len(w.layers),
            "n_ctx": w.n_ctx, "tie_embeddings": bool(getattr(config, "tie_embeddings", False))}
    if w.layers and w.layers[0].has_circuits:
        info.update(n_head=w.layers[0].n_head, d_head=w.layers[0].d_head)
    if config is not None and hasattr(config, "components"):
        info.update({k: v.name for k, v in config.components().items()})
    timing["views"] = time.perf_counter() - t0

    t = time.perf_counter()
    direct = direct_path_top(w, top_k, tokenizer=tokenizer, max_tokens=max_tokens)
    timing["direct_path"] = time.perf_counter() - t

    layers = []
    for lw in w.layers:
        entry: dict[str, Any] = {"layer": lw.layer, "attention": None, "mlp": None}
        t = time.perf_counter()
        if lw.has_circuits:
            squared, note = _head_qk_note(lw)
            heads = analyze_layer_heads(w, lw.layer, top_k=top_k, tokenizer=tokenizer, kernel=kernel,
                                        spectrum_top=spectrum_top, max_tokens=max_tokens)
            entry["attention"] = {"type": lw.attn_type, "pattern": lw.attn.get("pattern"),
                                  "n_qk_pairs": len(lw.qk_pairs), "score_is_squared": squared, "note": note,
                                  "heads": [h.to_dict() for h in heads]}
        timing[f"layer{lw.layer}.attention"] = time.perf_counter() - t
        t = time.perf_counter()
        if lw.is_bilinear_mlp:
            toks = _mlp_output_tokens(w, lw.layer, mlp_tokens) if isinstance(mlp_tokens, int) else list(mlp_tokens)
            entry["mlp"] = {"type": lw.mlp_type, "outputs": [
                mlp_eigen(w, lw.layer, int(tok), top=mlp_top, top_tokens=top_k, tokenizer=tokenizer).to_dict()
                for tok in toks]}
        timing[f"layer{lw.layer}.mlp"] = time.perf_counter() - t

        layers.append(entry)

    t = time.perf_counter()
    comps = [composition_scores(w, a, b) for b in range(len(w.layers)) for a in range(b)
             if w.layers[a].has_circuits and w.layers[b].has_circuits]
    head_pairs = {kind: [p.to_dict() for p in rank_head_pairs(w, kind, top=top_k, scores=comps)]
                  for kind in ("k", "q", "v")} if comps else {}
    timing["composition"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0
    return _jsonable({"model": info, "notes": w.notes, "direct_path": direct, "layers": layers,
                      "composition": comps, "head_pairs": head_pairs, "timing_s": timing})
