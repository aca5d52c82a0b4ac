"""One head's circuits as small networks of weight matrices, to contract with quimb.

`qk_circuit_tn`, `ov_circuit_tn` and `full_circuit_tn` return networks with legs named after what
they carry (``tok_q``, ``resid_q``, ``head_q``, ``head_k``, ``resid_k``, ``tok_k``; ``tok_out``,
``resid_out``, ``head_v``, ``resid_in``, ``tok_in``). The weights come from the components' weight
views (`qtoy_core.analysis.weights.model_weights`), exactly as `qtoy analyze` reads them: every QK
pair an attention lists (bilinear attention's second pair included), any plugin attention that
offers ``weight_views()`` whatever its projections are called, and norm gains folded into the
weights that read the norm's output (the division by the RMS is not linear and is ignored).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..circuits import _layer
from ..weights import LayerWeights, ModelWeights, model_weights
from .capability import CAPABILITY, NotPolynomialError

if TYPE_CHECKING:
    import quimb.tensor as qtn

__all__ = ["full_circuit_tn", "ov_circuit_tn", "qk_circuit_tn", "rotation_matrices"]


def rotation_matrices(positional: Any, positions: Sequence[int], d_head: int) -> Tensor:
    """(len(positions), d_head, d_head) float64: the linear map ``positional.rotate`` applies to one
    head's query/key at each position (the identity without RoPE). Only for positional encodings
    with the tensor-network capability (their rotate is linear)."""
    if not callable(getattr(positional, CAPABILITY, None)):
        raise NotPolynomialError(f"positional encoding {type(positional).__name__} has no tensor_network() "
                                 f"form, so its rotation is not known to be linear")
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    eye = torch.eye(d_head, dtype=torch.float64)
    basis = eye[:, None, None, :].expand(d_head, 1, len(pos), d_head).contiguous()
    rotated = positional.rotate(basis, pos)  # [e, 0, t, :] = R_t e
    return rotated[:, 0].permute(1, 2, 0).contiguous()


def _head(model: Any, layer: int, head: int) -> tuple[ModelWeights, LayerWeights]:
    """The model's weight views in float64 and layer ``layer``'s, checked to have head ``head``."""
    w = model_weights(model, dtype=torch.float64)
    lw = _layer(w, layer)
    if not 0 <= head < lw.n_head:
        raise ValueError(f"head {head} is out of range: blocks.{layer}.attn has {lw.n_head} heads")
    return w, lw


def _np(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def _qk_tensors(w: ModelWeights, lw: LayerWeights, q_view: str, k_view: str, head: int, offset: int,
                scale: float, suffix: str = "") -> list:
    import quimb.tensor as qtn

    d = lw.d_head
    if w.positional is None:
        kernel = scale * torch.eye(d, dtype=torch.float64)
    else:
        rot = rotation_matrices(w.positional, [offset, 0], d)
        kernel = scale * (rot[0].T @ rot[1])  # q_rot . k_rot = q^T R_q^T R_k k
    W_E = _np(w.W_E)
    s = suffix
    return [
        qtn.Tensor(W_E, inds=("tok_q", f"resid_q{s}"), tags=("W_E", "QK")),
        qtn.Tensor(_np(lw.attn[q_view][head].T), inds=(f"head_q{s}", f"resid_q{s}"), tags=("W_Q", "QK")),
        qtn.Tensor(_np(kernel), inds=(f"head_q{s}", f"head_k{s}"), tags=("ROT", "QK")),
        qtn.Tensor(_np(lw.attn[k_view][head].T), inds=(f"head_k{s}", f"resid_k{s}"), tags=("W_K", "QK")),
        qtn.Tensor(W_E, inds=("tok_k", f"resid_k{s}"), tags=("W_E", "QK")),
    ]


def qk_circuit_tn(model: Any, layer: int, head: int, *, offset: int = 0, factor: int = 0) -> "qtn.TensorNetwork":
    """The QK circuit of one head as a network: W_E (``tok_q``, ``resid_q``), W_Q (``head_q``,
    ``resid_q``), the relative rotation (``head_q``, ``head_k``; the identity without RoPE), W_K
    (``head_k``, ``resid_k``), W_E (``tok_k``, ``resid_k``). Contracted: the (vocab, vocab) form
    ``W_E W_Q W_K^T W_E^T`` (TransformerLens orientation; ``R`` between the two for RoPE) for a
    query ``offset`` positions after the key, unscaled and without biases or positional
    embeddings, norm gains folded (`qtoy_core.analysis.weights`). ``factor`` picks one of the QK
    forms the attention's weight views list under ``qk`` (its ``qk_factors()``; bilinear
    attention: 0 = q/k, 1 = q2/k2; a repeated factor, as in quadratic attention, is the same
    form). ``model`` may also be a `ModelWeights`."""
    import quimb.tensor as qtn

    w, lw = _head(model, layer, head)
    factors = lw.qk
    if not 0 <= factor < len(factors):
        raise ValueError(f"factor {factor} is out of range: blocks.{layer}.attn has {len(factors)} QK factor(s)")
    q_view, k_view, _ = factors[factor]
    return qtn.TensorNetwork(_qk_tensors(w, lw, q_view, k_view, head, offset, 1.0))


def _ov_tensors(w: ModelWeights, lw: LayerWeights, head: int, tok_in: str = "tok_in") -> list:
    import quimb.tensor as qtn

    return [
        qtn.Tensor(_np(w.W_U.T), inds=("tok_out", "resid_out"), tags=("W_U", "OV")),
        qtn.Tensor(_np(lw.attn["W_O"][head].T), inds=("resid_out", "head_v"), tags=("W_O", "OV")),
        qtn.Tensor(_np(lw.attn["W_V"][head].T), inds=("head_v", "resid_in"), tags=("W_V", "OV")),
        qtn.Tensor(_np(w.W_E), inds=(tok_in, "resid_in"), tags=("W_E", "OV")),
    ]


def ov_circuit_tn(model: Any, layer: int, head: int) -> "qtn.TensorNetwork":
    """The OV circuit of one head: W_U (``tok_out``, ``resid_out``), W_O (``resid_out``, ``head_v``),
    W_V (``head_v``, ``resid_in``), W_E (``tok_in``, ``resid_in``). Contracted: the (vocab, vocab)
    matrix ``(W_E W_V W_O W_U)^T`` (weights only, no biases; norm gains folded, ln1's into W_V and
    ln_final's into W_U). ``model`` may also be a `ModelWeights`."""
    import quimb.tensor as qtn

    w, lw = _head(model, layer, head)
    return qtn.TensorNetwork(_ov_tensors(w, lw, head))


def full_circuit_tn(model: Any, layer: int, head: int, *, offset: int = 0) -> "qtn.TensorNetwork":
    """What one key token does to the logits through one head, as a network with open indices
    ``tok_q``, ``tok_k``, ``tok_out``: ``prod_f (scale_f QK_f[tok_q, tok_k]) * OV[tok_out, tok_k]`` (for
    quadratic attention ``(scale QK)^2 OV``, for bilinear ``(scale QK_1)(scale QK_2) OV``) for a
    query ``offset`` positions after the key. Each factor is its own copy of the QK network
    (legs suffixed ``_0``, ``_1``, ...) and they share the token hyperindices ``tok_q`` / ``tok_k``
    (exact, tokens being one-hot). Contract with
    ``tn.contract(output_inds=("tok_q", "tok_k", "tok_out"))``. Needs an attention whose weight views
    declare the pattern a product of the QK forms they list (``pattern == "product"``: an attention
    with ``qk_factors()``, e.g. any `qtoy_core.QKProductAttention`)."""
    import quimb.tensor as qtn

    w, lw = _head(model, layer, head)
    if lw.attn.get("pattern") != "product":
        raise NotPolynomialError(f"blocks.{layer}.attn ({lw.attn_type}) does not declare its pattern as a product "
                                 f"of QK factors (qk_factors(), or 'pattern': 'product' in its weight_views()), so "
                                 f"its full circuit is not known")
    tensors = []
    for f, (q_view, k_view, scale) in enumerate(lw.qk):
        tensors += _qk_tensors(w, lw, q_view, k_view, head, offset, scale, suffix=f"_{f}")
    tensors += _ov_tensors(w, lw, head, tok_in="tok_k")
    return qtn.TensorNetwork(tensors)
