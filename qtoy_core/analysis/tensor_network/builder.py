"""The builder algebra: exact, homogenised tensor networks built from augmented vectors.

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
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .capability import TensorNetworkBuildError

if TYPE_CHECKING:  # quimb is imported lazily: it is slow to import
    import quimb.tensor as qtn

__all__ = ["CausalKeys", "INPUT_PREFIX", "MAX_FUSED", "OUTPUT_PREFIX", "OUT_TAG_PREFIX", "Stream", "TNBuilder",
           "Wire"]

INPUT_PREFIX = "tok_in_"
OUTPUT_PREFIX = "logit_"
OUT_TAG_PREFIX = "out_"
#: Largest tensor (entries) made by multiplying a map into a token-reading producer.
MAX_FUSED = 2**21


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

    def __init__(self, n_ctx: int, dtype: Any = np.float64, doc_ids: Sequence[int] | None = None):
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, not {n_ctx}")
        self.n_ctx = n_ctx
        # document masking: the document of every position (None: one document)
        self.doc_ids: tuple[int, ...] | None = None
        self._doc_start: list[int] = [0] * n_ctx
        if doc_ids is not None:
            docs = [int(d) for d in (doc_ids.tolist() if hasattr(doc_ids, "tolist") else doc_ids)]
            if len(docs) != n_ctx or any(b < a for a, b in zip(docs, docs[1:])):
                raise ValueError(f"doc_ids must be {n_ctx} nondecreasing document indices (one per position), "
                                 f"got {docs}")
            self.doc_ids = tuple(docs)
            self._doc_start = [next(j for j in range(t + 1) if docs[j] == docs[t]) for t in range(n_ctx)]
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
        """The causal sum over keys ``0..query`` (those of the query's document, with `doc_ids`)
        for the query at position ``query``."""
        return CausalKeys(self, self.visible_keys(query), f"key<={query}")

    def visible_keys(self, query: int, first: int = 0) -> list[int]:
        """The key positions ``first..query`` the query at ``query`` sees: all of them, or with
        `doc_ids` those of its own document."""
        return list(range(max(first, self._doc_start[query]), query + 1))

    def position(self, t: int) -> int:
        """Position ``t``'s position within its document (``t`` without `doc_ids`): what a
        positional's network uses, since positions restart at every document."""
        return t - self._doc_start[t]

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
