"""The tensor-network capability: what a component implements, and the errors of the walk.

A component becomes analysable by implementing one method that builds its tensor-network form with
a `TNBuilder` (the protocols below). The model walk (`walk.to_tensor_network`) calls these methods
and never looks at component names; a component without the method is refused with
`NotPolynomialError`. Example (a cubic attention, pattern ``(q.k * scale)^3``; an attention whose
pattern is a product of QK forms gets this method from `qtoy_core.QKProductAttention` by declaring
its ``qk_factors()``)::

    def tensor_network(self, tn, x, *, positional):
        q = positional.tensor_network(tn, tn.project(x, self.q_proj), op="rotate")
        k = positional.tensor_network(tn, tn.project(x, self.k_proj), op="rotate")
        v = tn.project(x, self.v_proj)

        def at(i):
            keys = tn.causal_keys(i)                     # key index sigma over 0..i
            s = [tn.head_dot(q(i), keys(k), self.n_head, scale=self.scale) for _ in range(3)]
            z = tn.head_scale(tn.mul(*s), keys(v), self.n_head)   # pattern * v, per head
            return tn.linear(keys.sum(z), self.out_proj.weight, self.out_proj.bias)

        return tn.stream(at, self.out_proj.out_features, "attn_out")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from qtoy_registry import QtoyError

if TYPE_CHECKING:
    from .builder import Stream, TNBuilder

__all__ = ["CAPABILITY", "NotPolynomialError", "TensorNetworkAttention", "TensorNetworkBuildError",
           "TensorNetworkMLP", "TensorNetworkNorm", "TensorNetworkPositional"]

#: The method name a component implements to have an exact tensor-network form.
CAPABILITY = "tensor_network"


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
class NotPolynomialError(QtoyError, TypeError):
    """The model has a component with no exact tensor-network form (softmax, RMSNorm, gelu, ...)."""


class TensorNetworkBuildError(QtoyError, RuntimeError):
    """A component's `tensor_network` method used the builder wrongly (e.g. a wire used twice)."""


# ------------------------------------------------------------------------------------------------
# The capability: what a component implements (documented protocols)
# ------------------------------------------------------------------------------------------------
@runtime_checkable
class TensorNetworkAttention(Protocol):
    """An attention module with an exact tensor-network form.

    ``tensor_network(tn, x, *, positional) -> Stream``: ``x`` is the (normed) residual stream
    (width d_model); return the stream of the attention's output (width d_model, what the module's
    forward adds to the residual). Rotate queries and keys with
    ``positional.tensor_network(tn, stream, op="rotate")``. Build the causal sum over keys with
    `TNBuilder.causal_keys`. Per-head vectors are flat (heads contiguous, like ``view(n_head, d_head)``).
    """

    def tensor_network(self, tn: "TNBuilder", x: "Stream", *, positional: Any) -> "Stream": ...


@runtime_checkable
class TensorNetworkMLP(Protocol):
    """``tensor_network(tn, x) -> Stream``: the MLP's output stream (width d_model) from its input."""

    def tensor_network(self, tn: "TNBuilder", x: "Stream") -> "Stream": ...


@runtime_checkable
class TensorNetworkPositional(Protocol):
    """``tensor_network(tn, x, *, op) -> Stream`` mirrors the two torch methods of a positional
    encoding: ``op="embed"`` transforms the embedded residual stream (learned positions add
    ``W_pos[t]``), ``op="rotate"`` transforms a flat per-head query/key stream (RoPE rotates each head
    by the position's rotation). Return ``x`` itself where the encoding does nothing."""

    def tensor_network(self, tn: "TNBuilder", x: "Stream", *, op: Literal["embed", "rotate"]) -> "Stream": ...


@runtime_checkable
class TensorNetworkNorm(Protocol):
    """``tensor_network(tn, x) -> Stream``; only the identity ('none') is polynomial among built-ins."""

    def tensor_network(self, tn: "TNBuilder", x: "Stream") -> "Stream": ...
