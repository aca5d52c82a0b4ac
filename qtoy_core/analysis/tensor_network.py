"""Exact tensor networks (quimb) for polynomial qtoy models, and their circuits.

`to_tensor_network(model, n_ctx)` turns a model whose every component is polynomial (quadratic or
bilinear attention, bilinear MLP, RoPE / learned / no positions, no norm) into one
``quimb.tensor.TensorNetwork`` with an open index ``tok_in_{t}`` (size vocab) per input position
and an open index ``logit_{t}`` (size vocab) per output position. `contract_logits(tn, tokens)`
puts the tokens in and returns the logits of ``model(tokens)``, to float rounding.

Why a sum can be one network: homogenisation
--------------------------------------------
A tensor network is a *multilinear* function of its tensors, so it cannot add two things directly
(``a + b`` is not multilinear in ``(a, b)``), and a transformer adds everywhere: the residual stream,
biases, and the causal sum over key positions. The fix is to carry every vector ``x`` of size ``d``
*augmented* as ``[1; x]`` (size ``d + 1``, index 0 holding the constant 1). On augmented vectors each
operation is a small multilinear tensor whose output again has constant component 1:

* affine map ``W x + b``: the ``(d'+1, d+1)`` matrix ``[[1, 0], [b, W]]``;
* elementwise product ``x * y``: ``[1; x] * [1; y] = [1; x * y]``, so the two vectors simply share
  one index (a hyperedge: no tensor at all). Per-head dot products are then a product followed by
  a thin (n_head+1, d+1) map summing each head's entries; "each head's value times its pattern
  weight" is a thin map copying each head's weight over its entries, then a product;
* any other multilinear map ``T(x, y, ...)``: ``T`` padded with zeros and a 1 at the all-constant
  entry (`TNBuilder.multilinear`);
* selection ``x_sigma`` of one of ``x_0 .. x_{n-1}`` by a *sum index* ``sigma`` (size ``n``): one
  tensor ``G_j[sigma, out, a_j]`` per input, equal to ``delta(out, a_j)`` when ``sigma == j`` and to
  ``delta(a_j, 0)`` otherwise (which reads ``x_j``'s constant 1), all sharing ``sigma`` and ``out``:
  for each value of ``sigma`` their product is ``x_sigma``. ``G_j`` is stored factored through a
  2-valued "picked?" index, ``P_j[sigma, c] Q[c, out, a_j]``, so it costs about two matrix-vector
  products;
* sum over ``sigma``: the summed term keeps its index and one ``(n, d+1)`` tensor of ones sums
  ``sigma`` (its constant entry is 1 for ``sigma = 0`` only, so the constant stays 1);
* residual add ``x_0 + ... + x_{n-1}``: a selection followed by that sum (fused into ``n`` tensors);
* causal attention ``z_i = sum_{j<=i} f(q_i, k_j, v_j)``: a key index ``sigma`` (size ``i + 1``)
  selects ``k_sigma`` and ``v_sigma`` from the keys (`CausalKeys`), the term ``f`` is built once
  from them, and ``sigma`` is summed.

Every tensor is exact (entries are weights, 0 or 1, or exact products of them), so the network is
the model's polynomial exactly; the only error is float rounding of another summation order.
Affine maps that follow one another (an embedding, then W_K, then a RoPE rotation) are multiplied
into one tensor while the network is built.

Copies, not shared wires
------------------------
Multilinearity has a second consequence: a *value* cannot be used twice by sharing its index
(``sum_i x_i A_i B_i`` is ``A diag(x) B^T``, not ``(A x)(B x)^T``). A value used ``k`` times
(queries in ``(q.k)^2``, the two MLP branches, a residual read by attention and by the next add)
is built ``k`` times, each copy its own subnetwork (`Stream` builds a fresh copy on each call).
The one exception is the token input: one-hot vectors are idempotent (``e_t * e_t = e_t``), so all
copies of an embedding share the open hyperindex ``tok_in_{t}``. Hence:

* The network is exact for **one-hot** inputs (what `contract_logits` feeds). Putting a general
  vector on ``tok_in_{t}`` is not the model applied to a mixture of embeddings.
* Each output ``logit_{t}`` has its own subnetwork (tensors tagged ``out_{t}``), joined to the
  others only through the shared ``tok_in_*`` hyperindices. Contracting the *whole* network with
  its ``logit_*`` indices open gives the outer product of the per-position logits;
  `contract_logits` contracts each ``out_{t}`` part on its own, and replaces every ``tok_in_{s}``
  leg by the chosen token (a slice, so that a batch of sequences shares one ``batch`` index).
* The size grows with depth: a layer multiplies the copies of its input by about
  ``3 T`` (keys and values) and an MLP by 3, so for two layers the network has tens of thousands
  of small tensors at ``n_ctx = 8``, and three layers are practical only for very short contexts.
  See docs/tensor_networks.md for measured sizes and times.
* Contraction paths: cotengra's greedy searches are slow on networks this size and find worse
  paths, so by default `contract_logits` contracts the indices in the order the model computes
  (the ``#{rank}`` suffix of every index name, `natural_tree`), as a cotengra ``ContractionTree``.

Index and tag conventions
-------------------------
* ``tok_in_{t}`` (vocab): token at position ``t`` (a hyperindex shared by every embedding copy).
* ``logit_{t}`` (vocab): output logits at position ``t`` (not augmented).
* every other index is named ``{scope}.{label}#{rank}``: ``scope`` is the module path (``embed``,
  ``positional``, ``blocks.0.attn``, ``blocks.0.mlp``, ``blocks.0`` for residual adds, ``unembed``),
  ``label`` what the leg carries, ``rank`` its place in the evaluation order. Augmented legs (entry
  0 is the constant 1), e.g. ``resid_mid``, ``resid_post`` (residual stream after attention / MLP),
  ``scores_terms`` (q * k before the per-head sum), ``pattern``, ``z``, ``hidden``, ``mlp_out``; a
  leg shared by a product or a key sum takes the label of the result, and legs inside tensors
  that were multiplied together (``q``, ``k``, ``v``, ``scores``, ``left``, ``attn_out``, ...) no
  longer exist. Plain legs: ``key<={i}`` (size i+1: the key position summed for query i),
  ``{label}_terms`` (which term of a residual add), ``picked`` (size 2: whether a selection
  picks this input).
* tags: the scope, ``out_{t}`` (which output's subnetwork), and the operation
  (``EMBED``, ``LINEAR``, ``MULTILINEAR``, ``SELECT``, ``SUM``, ``ADD``, ``CONST``, ``UNEMBED``); a
  tensor made by multiplying maps together carries the tags of each.

Plugin capability
-----------------
A component becomes analysable by implementing one method that builds its tensor-network form with
a `TNBuilder` (see the `TensorNetworkAttention`, `TensorNetworkMLP`, `TensorNetworkPositional`,
`TensorNetworkNorm` protocols). The model walk calls these methods and never looks at component
names; a component without the method is refused with `NotPolynomialError`. Example (a cubic
attention, pattern ``(q.k * scale)^3``)::

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

Circuits
--------
`qk_circuit_tn`, `ov_circuit_tn` and `full_circuit_tn` return small networks of weight matrices with
legs named after what they carry (``tok_q``, ``resid_q``, ``head_q``, ``head_k``, ``resid_k``,
``tok_k``; ``tok_out``, ``resid_out``, ``head_v``, ``resid_in``, ``tok_in``), to contract with quimb.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from qtoy_registry import QtoyError, get_registry

if TYPE_CHECKING:  # quimb is imported lazily: it is slow to import
    import quimb.tensor as qtn

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

CAPABILITY = "tensor_network"
INPUT_PREFIX = "tok_in_"
OUTPUT_PREFIX = "logit_"
OUT_TAG_PREFIX = "out_"
BATCH = "batch"
#: Largest tensor (entries) made by multiplying a map into a token-reading producer.
MAX_FUSED = 2**21


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


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------
class Wire:
    """One augmented vector ``[1; x]`` (``x`` of size `dim`) in the network under construction.

    A wire is *consumed* by exactly one operation: using it twice raises, because a tensor network
    cannot copy a value (call the `Stream` again for a fresh copy instead).
    """

    __slots__ = ("ind", "dim", "label", "_rec", "_used", "_builder")

    def __init__(self, builder: "TNBuilder", ind: str, dim: int, label: str, rec: "_Rec | None"):
        self._builder, self.ind, self.dim, self.label, self._rec, self._used = builder, ind, dim, label, rec, False

    def __repr__(self) -> str:
        return f"Wire({self.ind!r}, dim={self.dim}{', used' if self._used else ''})"


@dataclass(eq=False)
class _Rec:
    """A tensor to be: data, its index names, tags; `fusable` when axis 0 is an (augmented) output
    that a following affine map may be multiplied into."""

    data: np.ndarray
    inds: list[str]
    tags: tuple[str, ...]
    fusable: bool = False
    out_wire: Wire | None = None


class Stream:
    """The values of one vector at every position, built lazily: ``stream(t)`` builds a *fresh
    copy* of the subnetwork computing the value at position ``t`` and returns its `Wire`.

    Make one with `TNBuilder.stream`; `map` applies a per-position function to each copy.
    """

    def __init__(self, builder: "TNBuilder", fn: Callable[[int], Wire], dim: int, name: str, scope: str):
        self._builder, self._fn, self.dim, self.name, self._scope = builder, fn, dim, name, scope

    def __call__(self, pos: int) -> Wire:
        if not 0 <= pos < self._builder.n_ctx:
            raise TensorNetworkBuildError(f"position {pos} is outside the network's 0..{self._builder.n_ctx - 1}")
        with self._builder.scope(self._scope):
            wire = self._fn(pos)
        if not isinstance(wire, Wire) or wire.dim != self.dim:
            raise TensorNetworkBuildError(
                f"stream {self.name!r} (scope {self._scope!r}) promised width {self.dim} but built "
                f"{wire!r} at position {pos}")
        return wire

    def map(self, fn: Callable[[Wire, int], Wire], dim: int | None = None, name: str | None = None) -> "Stream":
        """The stream ``t -> fn(self(t), t)`` (in the caller's scope)."""
        return self._builder.stream(lambda t: fn(self(t), t), self.dim if dim is None else dim,
                                    name or self.name)

    def __repr__(self) -> str:
        return f"Stream({self.name!r}, dim={self.dim}, scope={self._scope!r})"


class CausalKeys:
    """A sum over key positions, for one query: ``keys(stream)`` is the stream's value at the summed
    key position (a fresh selection each call, all sharing the same key index), ``keys.sum(term)``
    sums the term over the key positions. Get one from `TNBuilder.causal_keys`."""

    def __init__(self, builder: "TNBuilder", positions: Sequence[int], label: str):
        self._builder = builder
        self.positions = tuple(positions)
        if not self.positions:
            raise TensorNetworkBuildError("a key sum needs at least one position")
        self.index = builder._new_ind(label, len(self.positions)) if len(self.positions) > 1 else None
        self._summed = False

    def __call__(self, stream: Stream) -> Wire:
        wires = [stream(j) for j in self.positions]
        return self._builder.select(self.index, wires) if self.index is not None else wires[0]

    def sum(self, term: Wire) -> Wire:
        if self._summed:
            raise TensorNetworkBuildError("this key sum was already summed; make new CausalKeys per query")
        self._summed = True
        return self._builder.sum_over(self.index, term) if self.index is not None else term


def _as_numpy(x: Any, dtype: np.dtype) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).astype(dtype, copy=False)


class TNBuilder:
    """Builds a homogenised tensor network: the toolbox handed to components' `tensor_network`.

    Every `Wire` is an augmented vector ``[1; x]``; every operation below is exact and keeps the
    constant component equal to 1. Weights may be torch tensors or numpy arrays; pass the *same*
    object for a map used at many positions, so all copies share one array.

    Operations: `linear` (``W x + b``), `add_constant`, `mul` (elementwise product), `add`, `constant`,
    `multilinear` (any multilinear map), `head_dot` (per-head dot products), `head_scale` (per-head
    weight times vector), and the key sum (`causal_keys` / `key_sum`, built on `select` and
    `sum_over`). Streams: `stream`, `project`, `add_streams`. `scope` names the module being built
    (it prefixes index names and tags tensors); `output_position` tags output ``t``'s subnetwork.
    """

    def __init__(self, n_ctx: int, dtype: Any = np.float64):
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, not {n_ctx}")
        self.n_ctx = n_ctx
        self.dtype = np.dtype(dtype)
        self._recs: list[_Rec] = []
        self._sizes: dict[str, int] = {}
        self._parent: dict[str, str] = {}  # index aliases made by `mul` and `sum_over`
        self._serial = itertools.count()
        self._scope = ""
        self._out_tag: str | None = None
        self._open: dict[int, Wire] = {}  # id -> wires built and not yet consumed
        self._cache: dict[tuple, tuple] = {}  # keys hold ids; values keep those objects alive

    # -- naming ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Build inside module ``name`` (e.g. ``blocks.0.attn``): index prefix and tag."""
        saved, self._scope = self._scope, name
        try:
            yield
        finally:
            self._scope = saved

    @contextlib.contextmanager
    def output_position(self, t: int) -> Iterator[None]:
        """Tensors built inside belong to output ``t``'s subnetwork (tag ``out_{t}``)."""
        saved, self._out_tag = self._out_tag, f"{OUT_TAG_PREFIX}{t}"
        try:
            yield
        finally:
            self._out_tag = saved

    def _new_ind(self, label: str, size: int) -> str:
        name = f"{self._scope}.{label}#{next(self._serial)}" if self._scope else f"{label}#{next(self._serial)}"
        self._sizes[name] = size
        return name

    def _find(self, ind: str) -> str:
        while ind in self._parent:
            ind = self._parent[ind]
        return ind

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _tags(self, op: str) -> tuple[str, ...]:
        return tuple(t for t in (self._scope, self._out_tag, op) if t)

    def _add_rec(self, data: np.ndarray, inds: list[str], op: str, fusable: bool = False) -> _Rec:
        rec = _Rec(data, inds, self._tags(op), fusable)
        self._recs.append(rec)
        return rec

    def _wire(self, ind: str, dim: int, label: str, rec: _Rec | None = None) -> Wire:
        wire = Wire(self, ind, dim, label, rec)
        if rec is not None and rec.fusable:
            rec.out_wire = wire
        self._open[id(wire)] = wire
        return wire

    def _consume(self, *wires: Wire) -> None:
        for w in wires:
            if not isinstance(w, Wire) or w._builder is not self:
                raise TensorNetworkBuildError(f"expected a Wire of this builder, got {w!r}")
            if w._used:
                raise TensorNetworkBuildError(
                    f"wire {w.ind!r} ({w.label}) is used twice: a tensor network cannot copy a value; "
                    f"call the stream again for a fresh copy (each use needs its own subnetwork)")
            w._used = True
            self._open.pop(id(w), None)

    def _cached(self, key: tuple, keep: tuple, make: Callable[[], np.ndarray]) -> np.ndarray:
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = (keep, make())
        return hit[1]

    # -- sources and sinks -------------------------------------------------------------------------
    def embedding(self, t: int, weight: Any, label: str = "resid") -> Wire:
        """``[1; W_E[tok_t]]`` from the one-hot token at position ``t`` (open hyperindex ``tok_in_{t}``).

        ``weight``: (vocab, d). Exact for one-hot inputs: their entries sum to 1 (the constant)."""
        def make() -> np.ndarray:
            w = _as_numpy(weight, self.dtype)
            return np.concatenate([np.ones((1, w.shape[0]), self.dtype), w.T], axis=0)

        data = self._cached(("embed", id(weight)), (weight,), make)
        ind_in = f"{INPUT_PREFIX}{t}"
        self._sizes[ind_in] = data.shape[1]
        ind = self._new_ind(label, data.shape[0])
        rec = self._add_rec(data, [ind, ind_in], "EMBED", fusable=True)
        return self._wire(ind, data.shape[0] - 1, label, rec)

    def constant(self, vec: Any, label: str = "const") -> Wire:
        """The constant vector ``[1; vec]``."""
        data = self._cached(("const", id(vec)), (vec,),
                            lambda: np.concatenate([np.ones(1, self.dtype), _as_numpy(vec, self.dtype).reshape(-1)]))
        ind = self._new_ind(label, data.shape[0])
        rec = self._add_rec(data, [ind], "CONST", fusable=True)
        return self._wire(ind, data.shape[0] - 1, label, rec)

    def output(self, x: Wire, weight: Any, name: str) -> None:
        """The open output index ``name`` = ``weight @ x`` (not augmented). ``weight``: (out, d)."""
        self._consume(x)

        def make() -> np.ndarray:
            w = _as_numpy(weight, self.dtype)
            return np.concatenate([np.zeros((w.shape[0], 1), self.dtype), w], axis=1)

        data = self._cached(("unembed", id(weight)), (weight,), make)
        self._check_in(data.shape[1] - 1, x, "output")
        self._sizes[name] = data.shape[0]
        self._apply(data, [name], x, "UNEMBED", fusable=False)

    # -- affine maps ---------------------------------------------------------------------------------
    def linear(self, x: Wire, weight: Any, bias: Any = None, *, label: str = "lin") -> Wire:
        """``W x + b`` as the augmented matrix ``[[1, 0], [b, W]]``; ``weight``: (out, in) like
        ``nn.Linear.weight``. Consecutive affine maps (and an embedding followed by one) are
        multiplied into one tensor when that does not make it bigger."""
        self._consume(x)

        def make() -> np.ndarray:
            w = _as_numpy(weight, self.dtype)
            aug = np.zeros((w.shape[0] + 1, w.shape[1] + 1), self.dtype)
            aug[0, 0] = 1.0
            aug[1:, 1:] = w
            if bias is not None:
                aug[1:, 0] = _as_numpy(bias, self.dtype)
            return aug

        aug = self._cached(("linear", id(weight), id(bias)), (weight, bias), make)
        self._check_in(aug.shape[1] - 1, x, "linear")
        ind = self._new_ind(label, aug.shape[0])
        rec = self._apply(aug, [ind], x, "LINEAR", fusable=True)
        return self._wire(ind, aug.shape[0] - 1, label, rec)

    def add_constant(self, x: Wire, vec: Any, *, label: str = "shift") -> Wire:
        """``x + vec`` (an affine map with identity weight)."""
        eye = self._cached(("eye", x.dim), (), lambda: np.eye(x.dim, dtype=self.dtype))
        return self.linear(x, eye, vec, label=label)

    def _apply(self, arr: np.ndarray, out_inds: list[str], x: Wire, op: str, fusable: bool) -> _Rec:
        """Add the tensor ``arr[*out_inds, x]`` (x's axis last), multiplied into x's producer when
        that is an affine map (or embedding) whose output is x: when the product is no bigger, or
        when the producer reads a token (its token leg is sliced away before contracting, so the
        product costs nothing to contract) and stays below `MAX_FUSED` entries."""
        prod = x._rec
        if prod is not None and prod.fusable and prod.out_wire is x:
            flat = prod.data.reshape(prod.data.shape[0], -1)
            rows = arr.size // arr.shape[-1]
            size = rows * flat.shape[1]
            reads_token = any(i.startswith(INPUT_PREFIX) for i in prod.inds)
            if size <= arr.size + prod.data.size or (reads_token and size <= MAX_FUSED):
                fused = self._cached(("fuse", id(arr), id(prod.data)), (arr, prod.data),
                                     lambda: (arr.reshape(rows, -1) @ flat).reshape(arr.shape[:-1] + prod.data.shape[1:]))
                prod.data, prod.inds = fused, list(out_inds) + prod.inds[1:]
                prod.fusable, prod.out_wire = fusable, None
                prod.tags = tuple(dict.fromkeys(prod.tags + self._tags(op)))
                return prod
        return self._add_rec(arr, list(out_inds) + [x.ind], op, fusable)

    @staticmethod
    def _check_in(expected: int, x: Wire, what: str) -> None:
        if expected != x.dim:
            raise TensorNetworkBuildError(f"{what}: the map takes width {expected} but {x!r} has width {x.dim}")

    # -- products and sums -------------------------------------------------------------------------
    def mul(self, *xs: Wire, label: str | None = None) -> Wire:
        """Elementwise product: ``[1; x] * [1; y] = [1; x * y]``, so the wires just share an index."""
        if not xs:
            raise TensorNetworkBuildError("mul needs at least one wire")
        dims = {x.dim for x in xs}
        if len(dims) != 1:
            raise TensorNetworkBuildError(f"mul needs equal widths, got {[x.dim for x in xs]}")
        self._consume(*xs)
        label = label or xs[0].label
        root = self._new_ind(label, xs[0].dim + 1)
        for x in xs:
            self._parent[self._find(x.ind)] = root
        return self._wire(root, xs[0].dim, label)

    def multilinear(self, tensor: Any, *xs: Wire, label: str = "multi") -> Wire:
        """``out = T(x_1, ..., x_k)`` for a multilinear map ``T`` of shape (out, d_1, ..., d_k):
        ``T`` padded to the augmented shape with a 1 at the all-constant entry."""
        self._consume(*xs)

        def make() -> np.ndarray:
            arr = _as_numpy(tensor, self.dtype)
            aug = np.zeros(tuple(s + 1 for s in arr.shape), self.dtype)
            aug[(0,) * arr.ndim] = 1.0
            aug[(slice(1, None),) * arr.ndim] = arr
            return aug

        aug = self._cached(("multi", id(tensor)), (tensor,), make)
        if aug.ndim != len(xs) + 1 or any(aug.shape[i + 1] - 1 != x.dim for i, x in enumerate(xs)):
            raise TensorNetworkBuildError(
                f"multilinear: a map of shape {tuple(s - 1 for s in aug.shape)} cannot take widths {[x.dim for x in xs]}")
        ind = self._new_ind(label, aug.shape[0])
        rec = self._add_rec(aug, [ind] + [x.ind for x in xs], "MULTILINEAR")
        return self._wire(ind, aug.shape[0] - 1, label, rec)

    def head_dot(self, q: Wire, k: Wire, n_head: int, *, scale: float = 1.0, label: str = "scores") -> Wire:
        """Per-head scaled dot products: width ``n_head``, ``s_h = scale * q_h . k_h`` where the flat
        ``q`` and ``k`` hold heads contiguously (``view(n_head, d_head)``)."""
        if q.dim != k.dim or q.dim % n_head:
            raise TensorNetworkBuildError(f"head_dot: widths {q.dim}, {k.dim} do not split into {n_head} heads")
        # scale * (sum over each head's entries) of q * k: a product (shared index) and a thin map
        sum_heads = self._cached(("head_sum", n_head, q.dim, float(scale)), (),
                                 lambda: scale * np.kron(np.eye(n_head), np.ones((1, q.dim // n_head))))
        return self.linear(self.mul(q, k, label=f"{label}_terms"), sum_heads, label=label)

    def head_scale(self, p: Wire, v: Wire, n_head: int, *, label: str = "z") -> Wire:
        """Each head of the flat ``v`` times that head's scalar in ``p`` (width ``n_head``)."""
        if p.dim != n_head or v.dim % n_head:
            raise TensorNetworkBuildError(f"head_scale: widths {p.dim}, {v.dim} do not match {n_head} heads")
        # each head's scalar copied over that head's entries (a thin map), times v (a shared index)
        expand = self._cached(("head_expand", n_head, v.dim), (),
                              lambda: np.kron(np.eye(n_head), np.ones((v.dim // n_head, 1))))
        return self.mul(self.linear(p, expand, label=f"{label}_weights"), v, label=label)

    def _pick(self, index: str, n: int, j: int, x: Wire, out: str, keep_const: bool, op: str) -> None:
        """The tensor(s) G_j[index, out, x] of a sum/selection: ``x`` itself when ``index == j``
        (without its constant unless ``keep_const``), else x's constant 1 on every output entry.
        For n > 2 it is factored through a 2-valued "picked?" index c, G_j = P_j[index, c] Q[c, out, x],
        which costs 2(d+1)^2 + 2n(d+1) to contract instead of n(d+1)^2."""
        d = x.dim

        def switch() -> np.ndarray:
            q = np.zeros((2, d + 1, d + 1), self.dtype)
            q[0, :, 0] = 1.0  # not picked: read the constant 1, any output entry
            q[1] = np.eye(d + 1, dtype=self.dtype)  # picked: pass x through
            if not keep_const:
                q[1, 0, 0] = 0.0
            return q

        q = self._cached(("switch", d, keep_const), (), switch)
        if n <= 2:
            g = self._cached(("pick", n, j, d, keep_const), (),
                             lambda: np.stack([q[1] if s == j else q[0] for s in range(n)]))
            self._apply(g, [index, out], x, op, fusable=False)
            return
        c = self._new_ind("picked", 2)
        self._apply(q, [c, out], x, op, fusable=False)
        p = self._cached(("which", n, j), (), lambda: np.eye(2, dtype=self.dtype)[(np.arange(n) == j).astype(int)])
        self._add_rec(p, [index, c], op)

    def add(self, *xs: Wire, label: str = "sum") -> Wire:
        """``x_0 + ... + x_{n-1}``: n tensors sharing a sum index and the output index."""
        if len({x.dim for x in xs}) != 1:
            raise TensorNetworkBuildError(f"add needs equal widths, got {[x.dim for x in xs]}")
        if len(xs) == 1:
            return xs[0]
        self._consume(*xs)
        d, n = xs[0].dim, len(xs)
        tau = self._new_ind(f"{label}_terms", n)
        out = self._new_ind(label, d + 1)
        for j, x in enumerate(xs):
            self._pick(tau, n, j, x, out, keep_const=(j == 0), op="ADD")
        return self._wire(out, d, label)

    def select(self, index: str, xs: Sequence[Wire], *, label: str | None = None) -> Wire:
        """``x_sigma`` for the sum index ``index`` (size ``len(xs)``): one tensor per input."""
        if self._sizes.get(index) != len(xs):
            raise TensorNetworkBuildError(f"select: index {index!r} does not have size {len(xs)}")
        if len({x.dim for x in xs}) != 1:
            raise TensorNetworkBuildError(f"select needs equal widths, got {[x.dim for x in xs]}")
        self._consume(*xs)
        d = xs[0].dim
        out = self._new_ind(label or xs[0].label, d + 1)
        for j, x in enumerate(xs):
            self._pick(index, len(xs), j, x, out, keep_const=True, op="SELECT")
        return self._wire(out, d, label or xs[0].label)

    def sum_over(self, index: str, term: Wire, *, label: str | None = None) -> Wire:
        """``sum_sigma term_sigma`` over the sum index ``index``: the term's index stays (a hyperedge)
        and one (n, d+1) tensor of ones sums ``index``, except that it keeps the constant entry from
        sigma = 0 only (so it stays 1)."""
        self._consume(term)
        n, d = self._sizes[index], term.dim

        def make() -> np.ndarray:
            w = np.ones((n, d + 1), self.dtype)
            w[1:, 0] = 0.0
            return w

        label = label or term.label
        out = self._new_ind(label, d + 1)
        self._parent[self._find(term.ind)] = out
        self._add_rec(self._cached(("sum_over", n, d), (), make), [index, out], "SUM")
        return self._wire(out, d, label)

    def key_sum(self, positions: Sequence[int], label: str = "key") -> CausalKeys:
        """A sum over the given key positions (`CausalKeys`)."""
        return CausalKeys(self, positions, label)

    def causal_keys(self, query: int) -> CausalKeys:
        """The causal sum over keys ``0..query`` for the query at position ``query``."""
        return CausalKeys(self, range(query + 1), f"key<={query}")

    # -- streams -------------------------------------------------------------------------------------
    def stream(self, fn: Callable[[int], Wire], dim: int, name: str = "stream") -> Stream:
        """A `Stream` whose copies are built by ``fn(t)`` inside the current scope."""
        return Stream(self, fn, dim, name, self._scope)

    def project(self, x: Stream, linear: Any, *, label: str | None = None) -> Stream:
        """``t -> linear(x(t))`` for an ``nn.Linear`` (weight and optional bias)."""
        weight, bias = linear.weight, getattr(linear, "bias", None)
        lab = label or "lin"
        return x.map(lambda w, t: self.linear(w, weight, bias, label=lab), dim=weight.shape[0], name=lab)

    def add_streams(self, *streams: Stream, label: str = "resid") -> Stream:
        """``t -> sum_i streams[i](t)``."""
        return self.stream(lambda t: self.add(*(s(t) for s in streams), label=label), streams[0].dim, label)

    # -- result ----------------------------------------------------------------------------------------
    @property
    def num_tensors(self) -> int:
        return len(self._recs)

    def network(self) -> "qtn.TensorNetwork":
        """The finished network (raises if a component left a wire unused)."""
        import quimb.tensor as qtn

        if self._open:
            left = ", ".join(f"{w.ind} ({w.label})" for w in list(self._open.values())[:5])
            raise TensorNetworkBuildError(
                f"{len(self._open)} wire(s) built but never used, e.g. {left}: every value a component "
                f"builds must feed the result (an unused index would stay open)")
        resolved = [[self._find(i) for i in rec.inds] for rec in self._recs]
        # Rename every internal index `{scope}.{label}#{rank}`, rank = when its last user was built
        # (inputs of a tensor before its outputs): contracting indices by rank is the forward
        # evaluation order, the default contraction path (see `natural_tree`).
        last: dict[str, tuple[int, int]] = {}
        for serial, inds in enumerate(resolved):
            for pos, ind in enumerate(inds):
                last[ind] = (serial, -pos)
        rename = {}
        for rank, ind in enumerate(sorted(last, key=last.__getitem__)):
            if not ind.startswith((INPUT_PREFIX, OUTPUT_PREFIX)):
                rename[ind] = f"{ind.rsplit('#', 1)[0]}#{rank}"
        tensors = [qtn.Tensor(rec.data, inds=tuple(rename.get(i, i) for i in inds), tags=rec.tags)
                   for rec, inds in zip(self._recs, resolved)]
        return qtn.TensorNetwork(tensors, virtual=True)


# ------------------------------------------------------------------------------------------------
# The model walk
# ------------------------------------------------------------------------------------------------
def _modules(model: Any) -> list[tuple[str, str, Any]]:
    """(path, kind, module) of every component the network needs, in forward order."""
    out = [("positional", "positional", model.positional)]
    for i, block in enumerate(model.blocks):
        out += [(f"blocks.{i}.ln1", "norm", block.ln1), (f"blocks.{i}.attn", "attention", block.attn)]
        if block.has_mlp:
            out += [(f"blocks.{i}.ln2", "norm", block.ln2), (f"blocks.{i}.mlp", "mlp", block.mlp)]
    out.append(("ln_final", "norm", model.ln_final))
    return out


def _alternatives(kind: str) -> str:
    """The registered components of `kind` that have the capability, as "'a' or 'b'"."""
    names = []
    try:
        for comp in get_registry().components(kind):
            try:
                if comp.config_class.model_construct().is_polynomial and callable(getattr(comp.load(), CAPABILITY, None)):
                    names.append(comp.name)
            except Exception:  # a broken plugin must not hide the real error
                continue
    except Exception:
        pass
    return " or ".join(repr(n) for n in names) if names else "a polynomial one"


def check_polynomial(model: Any) -> None:
    """Raise `NotPolynomialError` naming every component without an exact tensor-network form."""
    config = model.config
    names = {kind: comp.name for kind, comp in config.components().items()}
    bad: dict[tuple[str, str], list[str]] = {}
    for path, kind, module in _modules(model):
        if not callable(getattr(module, CAPABILITY, None)):
            bad.setdefault((kind, names.get(kind, type(module).__name__)), []).append(path)
    if not bad:
        return
    lines = []
    for (kind, name), paths in bad.items():
        comp_cfg = config.components().get(kind)
        why = ("its config says it is polynomial, but its module has no tensor_network() method"
               if comp_cfg is not None and comp_cfg.is_polynomial
               else "it is not an exact polynomial map, so no finite tensor network reproduces it")
        lines.append(f"{kind} {name!r} ({', '.join(paths)}) is not polynomial: {why}; use {kind} "
                     f"{_alternatives(kind)}, or give the component a tensor_network() method "
                     f"(see qtoy_core.analysis.tensor_network.TensorNetwork{_PROTOCOL[kind]})")
    raise NotPolynomialError("\n".join(lines))


_PROTOCOL = {"attention": "Attention", "mlp": "MLP", "positional": "Positional", "norm": "Norm"}


def _np_dtype(model: Any, dtype: Any) -> np.dtype:
    if dtype is None:
        p = next(iter(model.parameters()), None)
        dtype = p.dtype if p is not None else torch.float64
    if isinstance(dtype, torch.dtype):
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return np.dtype("float64" if dtype == torch.float64 else "float32")
    return np.dtype(dtype)


def to_tensor_network(model: Any, n_ctx: int | None = None, *, dtype: Any = None,
                      outputs: Iterable[int] | None = None) -> "qtn.TensorNetwork":
    """The exact tensor network of a polynomial model for sequences of up to ``n_ctx`` tokens.

    Open indices: ``tok_in_{t}`` (vocab, one per input position, shared by every embedding copy)
    and ``logit_{t}`` (vocab) for each output position in ``outputs`` (default all ``0..n_ctx-1``).
    ``dtype`` defaults to the model's (float64 or float32). The network reads the weights as they
    are now (later training does not change it); dropout is ignored (eval behaviour).
    Raises `NotPolynomialError` naming any component without a tensor-network form.
    """
    check_polynomial(model)
    config = model.config
    n_ctx = config.n_ctx if n_ctx is None else int(n_ctx)
    limit = getattr(model.positional, "max_positions", None)
    if limit is not None and n_ctx > limit:
        raise ValueError(f"n_ctx {n_ctx} is more than the {limit} positions the {config.positional.name} "
                         f"positional encoding covers")
    outputs = list(range(n_ctx)) if outputs is None else sorted(set(int(t) for t in outputs))
    if any(not 0 <= t < n_ctx for t in outputs):
        raise ValueError(f"outputs must lie in 0..{n_ctx - 1}, got {outputs}")
    tn = TNBuilder(n_ctx, _np_dtype(model, dtype))
    embed = model.embed.weight
    with tn.scope("embed"):
        x = tn.stream(lambda t: tn.embedding(t, embed), config.d_model, "resid")
    with tn.scope("positional"):
        x = model.positional.tensor_network(tn, x, op="embed")
    for i, block in enumerate(model.blocks):
        with tn.scope(f"blocks.{i}.ln1"):
            h = block.ln1.tensor_network(tn, x)
        with tn.scope(f"blocks.{i}.attn"):
            a = block.attn.tensor_network(tn, h, positional=model.positional)
        with tn.scope(f"blocks.{i}"):
            x = tn.add_streams(x, a, label="resid_mid")
        if block.has_mlp:
            with tn.scope(f"blocks.{i}.ln2"):
                h = block.ln2.tensor_network(tn, x)
            with tn.scope(f"blocks.{i}.mlp"):
                m = block.mlp.tensor_network(tn, h)
            with tn.scope(f"blocks.{i}"):
                x = tn.add_streams(x, m, label="resid_post")
    with tn.scope("ln_final"):
        x = model.ln_final.tensor_network(tn, x)
    unembed = model.unembed.weight
    for t in outputs:
        with tn.output_position(t), tn.scope("unembed"):
            tn.output(x(t), unembed, f"{OUTPUT_PREFIX}{t}")
    return tn.network()


# ------------------------------------------------------------------------------------------------
# Contraction with a cached path
# ------------------------------------------------------------------------------------------------
def _rank(ind: str) -> int | None:
    head, sep, tail = ind.rpartition("#")
    return int(tail) if sep and tail.isdigit() else None


def natural_tree(inputs: Sequence[tuple[str, ...]], output: Sequence[str], size_dict: dict[str, int],
                 ranks: dict[str, int] | None = None) -> Any:
    """The cotengra ``ContractionTree`` that contracts the indices in the order of their rank
    (``...#{rank}``, given by `TNBuilder`; or ``ranks``): the order in which the model computes, so
    every intermediate is a small activation-sized tensor. Linear time, whatever the network size.
    Index names are canonicalised to cotengra symbols; the tree's inputs keep their order."""
    import cotengra as ctg

    out = set(output)
    edges = {ix for term in inputs for ix in term if ix not in out}
    ranks = {ix: _rank(ix) for ix in edges} if ranks is None else {ix: ranks.get(ix) for ix in edges}
    if any(r is None for r in ranks.values()):
        raise ValueError("natural order needs index names ending in '#<rank>' (networks from to_tensor_network)")
    inputs, output, size_dict, symbol = _canonical(inputs, output, size_dict)
    edge_path = [symbol[ix] for ix in sorted(edges, key=ranks.__getitem__)]
    return ctg.ContractionTree.from_path(inputs, output, size_dict, edge_path=edge_path, autocomplete=True)


def _canonical(inputs, output, size_dict):
    """Index names -> single-character cotengra symbols, in order of first appearance."""
    import cotengra as ctg

    symbol: dict[str, str] = {}
    for term in itertools.chain(inputs, [output]):
        for ix in term:
            if ix not in symbol:
                symbol[ix] = ctg.get_symbol(len(symbol))
    return ([tuple(symbol[i] for i in term) for term in inputs], tuple(symbol[i] for i in output),
            {symbol[i]: size_dict[i] for i in symbol}, symbol)


class PathCache:
    """Contraction trees by network structure (index pattern, sizes and ranks, names canonicalised),
    so every network built from the same config, for the same batch size, reuses one path.

    With ``optimize="natural"`` (the default) the path is the network's evaluation order; with any
    cotengra preset or optimizer, the search runs on the network without its ``batch`` index (a
    batch index shared by every leaf tensor makes greedy searches quadratic) and the found path is
    then replayed with it."""

    def __init__(self) -> None:
        self.trees: dict[Any, Any] = {}
        self.hits = 0
        self.misses = 0
        self.search_seconds = 0.0

    def tree(self, inputs: list[tuple[str, ...]], output: tuple[str, ...], size_dict: dict[str, int],
             optimize: Any) -> Any:
        import cotengra as ctg

        key = _structure_key(inputs, output, size_dict, optimize)
        tree = self.trees.get(key)
        if tree is not None:
            self.hits += 1
            return tree
        self.misses += 1
        start = time.perf_counter()
        if isinstance(optimize, str) and optimize == "natural":
            tree = natural_tree(inputs, output, size_dict)
        else:
            plain_in = [tuple(i for i in term if i != BATCH) for term in inputs]
            plain_out = tuple(i for i in output if i != BATCH)
            found = ctg.array_contract_tree(plain_in, plain_out, size_dict, optimize=optimize)
            inputs, output, size_dict, _ = _canonical(inputs, output, size_dict)
            tree = ctg.ContractionTree.from_path(inputs, output, size_dict, ssa_path=found.get_ssa_path(),
                                                 autocomplete=True)
        self.search_seconds += time.perf_counter() - start
        self.trees[key] = tree
        return tree

    def clear(self) -> None:
        self.trees.clear()
        self.hits = self.misses = 0
        self.search_seconds = 0.0

    def __len__(self) -> int:
        return len(self.trees)


#: The module-level contraction-path cache `contract_logits` uses by default.
PATH_CACHE = PathCache()

#: Default path: "natural", the network's own evaluation order (`natural_tree`); cotengra's greedy
#: searches scale badly on these networks (their queue pruning turns quadratic past ~2^14
#: candidate pairs, i.e. a few thousand tensors) and find no better paths on them.
DEFAULT_OPTIMIZE = "natural"


def _structure_key(inputs, output, size_dict, optimize) -> tuple:
    names: dict[str, int] = {}
    canon = tuple(tuple(names.setdefault(i, len(names)) for i in term) for term in inputs)
    out = tuple(names.setdefault(i, len(names)) for i in output)
    sizes = tuple(size_dict[n] for n in names)
    ranks = tuple(_rank(n) for n in names)
    opt = optimize if isinstance(optimize, str) else id(optimize)
    return canon, out, sizes, ranks, opt


def _tokens_2d(tokens: Any) -> np.ndarray:
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids of shape (time,) or (batch, time), got {arr.shape} {arr.dtype}")
    return arr.astype(np.int64)


def contract_logits(tn: "qtn.TensorNetwork", tokens: Any, *, optimize: Any = None,
                    cache: PathCache | None = None) -> Tensor:
    """Logits of `to_tensor_network`'s network for ``tokens`` (time,) or (batch, time).

    Each output position's subnetwork (tag ``out_{t}``) is contracted on its own, with every
    ``tok_in_{s}`` leg replaced by the token (the one-hot contraction, as a slice; a batch shares a
    ``batch`` index). The contraction runs as a cotengra ``ContractionTree``; its path is, by default
    (``optimize="natural"``), the network's own evaluation order (`natural_tree`, linear time), or
    what any cotengra preset or optimizer finds (``optimize="greedy"``, a ``cotengra.HyperOptimizer``,
    ...). Trees are cached in ``cache`` (default `PATH_CACHE`) by structure, so the next batch of the
    same size, or a network built from the same config, skips the search. Returns (time, vocab) or
    (batch, time, vocab), as a torch tensor in the network's dtype; the time may be shorter than
    the network's n_ctx.
    """
    single = (tokens.dim() if isinstance(tokens, Tensor) else np.ndim(tokens)) == 1
    tok = _tokens_2d(tokens)
    batch, T = tok.shape
    cache = PATH_CACHE if cache is None else cache
    optimize = DEFAULT_OPTIMIZE if optimize is None else optimize
    results = []
    for t in range(T):
        tag = f"{OUT_TAG_PREFIX}{t}"
        if tag not in tn.tag_map:
            raise ValueError(f"the network has no output {t} (no tensors tagged {tag!r}): build it with "
                             f"n_ctx >= {T} and position {t} among its outputs")
        arrays, inputs, size_dict = [], [], {BATCH: batch}
        for ten in tn.select_tensors(tag):
            data, inds = ten.data, list(ten.inds)
            axes = [a for a, i in enumerate(inds) if i.startswith(INPUT_PREFIX)]
            if axes:
                pos = [int(inds[a][len(INPUT_PREFIX):]) for a in axes]
                if max(pos) >= T:
                    raise ValueError(f"output {t} reads input {max(pos)} but only {T} tokens were given")
                rest = [a for a in range(len(inds)) if a not in axes]
                data = np.transpose(data, axes + rest)[tuple(tok[:, p] for p in pos)]
                inds = [BATCH] + [inds[a] for a in rest]
            for i, s in zip(inds, data.shape):
                size_dict.setdefault(i, s)
            arrays.append(data)
            inputs.append(tuple(inds))
        output = (BATCH, f"{OUTPUT_PREFIX}{t}")
        tree = cache.tree(inputs, output, size_dict, optimize)
        results.append(np.asarray(tree.contract(arrays, backend="numpy")))
    out = torch.from_numpy(np.stack(results, axis=1))
    return out[0] if single else out


# ------------------------------------------------------------------------------------------------
# Circuits
# ------------------------------------------------------------------------------------------------
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


def _attn(model: Any, layer: int, head: int) -> Any:
    if not 0 <= layer < len(model.blocks):
        raise ValueError(f"layer {layer} is out of range: the model has {len(model.blocks)} layer(s)")
    attn = model.blocks[layer].attn
    n_head = getattr(attn, "n_head", None)
    if n_head is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
        raise TypeError(f"circuits need a ProjectedAttention (q_proj, k_proj, v_proj, out_proj); blocks.{layer}.attn "
                        f"is {type(attn).__name__}")
    if not 0 <= head < n_head:
        raise ValueError(f"head {head} is out of range: the attention has {n_head} heads")
    return attn


def _w(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def _qk_tensors(model: Any, attn: Any, q_proj: Any, k_proj: Any, head: int, offset: int, scale: float,
                suffix: str = "") -> list:
    import quimb.tensor as qtn

    d = attn.d_head
    sl = slice(head * d, (head + 1) * d)
    rot = rotation_matrices(model.positional, [offset, 0], d)
    kernel = scale * (rot[0].T @ rot[1])  # q_rot . k_rot = q^T R_q^T R_k k
    W_E = _w(model.embed.weight)
    s = suffix
    return [
        qtn.Tensor(W_E, inds=("tok_q", f"resid_q{s}"), tags=("W_E", "QK")),
        qtn.Tensor(_w(q_proj.weight[sl]), inds=(f"head_q{s}", f"resid_q{s}"), tags=("W_Q", "QK")),
        qtn.Tensor(_w(kernel), inds=(f"head_q{s}", f"head_k{s}"), tags=("ROT", "QK")),
        qtn.Tensor(_w(k_proj.weight[sl]), inds=(f"head_k{s}", f"resid_k{s}"), tags=("W_K", "QK")),
        qtn.Tensor(W_E, inds=("tok_k", f"resid_k{s}"), tags=("W_E", "QK")),
    ]


def _qk_factors(attn: Any) -> list[tuple[Any, Any, float]]:
    factors = getattr(attn, "qk_factors", None)
    if callable(factors):
        return list(factors())
    return [(attn.q_proj, attn.k_proj, float(getattr(attn, "scale", 1.0)))]


def qk_circuit_tn(model: Any, layer: int, head: int, *, offset: int = 0, factor: int = 0) -> "qtn.TensorNetwork":
    """The QK circuit of one head as a network: W_E (``tok_q``, ``resid_q``), W_Q (``head_q``,
    ``resid_q``), the relative rotation (``head_q``, ``head_k``; the identity without RoPE), W_K
    (``head_k``, ``resid_k``), W_E (``tok_k``, ``resid_k``). Contracted: the (vocab, vocab) form
    ``W_E W_Q^T R W_K W_E^T`` for a query ``offset`` positions after the key (``R`` = identity at
    offset 0), unscaled and without biases or positional embeddings. ``factor`` picks the QK pair
    for attentions with several (bilinear attention: 0 = q/k, 1 = q2/k2; see ``qk_factors``)."""
    import quimb.tensor as qtn

    attn = _attn(model, layer, head)
    factors = _qk_factors(attn)
    if not 0 <= factor < len(factors):
        raise ValueError(f"factor {factor} is out of range: blocks.{layer}.attn has {len(factors)} QK factor(s)")
    q_proj, k_proj, _ = factors[factor]
    return qtn.TensorNetwork(_qk_tensors(model, attn, q_proj, k_proj, head, offset, 1.0))


def _ov_tensors(model: Any, attn: Any, head: int, tok_in: str = "tok_in") -> list:
    import quimb.tensor as qtn

    d = attn.d_head
    sl = slice(head * d, (head + 1) * d)
    return [
        qtn.Tensor(_w(model.unembed.weight), inds=("tok_out", "resid_out"), tags=("W_U", "OV")),
        qtn.Tensor(_w(attn.out_proj.weight[:, sl]), inds=("resid_out", "head_v"), tags=("W_O", "OV")),
        qtn.Tensor(_w(attn.v_proj.weight[sl]), inds=("head_v", "resid_in"), tags=("W_V", "OV")),
        qtn.Tensor(_w(model.embed.weight), inds=(tok_in, "resid_in"), tags=("W_E", "OV")),
    ]


def ov_circuit_tn(model: Any, layer: int, head: int) -> "qtn.TensorNetwork":
    """The OV circuit of one head: W_U (``tok_out``, ``resid_out``), W_O (``resid_out``, ``head_v``),
    W_V (``head_v``, ``resid_in``), W_E (``tok_in``, ``resid_in``). Contracted: the (vocab, vocab)
    matrix ``W_U W_O W_V W_E^T`` (weights only, no biases)."""
    import quimb.tensor as qtn

    return qtn.TensorNetwork(_ov_tensors(model, _attn(model, layer, head), head))


def full_circuit_tn(model: Any, layer: int, head: int, *, offset: int = 0) -> "qtn.TensorNetwork":
    """What one key token does to the logits through one head, as a network with open indices
    ``tok_q``, ``tok_k``, ``tok_out``: ``prod_f (scale_f QK_f[tok_q, tok_k]) * OV[tok_out, tok_k]`` (for
    quadratic attention ``(scale QK)^2 OV``, for bilinear ``(scale QK_1)(scale QK_2) OV``) for a
    query ``offset`` positions after the key. Each factor is its own copy of the QK network
    (legs suffixed ``_0``, ``_1``, ...) and they share the token hyperindices ``tok_q`` / ``tok_k``
    (exact, tokens being one-hot). Contract with
    ``tn.contract(output_inds=("tok_q", "tok_k", "tok_out"))``. Needs the attention's
    ``qk_factors()`` (the QK pairs whose scaled scores multiply into its pattern)."""
    import quimb.tensor as qtn

    attn = _attn(model, layer, head)
    if not callable(getattr(attn, "qk_factors", None)):
        raise NotPolynomialError(f"blocks.{layer}.attn ({type(attn).__name__}) does not declare its pattern as "
                                 f"a product of QK factors (qk_factors()), so its full circuit is not known")
    tensors = []
    for f, (q_proj, k_proj, scale) in enumerate(attn.qk_factors()):
        tensors += _qk_tensors(model, attn, q_proj, k_proj, head, offset, scale, suffix=f"_{f}")
    tensors += _ov_tensors(model, attn, head, tok_in="tok_k")
    return qtn.TensorNetwork(tensors)
