"""Low-rank matrices kept as a product of two factors, for vocab-sized circuits.

The circuits worth reading in a transformer are products of weight matrices whose outer
dimensions are the vocabulary: the QK circuit ``W_E W_Q^T W_K W_E^T``, the OV circuit
``W_U W_O W_V W_E``, the direct path ``W_U W_E``. With a vocabulary of 50257 one such matrix is
10 GB in float32 (80 GB for eight heads), yet its rank is at most ``d_model`` or ``d_head``.
`FactoredMatrix` keeps ``M = A @ B`` as the two thin factors and answers every question through
them: spectra through the small ``k x k`` products, norms through the QR "core", and the top
entries by streaming row chunks of ``A`` against ``B`` with a running top-k, so that no ``m x n``
matrix is ever allocated when ``m`` and ``n`` are large.

The design follows TransformerLens' ``FactoredMatrix`` (left factor ``A``, right factor ``B``,
``.AB``/``.BA``, ``collapse_l``/``collapse_r``); this is an independent implementation with
memory-bounded top-k search added.

Conventions: ``A`` has shape ``(..., m, k)`` and ``B`` has shape ``(..., k, n)``. Leading (batch)
dimensions broadcast like ``torch.matmul``, so one shared embedding factor can sit next to
per-head factors without being copied per head. ``m`` is `ldim`, ``n`` is `rdim`, ``k`` is
`mdim`. Heavy per-matrix work (QR, ``B @ A``, top-k) loops over the batch one 2-D slice at a
time, again so that a broadcast factor is never expanded into a real per-head copy.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FactoredMatrix",
    "RowTopK",
    "TopK",
    "composition_score",
    "rows_per_chunk",
]

#: Memory budget for one streamed chunk of ``A @ B`` in `FactoredMatrix.topk` and
#: `FactoredMatrix.topk_rows` (scratch buffers included).
DEFAULT_CHUNK_BYTES = 256 * 2**20

Index = Union[int, slice, Sequence[int], Tensor]


class TopK(NamedTuple):
    """Largest (or smallest) entries of a matrix, best first.

    ``values`` are the entries of ``M`` themselves (signed, also when ranked by absolute value);
    ``rows``/``cols`` locate them. All three have shape ``(*batch_shape, k)``.
    """

    values: Tensor
    rows: Tensor
    cols: Tensor


class RowTopK(NamedTuple):
    """Per-row top-k: ``values`` and column ``indices`` of shape ``(*batch_shape, rows, k)``."""

    values: Tensor
    indices: Tensor


def rows_per_chunk(
    n_cols: int, bytes_per_entry: int, budget_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """How many rows of an ``n_cols``-wide product fit in ``budget_bytes`` (at least one).

    ``bytes_per_entry`` counts every scratch buffer a streamed entry needs (e.g. the product and
    its absolute value), so the budget bounds the scratch memory of one chunk.
    """
    return max(1, int(budget_bytes) // max(1, n_cols * bytes_per_entry))


class FactoredMatrix:
    """``M = A @ B`` kept factored: ``A`` is ``(..., m, k)``, ``B`` is ``(..., k, n)``.

    Nothing here forms the ``m x n`` product except `AB`, which exists for small matrices and
    tests. Products with tensors or other factored matrices stay factored (`__matmul__`), and
    every summary (eigenvalues, singular values, norm, trace, diagonal, top entries) is computed
    through the factors.
    """

    def __init__(self, A: Tensor, B: Tensor):
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(
                f"factors must be at least 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A {tuple(A.shape)} @ B {tuple(B.shape)}")
        if A.dtype != B.dtype:
            dtype = torch.promote_types(A.dtype, B.dtype)
            A, B = A.to(dtype), B.to(dtype)
        self.A = A
        self.B = B
        # Validates that the batch dimensions broadcast.
        self.batch_shape = torch.Size(torch.broadcast_shapes(A.shape[:-2], B.shape[:-2]))

    # ----------------------------------------------------------------------------- basic shape
    @property
    def ldim(self) -> int:
        """Number of rows ``m`` of ``M``."""
        return self.A.shape[-2]

    @property
    def rdim(self) -> int:
        """Number of columns ``n`` of ``M``."""
        return self.B.shape[-1]

    @property
    def mdim(self) -> int:
        """Inner (factored) dimension ``k``: an upper bound on the rank of ``M``."""
        return self.A.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.batch_shape, self.ldim, self.rdim))

    @property
    def ndim(self) -> int:
        return len(self.batch_shape) + 2

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def __repr__(self) -> str:
        return (
            f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def to(self, *args: Any, **kwargs: Any) -> FactoredMatrix:
        """``Tensor.to`` applied to both factors."""
        return FactoredMatrix(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs))

    @property
    def T(self) -> FactoredMatrix:
        """Transpose of the matrix dimensions: ``(A B)^T = B^T A^T``."""
        return FactoredMatrix(self.B.mT, self.A.mT)

    mT = T

    @property
    def AB(self) -> Tensor:
        """The explicit ``(..., m, n)`` product. For small matrices and tests only."""
        return self.A @ self.B

    @property
    def BA(self) -> Tensor:
        """The ``(..., k, k)`` product ``B @ A`` (square ``M`` only).

        ``AB`` and ``BA`` share their nonzero eigenvalues, which is why this small matrix is
        enough for the spectrum of a vocab-sized circuit.
        """
        self._require_square("BA")
        return self._per_slice(lambda a, b: b @ a)

    # --------------------------------------------------------------------------- matmul
    def __matmul__(self, other: Tensor | FactoredMatrix) -> FactoredMatrix | Tensor:
        """``self @ other``, kept factored with the smallest inner dimension available.

        For ``M @ X`` with ``X`` of shape ``(n, p)`` the candidates are ``A @ (B @ X)`` (inner
        ``k``) and ``(A @ B) @ X`` (inner ``n``); the second one forms ``A @ B`` and is only
        chosen when ``n < k``, i.e. when that product is *smaller* than ``A``. A 1-D ``other``
        is a vector and gives a dense vector.
        """
        if isinstance(other, FactoredMatrix):
            return _matmul_factored(self, other)
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.ndim == 1:
            return (self.A @ (self.B @ other)[..., None]).squeeze(-1)
        if self.rdim < self.mdim:
            return FactoredMatrix(self.A @ self.B, other)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix | Tensor:
        """``other @ self`` for a tensor ``other`` (``(p, m)`` or a vector of length ``m``)."""
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.ndim == 1:
            return ((other @ self.A)[..., None, :] @ self.B).squeeze(-2)
        if self.ldim < self.mdim:
            return FactoredMatrix(other, self.A @ self.B)
        return FactoredMatrix(other @ self.A, self.B)

    # ------------------------------------------------------------------------- spectra
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of a square ``M`` that contain all its nonzero ones, largest modulus first.

        ``AB`` (``m x m``) and ``BA`` (``k x k``) have the same nonzero eigenvalues (if
        ``BA w = l w`` with ``l != 0`` then ``AB (A w) = l (A w)`` and ``A w != 0``), so the
        smaller of the two is diagonalised: the result has ``min(m, k)`` entries, and the
        remaining ``m - k`` eigenvalues of ``AB`` are zero. Complex dtype in general.
        """
        self._require_square("eigenvalues")

        def eig(a: Tensor, b: Tensor) -> Tensor:
            small = b @ a if self.mdim <= self.ldim else a @ b
            vals = torch.linalg.eigvals(small)
            return vals[vals.abs().argsort(descending=True)]

        return self._per_slice(eig)

    def copying_score(self) -> Tensor:
        """``sum(Re eigenvalues) / sum(|eigenvalues|)``, in ``[-1, 1]``, one per batch element.

        From "A Mathematical Framework for Transformer Circuits": for an OV circuit (tokens to
        logits) a positive score means attending to a token tends to raise that same token's
        logit, i.e. the head copies.
        """
        eig = self.eigenvalues()
        return eig.sum(-1).real / eig.abs().sum(-1)

    def _r_factors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Triangular factors ``R_A``, ``R_B`` of ``A = Q_A R_A`` and ``B^T = Q_B R_B``."""
        return torch.linalg.qr(a, mode="r").R, torch.linalg.qr(b.mT, mode="r").R

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD ``M = U diag(S) Vh`` through the factors.

        With ``A = Q_A R_A`` and ``B^T = Q_B R_B``, ``M = Q_A (R_A R_B^T) Q_B^T`` and only the
        small core ``R_A R_B^T`` is decomposed. ``U`` is ``(..., m, r)``, ``S`` is ``(..., r)``
        (descending), ``Vh`` is ``(..., r, n)`` with ``r = min(m, n, k)``.
        """

        def one(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            qa, ra = torch.linalg.qr(a)
            qb, rb = torch.linalg.qr(b.mT)
            uc, s, vhc = torch.linalg.svd(ra @ rb.mT, full_matrices=False)
            return qa @ uc, s, vhc @ qb.mT

        return self._per_slice(one)

    def singular_values(self) -> Tensor:
        """Singular values of ``M`` (descending, ``min(m, n, k)`` of them), from the QR core."""

        def one(a: Tensor, b: Tensor) -> Tensor:
            ra, rb = self._r_factors(a, b)
            return torch.linalg.svdvals(ra @ rb.mT)

        return self._per_slice(one)

    @property
    def S(self) -> Tensor:
        return self.singular_values()

    def collapse_l(self) -> Tensor:
        """``diag(S) Vh`` (``(..., r, n)``): ``M`` with its left orthonormal factor dropped.

        ``M = U @ collapse_l()`` and ``U`` has orthonormal columns, so norms and geometry of the
        columns of ``M`` are those of ``collapse_l()``, in only ``r`` rows.
        """
        _, s, vh = self.svd()
        return s[..., :, None] * vh

    def collapse_r(self) -> Tensor:
        """``U diag(S)`` (``(..., m, r)``): ``M`` with its right orthonormal factor dropped."""
        u, s, _ = self.svd()
        return u * s[..., None, :]

    def compact(self) -> FactoredMatrix:
        """The same matrix with inner dimension ``min(k, m, n)``: ``(U diag(S)) @ Vh``."""
        u, s, vh = self.svd()
        return FactoredMatrix(u * s[..., None, :], vh)

    # ----------------------------------------------------------------------- reductions
    def norm(self) -> Tensor:
        """Frobenius norm of ``M`` per batch element: ``||R_A R_B^T||_F`` (orthogonal factors drop).

        QR rather than ``tr((A^T A)(B B^T))``: the Gram form squares the conditioning and can
        cancel badly when ``M`` is small next to ``||A|| ||B||``.
        """

        def one(a: Tensor, b: Tensor) -> Tensor:
            ra, rb = self._r_factors(a, b)
            return torch.linalg.matrix_norm(ra @ rb.mT)

        return self._per_slice(one)

    def diag(self) -> Tensor:
        """Diagonal of a square ``M`` (``(..., m)``): ``M_ii = sum_k A_ik B_ki``, row by row."""
        self._require_square("diag")
        return self._per_slice(lambda a, b: (a * b.mT).sum(-1))

    def trace(self) -> Tensor:
        """Trace of a square ``M`` (= ``trace(BA)``), from the diagonal in ``O(m k)``."""
        return self.diag().sum(-1)

    # ------------------------------------------------------------------------- indexing
    def get_row(self, i: int) -> Tensor:
        """Row ``i`` of ``M`` as a dense ``(..., n)`` tensor: ``A[i] @ B``."""
        i = _normalise_int(i, self.ldim)
        return (self.A[..., i : i + 1, :] @ self.B).squeeze(-2)

    def get_col(self, j: int) -> Tensor:
        """Column ``j`` of ``M`` as a dense ``(..., m)`` tensor: ``A @ B[:, j]``."""
        j = _normalise_int(j, self.rdim)
        return (self.A @ self.B[..., :, j : j + 1]).squeeze(-1)

    def __getitem__(self, key: Any) -> FactoredMatrix:
        """Select along batch, row and column dimensions; the result stays factored.

        Rows index ``A``, columns index ``B``, batch keys index whichever factor carries that
        dimension. Each key may be an int, a slice, a sequence / 1-D tensor of indices or a boolean
        mask; ``...`` is allowed. An int on a batch dimension removes it; an int on the row or
        column dimension keeps it with length one, so the result is still a matrix. Keys apply
        one dimension at a time (no NumPy-style joint advanced indexing).
        """
        key = key if isinstance(key, tuple) else (key,)
        n_ell = sum(k is Ellipsis for k in key)
        if n_ell > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if n_ell:
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1 :]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for a FactoredMatrix of shape {tuple(self.shape)}")
        key = key + (slice(None),) * (self.ndim - len(key))
        nb = len(self.batch_shape)
        A = self.A[(None,) * (nb + 2 - self.A.ndim)]  # missing batch dims as size 1 (views)
        B = self.B[(None,) * (nb + 2 - self.B.ndim)]
        A = _index_dim(A, nb, key[nb], keep_dim=True)
        B = _index_dim(B, nb + 1, key[nb + 1], keep_dim=True)
        for d in reversed(range(nb)):  # last to first, so earlier dimension numbers stay valid
            A = _index_batch_dim(A, d, key[d], self.batch_shape[d])
            B = _index_batch_dim(B, d, key[d], self.batch_shape[d])
        return FactoredMatrix(A, B)

    # --------------------------------------------------------------------------- top-k
    def topk(
        self,
        k: int,
        largest: bool = True,
        abs: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> TopK:
        """The ``k`` best entries of ``M`` (per batch element) without forming ``M``.

        Ranks entries by value (``largest=False``: most negative first) or, with ``abs=True``,
        by absolute value. Returned ``values`` are the signed entries of ``M``.

        How: rows of ``A`` are streamed in chunks against ``B`` (chunk rows chosen so the chunk's
        scratch fits ``chunk_bytes``), keeping a running top-k whose ``k``-th score ``t`` is a
        threshold. Besides the product itself a chunk costs one row-max pass; only the few rows
        whose max beats ``t`` are searched further. Rows and columns are visited by decreasing
        norm, and Cauchy-Schwarz (``|a_i . b_j| <= ||a_i|| ||b_j||``) cuts off whole columns of a
        chunk, and every remaining row, once the bound falls below ``t``. All of this is exact.
        The cut-off skips most of the work when norms vary a lot (embedding-like factors, a few
        dominant tokens); for i.i.d. random factors it skips nothing and the cost is the full
        ``m * n * k`` multiply-adds, streamed. Peak extra memory: ``chunk_bytes`` plus a
        norm-sorted copy of one ``B`` slice.
        """
        if k < 1 or k > self.ldim * self.rdim:
            raise ValueError(f"k={k} out of range for a {self.ldim} x {self.rdim} matrix")
        mode = ("abs" if abs else "") + ("max" if largest else "min")
        res = self._per_slice(lambda a, b: _topk_slice(a, b, k, mode, chunk_bytes))
        return TopK(*res)

    def topk_rows(
        self,
        k: int,
        rows: Index | None = None,
        largest: bool = True,
        abs: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> RowTopK:
        """For each selected row ``i`` (default: all), the ``k`` best columns of ``M[i]``.

        E.g. "for these source tokens, which output tokens does the OV circuit raise most".
        Rows are computed in chunks of at most ``chunk_bytes``. Result shape
        ``(*batch_shape, len(rows), k)``; an int ``rows`` drops that dimension.
        """
        if not 1 <= k <= self.rdim:
            raise ValueError(f"k={k} out of range for rows of length {self.rdim}")
        sub = self if rows is None else self[..., rows, :]
        res = sub._per_slice(lambda a, b: _topk_rows_slice(a, b, k, largest, abs, chunk_bytes))
        out = RowTopK(*res)
        if isinstance(rows, int):
            out = RowTopK(out.values.squeeze(-2), out.indices.squeeze(-2))
        return out

    # ------------------------------------------------------------------------- helpers
    def _require_square(self, what: str) -> None:
        if self.ldim != self.rdim:
            raise ValueError(f"{what} needs a square matrix, got {self.ldim} x {self.rdim}")

    def _slices(self):
        """Yield the 2-D ``(a, b)`` factor pairs of each batch element (views, no copies)."""
        bs = tuple(self.batch_shape)
        A = self.A.expand(bs + self.A.shape[-2:])
        B = self.B.expand(bs + self.B.shape[-2:])
        for idx in itertools.product(*(range(s) for s in bs)):
            yield A[idx], B[idx]

    def _per_slice(self, fn: Callable[[Tensor, Tensor], Any]) -> Any:
        """Apply ``fn(a, b)`` to each 2-D slice; stack the results into the batch shape."""
        outs = [fn(a, b) for a, b in self._slices()]
        if isinstance(outs[0], tuple):
            return tuple(_stack(list(parts), self.batch_shape) for parts in zip(*outs))
        return _stack(outs, self.batch_shape)


# ------------------------------------------------------------------------------ module helpers
def _stack(outs: list[Tensor], batch_shape: torch.Size) -> Tensor:
    return torch.stack(outs).reshape((*batch_shape, *outs[0].shape))


def _normalise_int(i: int, size: int) -> int:
    if not -size <= i < size:
        raise IndexError(f"index {i} out of range for size {size}")
    return i % size


def _index_dim(x: Tensor, d: int, idx: Any, keep_dim: bool) -> Tensor:
    """Index one dimension of ``x`` with an int, slice, index sequence/tensor or boolean mask."""
    if isinstance(idx, slice):
        return x[(slice(None),) * d + (idx,)]
    if isinstance(idx, int) or (isinstance(idx, Tensor) and idx.ndim == 0):
        i = _normalise_int(int(idx), x.shape[d])
        return x.narrow(d, i, 1) if keep_dim else x.select(d, i)
    if idx is None:
        raise IndexError("None (new axis) is not supported when indexing a FactoredMatrix")
    t = torch.as_tensor(idx, device=x.device)
    if t.dtype == torch.bool:
        t = t.nonzero().squeeze(-1)
    if t.ndim != 1:
        raise IndexError("index sequences must be 1-D")
    t = t.long()
    t = torch.where(t < 0, t + x.shape[d], t)
    return x.index_select(d, t)


def _index_batch_dim(x: Tensor, d: int, idx: Any, full: int) -> Tensor:
    """Index batch dimension ``d`` of a factor that may broadcast (size 1) along it."""
    if x.shape[d] == full:
        return _index_dim(x, d, idx, keep_dim=False)
    # Size 1 broadcast against ``full``: ints drop the dimension, anything else keeps it at
    # size 1, which still broadcasts against the other factor's selection.
    if isinstance(idx, int) or (isinstance(idx, Tensor) and idx.ndim == 0):
        _normalise_int(int(idx), full)
        return x.select(d, 0)
    return x


def _matmul_factored(left: FactoredMatrix, right: FactoredMatrix) -> FactoredMatrix:
    """``(A1 B1)(A2 B2)`` regrouped for the smallest inner dimension, then the fewest flops.

    Options: ``(A1 (B1 A2)) B2`` (inner ``k2``), ``A1 ((B1 A2) B2)`` (inner ``k1``), and
    ``(A1 B1)(A2 B2)`` (inner ``n``, the shared dimension), which is only ever picked when ``n``
    is smaller than both ``k1`` and ``k2``, i.e. when those products are small.
    """
    if left.rdim != right.ldim:
        raise ValueError(f"shape mismatch: {tuple(left.shape)} @ {tuple(right.shape)}")
    m, k1, n, k2, p = left.ldim, left.mdim, left.rdim, right.mdim, right.rdim
    if n < min(k1, k2):
        return FactoredMatrix(left.A @ left.B, right.A @ right.B)
    core = left.B @ right.A  # (k1, k2): the only product through the shared dimension
    if (k2, m * k1 * k2) <= (k1, k1 * k2 * p):
        return FactoredMatrix(left.A @ core, right.B)
    return FactoredMatrix(left.A, core @ right.B)


def _scores(c: Tensor, mode: str, out: Tensor | None) -> Tensor:
    """Scores to maximise for a chunk ``c`` (for ``min`` the caller negated ``A``, so ``c``)."""
    if mode in ("max", "min"):
        return c
    s = torch.abs(c, out=out)
    return s if mode == "absmax" else s.neg_()


def _topk_slice(
    a: Tensor, b: Tensor, k: int, mode: str, chunk_bytes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Streaming top-k of ``a @ b`` for one 2-D slice; see `FactoredMatrix.topk`."""
    m, r = a.shape
    n = b.shape[1]
    if mode == "min":
        a = -a  # the smallest entries of A B are the largest of (-A) B; negation is exact
    # Cauchy-Schwarz bounds apply to |entries|, hence to every mode but "smallest |value|".
    prunable = mode != "absmin"
    # Visit rows and columns by decreasing norm: the threshold rises fastest and the bound
    # ||a_i|| ||b_j|| is monotone, so the prunable part is always a suffix of rows and columns.
    rnorm = torch.linalg.vector_norm(a, dim=1)
    cnorm = torch.linalg.vector_norm(b, dim=0)
    rorder = rnorm.argsort(descending=True)
    corder = cnorm.argsort(descending=True)
    rnorm, cnorm = rnorm[rorder], cnorm[corder]
    b_s = b[:, corder].contiguous()  # sorted once, so that a column cut-off is a prefix
    # Rounding makes a computed dot product exceed the exact bound by at most ~r*eps relatively.
    slack = 1.0 + 4 * (r + 2) * torch.finfo(a.dtype).eps

    n_buf = 1 if mode in ("max", "min") else 2
    chunk = min(m, rows_per_chunk(n, a.element_size() * n_buf, chunk_bytes))
    cbuf = torch.empty(chunk * n, dtype=a.dtype, device=a.device)
    sbuf = torch.empty_like(cbuf) if n_buf == 2 else None

    best_s = a.new_empty(0)  # scores, descending
    best_v = a.new_empty(0)  # signed entries of (possibly negated) A B
    best_r = torch.empty(0, dtype=torch.long, device=a.device)
    best_c = torch.empty_like(best_r)
    # ``thresh`` is a lower bound on the final k-th best score: the k-th best of any k real
    # entries is one. Seeding it from a small block of the largest-norm rows and columns lets
    # the Cauchy-Schwarz cut-off act from the very first chunk. The seed entries are found
    # again by the main pass, so filters below keep ties (``>=``) rather than drop them, and
    # the seed is lowered by the largest rounding error any entry can carry (another matmul
    # shape may sum in another order).
    thresh = -math.inf
    seed_rows, seed_cols = min(m, max(64, k)), min(n, 4096)
    if prunable and seed_rows * seed_cols >= k:
        seed = a.index_select(0, rorder[:seed_rows]) @ b_s[:, :seed_cols]
        kth = float(_scores(seed, mode, None).reshape(-1).topk(k).values[-1])
        thresh = kth - (slack - 1) * float(rnorm[0] * cnorm[0])
        del seed
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        width = n
        if prunable and thresh > -math.inf:
            bound = cnorm * (float(rnorm[start]) * slack)
            width = int((bound >= thresh).sum())  # cnorm is sorted: a prefix of the columns
            if width == 0:
                break  # every remaining row is bounded below the k-th best score
        rows = stop - start
        c = cbuf[: rows * width].view(rows, width)
        torch.matmul(a.index_select(0, rorder[start:stop]), b_s[:, :width], out=c)
        s = _scores(c, mode, None if sbuf is None else sbuf[: rows * width].view(rows, width))
        # Row filter (one cheap pass over the chunk): an entry can enter the running top-k only
        # if its row's best score beats the threshold and reaches the k-th largest row best of
        # this chunk (k rows each hold an entry at least that large).
        row_best = s.amax(dim=1)
        keep = row_best >= thresh
        if rows > k:
            keep &= row_best >= row_best.topk(k).values[-1]
        cand = keep.nonzero().squeeze(1)
        if cand.numel() == 0:
            continue
        sub = s if cand.numel() == rows else s[cand]
        # Per-row top-k first: a top-k over one long flattened chunk would allocate (value,
        # index) pairs for all of it, several times the chunk itself.
        row_vals, row_cols = sub.topk(min(k, width), dim=1)
        vals, flat = row_vals.reshape(-1).topk(min(k, row_vals.numel()))
        lr = cand[flat // row_vals.shape[1]]
        lc = row_cols.reshape(-1)[flat]
        best_s = torch.cat([best_s, vals])
        best_v = torch.cat([best_v, c[lr, lc]])
        best_r = torch.cat([best_r, rorder[start + lr]])
        best_c = torch.cat([best_c, corder[lc]])
        best_s, keep = best_s.topk(min(k, best_s.numel()))  # merge; keeps best-first order
        best_v, best_r, best_c = best_v[keep], best_r[keep], best_c[keep]
        if best_s.numel() == k:
            thresh = max(thresh, float(best_s[-1]))
    if mode == "min":
        best_v = -best_v
    return best_v, best_r, best_c


def _topk_rows_slice(
    a: Tensor, b: Tensor, k: int, largest: bool, abs: bool, chunk_bytes: int
) -> tuple[Tensor, Tensor]:
    """Per-row top-k of ``a @ b`` for one 2-D slice, ``chunk_bytes`` of rows at a time."""
    m, n = a.shape[0], b.shape[1]
    chunk = min(max(m, 1), rows_per_chunk(n, a.element_size() * (2 if abs else 1), chunk_bytes))
    vals, idxs = [], []
    for start in range(0, m, chunk):
        c = a[start : start + chunk] @ b
        if abs:
            i = c.abs().topk(k, dim=1, largest=largest).indices
            v = c.gather(1, i)
        else:
            v, i = c.topk(k, dim=1, largest=largest)
        vals.append(v)
        idxs.append(i)
    if not vals:
        empty = a.new_empty(0, k)
        return empty, empty.long()
    return torch.cat(vals), torch.cat(idxs)


# ------------------------------------------------------------------------------ composition
def _frobenius(x: Tensor | FactoredMatrix) -> Tensor:
    return x.norm() if isinstance(x, FactoredMatrix) else torch.linalg.matrix_norm(x)


def composition_score(W_A: Tensor | FactoredMatrix, W_B: Tensor | FactoredMatrix) -> Tensor:
    """``||W_A W_B||_F / (||W_A||_F ||W_B||_F)``: how much ``W_B`` reads what ``W_A`` writes.

    Used for Q/K/V composition between heads of successive layers ("A Mathematical Framework for
    Transformer Circuits"): with ``W_A`` the earlier head's OV matrix and ``W_B`` the later head's
    QK (or OV) matrix in the matching orientation, the score is 1 when the two are perfectly
    aligned and about ``1/sqrt(d)`` for random ``d``-dimensional matrices. Either argument may be
    a `FactoredMatrix` (the product then stays factored) or a tensor; batch dimensions broadcast.
    """
    product = W_A @ W_B
    return _frobenius(product) / (_frobenius(W_A) * _frobenius(W_B))
