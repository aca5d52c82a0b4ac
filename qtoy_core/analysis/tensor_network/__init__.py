"""Exact tensor networks (quimb) for polynomial qtoy models, and their circuits.

`to_tensor_network(model, n_ctx)` turns a model whose every component is polynomial (quadratic or
bilinear attention, bilinear MLP, RoPE / learned / no positions, no norm) into one
``quimb.tensor.TensorNetwork`` with an open index ``tok_in_{t}`` (size vocab) per input position
and an open index ``logit_{t}`` (size vocab) per output position. `contract_logits(tn, tokens)`
puts the tokens in and returns the logits of ``model(tokens)``, to float rounding.

One module per job (every public name is importable from here; the plugin-facing ones also from
``qtoy_core``):

* `capability`: what a component implements to have a network form (the `TensorNetworkAttention`,
  `TensorNetworkMLP`, `TensorNetworkPositional`, `TensorNetworkNorm` protocols), and the errors
  `NotPolynomialError` and `TensorNetworkBuildError`;
* `builder`: the algebra, `TNBuilder` with its `Wire`, `Stream` and `CausalKeys` (why a sum can be
  one network, why values are copied, and the index and tag names are explained there);
* `walk`: `to_tensor_network` and `check_polynomial`, the model walk calling each component;
* `contraction`: `contract_logits`, the natural contraction order `natural_tree` and the path cache
  (`PathCache`, `PATH_CACHE`);
* `circuits`: one head's QK, OV and full circuits as small networks (`qk_circuit_tn`,
  `ov_circuit_tn`, `full_circuit_tn`), read through the weight views of
  `qtoy_core.analysis.weights` as `qtoy analyze` reads them, and `rotation_matrices`.
"""

from __future__ import annotations

from .builder import CausalKeys, Stream, TNBuilder, Wire
from .capability import (
    NotPolynomialError,
    TensorNetworkAttention,
    TensorNetworkBuildError,
    TensorNetworkMLP,
    TensorNetworkNorm,
    TensorNetworkPositional,
)
from .circuits import full_circuit_tn, ov_circuit_tn, qk_circuit_tn, rotation_matrices
from .contraction import PATH_CACHE, PathCache, contract_logits, natural_tree
from .walk import check_polynomial, to_tensor_network

__all__ = [
    "CausalKeys",
    "NotPolynomialError",
    "PATH_CACHE",
    "PathCache",
    "Stream",
    "TNBuilder",
    "TensorNetworkAttention",
    "TensorNetworkBuildError",
    "TensorNetworkMLP",
    "TensorNetworkNorm",
    "TensorNetworkPositional",
    "Wire",
    "check_polynomial",
    "contract_logits",
    "full_circuit_tn",
    "natural_tree",
    "ov_circuit_tn",
    "qk_circuit_tn",
    "rotation_matrices",
    "to_tensor_network",
]
