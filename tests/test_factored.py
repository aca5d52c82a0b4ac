"""FactoredMatrix against dense computation, plus one vocab-sized run that must stay factored."""

from __future__ import annotations

import json
import subprocess
import zlib
import sys
import textwrap

import pytest
import torch

from qtoy_core.analysis.factored import (
    FactoredMatrix,
    composition_score,
    rows_per_chunk,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are tiny: one thread avoids thread start-up and contention overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rand(*shape, dtype=F64, seed=None):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, seed)).encode()))
    return torch.randn(*shape, generator=g, dtype=dtype)


def fm(batch=(), m=7, k=3, n=6, b_batch=None, dtype=F64, seed=0):
    """A random FactoredMatrix and its dense value; ``b_batch`` lets B broadcast against A."""
    A = rand(*batch, m, k, dtype=dtype, seed=(seed, "A"))
    B = rand(*(batch if b_batch is None else b_batch), k, n, dtype=dtype, seed=(seed, "B"))
    return FactoredMatrix(A, B), A @ B


def close(x, y, **kw):
    torch.testing.assert_close(x, y, **kw)


# --------------------------------------------------------------------------- construction
def test_shapes_and_properties():
    M, D = fm(batch=(2, 3), m=5, k=4, n=6, b_batch=(3,))
    assert M.shape == D.shape == (2, 3, 5, 6)
    assert (M.ldim, M.mdim, M.rdim, M.ndim) == (5, 4, 6, 4)
    assert M.batch_shape == (2, 3)
    close(M.AB, D)
    close(M.T.AB, D.mT)
    assert M.T.shape == (2, 3, 6, 5)


def test_bad_inner_dimension_raises():
    with pytest.raises(ValueError):
        FactoredMatrix(rand(4, 3), rand(2, 4))


def test_BA_is_small_and_square_only():
    M, _ = fm(m=6, k=3, n=6)
    assert M.BA.shape == (3, 3)
    close(M.BA, M.B @ M.A)
    with pytest.raises(ValueError):
        fm(m=6, k=3, n=5)[0].BA


# --------------------------------------------------------------------------------- matmul
@pytest.mark.parametrize("n,k,expected_inner", [(9, 3, 3), (2, 5, 2)])
def test_matmul_tensor_right(n, k, expected_inner):
    M, D = fm(batch=(2,), m=8, k=k, n=n)
    X = rand(n, 4, seed="X")
    P = M @ X
    assert isinstance(P, FactoredMatrix) and P.mdim == expected_inner
    close(P.AB, D @ X)
    v = rand(n, seed="v")
    close(M @ v, D @ v)


@pytest.mark.parametrize("m,k,expected_inner", [(9, 3, 3), (2, 5, 2)])
def test_matmul_tensor_left(m, k, expected_inner):
    M, D = fm(batch=(2,), m=m, k=k, n=8)
    X = rand(4, m, seed="X")
    P = X @ M
    assert isinstance(P, FactoredMatrix) and P.mdim == expected_inner
    close(P.AB, X @ D)
    v = rand(m, seed="v")
    close(v @ M, v @ D)


@pytest.mark.parametrize(
    "k1,n,k2,expected_inner",
    [(3, 9, 5, 3), (5, 9, 3, 3), (4, 9, 4, 4), (6, 2, 5, 2)],
)
def test_matmul_factored_picks_smallest_inner(k1, n, k2, expected_inner):
    L, DL = fm(batch=(2,), m=7, k=k1, n=n, seed=1)
    R, DR = fm(batch=(2,), m=n, k=k2, n=8, seed=2)
    P = L @ R
    assert isinstance(P, FactoredMatrix)
    assert P.mdim == expected_inner
    close(P.AB, DL @ DR)


def test_matmul_broadcasts_shared_factor():
    M, D = fm(batch=(3,), m=6, k=2, n=6, b_batch=())  # per-head A, shared B
    X = rand(3, 6, 4, seed="X")
    close((M @ X).AB, D @ X)
    close((M @ M).AB, D @ D)


# ------------------------------------------------------------------------------- spectra
def assert_same_spectrum(x, y, tol=1e-9):
    """Same nonzero eigenvalues, matched by nearest neighbour (conjugate pairs tie on modulus)."""
    x, y = x[x.abs() > tol], y[y.abs() > tol]
    assert len(x) == len(y)
    dist = (x[:, None] - y[None, :]).abs()
    assert dist.min(1).values.max() < 1e-8 and dist.min(0).values.max() < 1e-8


@pytest.mark.parametrize("m,k", [(7, 3), (4, 6)])
def test_eigenvalues_match_dense_nonzero(m, k):
    M, D = fm(batch=(2,), m=m, k=k, n=m, b_batch=())
    eig = M.eigenvalues()
    assert eig.shape == (2, min(m, k)) and eig.is_complex()
    assert (eig.abs()[:, :-1] >= eig.abs()[:, 1:] - 1e-12).all()  # largest modulus first
    for h in range(2):
        assert_same_spectrum(eig[h], torch.linalg.eigvals(D[h]))


def test_eigenvalues_require_square():
    with pytest.raises(ValueError):
        fm(m=5, k=2, n=4)[0].eigenvalues()


@pytest.mark.parametrize("m,k,n", [(8, 3, 6), (4, 6, 5), (5, 5, 3)])
def test_svd_through_factors(m, k, n):
    M, D = fm(batch=(2,), m=m, k=k, n=n)
    U, S, Vh = M.svd()
    r = min(m, n, k)
    assert U.shape == (2, m, r) and S.shape == (2, r) and Vh.shape == (2, r, n)
    close(U @ torch.diag_embed(S) @ Vh, D)
    close(S, torch.linalg.svdvals(D)[:, :r])
    close(M.singular_values(), S)
    eye = torch.eye(r, dtype=F64).expand(2, r, r)
    close(U.mT @ U, eye)
    close(Vh @ Vh.mT, eye)
    close(U @ M.collapse_l(), D)
    close(M.collapse_r() @ Vh, D)
    C = M.compact()
    assert C.mdim == r
    close(C.AB, D)


def test_norm_trace_diag():
    M, D = fm(batch=(3,), m=7, k=3, n=7, b_batch=())
    close(M.norm(), torch.linalg.matrix_norm(D))
    close(M.diag(), D.diagonal(dim1=-2, dim2=-1))
    close(M.trace(), D.diagonal(dim1=-2, dim2=-1).sum(-1))
    R, DR = fm(m=5, k=4, n=9)
    close(R.norm(), torch.linalg.matrix_norm(DR))
    with pytest.raises(ValueError):
        R.trace()


def test_float32_works():
    M, D = fm(batch=(2,), m=9, k=4, n=9, dtype=torch.float32)
    close(M.norm(), torch.linalg.matrix_norm(D))
    close(M.singular_values(), torch.linalg.svdvals(D)[:, :4])
    assert M.eigenvalues().dtype == torch.complex64
    t = M.topk(5, chunk_bytes=1)
    close(t.values, D.reshape(2, -1).topk(5).values)


# ------------------------------------------------------------------------------ indexing
@pytest.mark.parametrize(
    "key",
    [
        1,
        (slice(None), [0, 3, 4]),
        (0, slice(1, 4), [5, 0]),
        (..., [2, 1], slice(None, None, 2)),
        (..., 3, -1),
        (slice(1, None), torch.tensor([4, 0])),
        (torch.tensor([True, False, True]),),
        ([2, 0], ..., torch.tensor([1, 2])),
    ],
)
def test_getitem_stays_factored(key):
    M, D = fm(batch=(3,), m=6, k=2, n=7, b_batch=())  # B broadcasts over the batch
    sub = M[key]
    assert isinstance(sub, FactoredMatrix)
    # Dense reference, one dimension at a time, ints on the matrix dims kept as length one.
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (3 - len(key) + 1) + key[at + 1 :]
    key = key + (slice(None),) * (3 - len(key))
    ref = D
    for d in (2, 1):
        k = key[d]
        k = [k] if isinstance(k, int) else k
        ref = ref[(slice(None),) * d + (k,)]
    ref = ref[key[0]]
    close(sub.AB, ref)


def test_get_row_col():
    M, D = fm(batch=(2,), m=6, k=3, n=5)
    close(M.get_row(4), D[:, 4])
    close(M.get_row(-1), D[:, -1])
    close(M.get_col(2), D[:, :, 2])
    with pytest.raises(IndexError):
        M.get_row(6)


# ---------------------------------------------------------------------------------- top-k
def dense_topk(D, k, largest, abs):
    flat = D.reshape(*D.shape[:-2], -1)
    idx = (flat.abs() if abs else flat).topk(k, largest=largest).indices
    n = D.shape[-1]
    return flat.gather(-1, idx), idx // n, idx % n


MODES = [(True, False), (False, False), (True, True), (False, True)]


@pytest.mark.parametrize("largest,abs", MODES)
@pytest.mark.parametrize("chunk_bytes", [1, 3 * 11 * 8 * 2, None])
def test_topk_matches_dense(largest, abs, chunk_bytes):
    # chunk_bytes=1: one row per chunk, so the running top-k and the row filter do the work.
    M, D = fm(batch=(2, 2), m=13, k=4, n=11, b_batch=(2, 1), seed=3)
    kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    t = M.topk(9, largest=largest, abs=abs, **kw)
    values, rows, cols = dense_topk(D, 9, largest, abs)
    assert t.values.shape == t.rows.shape == t.cols.shape == (2, 2, 9)
    close(t.values, values)
    assert torch.equal(t.rows, rows) and torch.equal(t.cols, cols)


@pytest.mark.parametrize("largest,abs", MODES)
def test_topk_with_norm_pruning(largest, abs, monkeypatch):
    # Widely spread row/column norms, as in real embeddings: the Cauchy-Schwarz cut-off drops
    # whole columns and the tail of the rows, and the answer must not change.
    g = torch.Generator().manual_seed(5)
    A = torch.randn(200, 6, generator=g, dtype=F64) * torch.logspace(1, -3, 200, dtype=F64)[:, None]
    B = torch.randn(6, 150, generator=g, dtype=F64) * torch.logspace(-2, 1, 150, dtype=F64)
    M = FactoredMatrix(A[torch.randperm(200, generator=g)], B)
    D = M.AB
    streamed = []  # entries computed by the streaming pass (it writes chunks with out=)
    matmul = torch.matmul

    def counting_matmul(*args, out=None, **kw):
        if out is not None:
            streamed.append(out.numel())
        return matmul(*args, out=out, **kw)

    monkeypatch.setattr(torch, "matmul", counting_matmul)
    t = M.topk(12, largest=largest, abs=abs, chunk_bytes=150 * 8 * 2 * 4)
    monkeypatch.undo()
    values, rows, cols = dense_topk(D, 12, largest, abs)
    close(t.values, values)
    assert torch.equal(t.rows, rows) and torch.equal(t.cols, cols)
    if largest or not abs:  # smallest |value| has no upper bound to prune with
        assert sum(streamed) < 0.2 * D.numel()
    else:
        assert sum(streamed) == D.numel()


def test_topk_whole_matrix_and_bad_k():
    M, D = fm(m=3, k=2, n=4)
    t = M.topk(12, chunk_bytes=1)
    values, _, _ = dense_topk(D, 12, True, False)
    close(t.values, values)
    with pytest.raises(ValueError):
        M.topk(13)


@pytest.mark.parametrize("largest,abs", MODES)
def test_topk_rows_matches_dense(largest, abs):
    M, D = fm(batch=(2,), m=9, k=3, n=10, b_batch=(), seed=4)
    rows = [7, 0, 3]
    r = M.topk_rows(4, rows=rows, largest=largest, abs=abs, chunk_bytes=1)
    sub = D[:, rows]
    idx = (sub.abs() if abs else sub).topk(4, dim=-1, largest=largest).indices
    assert r.values.shape == r.indices.shape == (2, 3, 4)
    assert torch.equal(r.indices, idx)
    close(r.values, sub.gather(-1, idx))
    everything = M.topk_rows(2)
    assert everything.values.shape == (2, 9, 2)
    close(everything.values, D.topk(2, dim=-1).values)
    one = M.topk_rows(3, rows=5)
    assert one.indices.shape == (2, 3)
    assert torch.equal(one.indices, D[:, 5].topk(3, dim=-1).indices)


# ------------------------------------------------------------------------- circuit scores
def test_copying_score_sign():
    A = rand(2, 30, 4, seed="copy")
    pos = FactoredMatrix(A, A.mT)  # A A^T: positive semi-definite, a perfect "copier"
    neg = FactoredMatrix(A, -A.mT)
    close(pos.copying_score(), torch.ones(2, dtype=F64))
    close(neg.copying_score(), -torch.ones(2, dtype=F64))
    M, D = fm(m=8, k=3, n=8)
    eig = torch.linalg.eigvals(D)
    close(M.copying_score(), eig.sum().real / eig.abs().sum())
    assert -1 <= float(M.copying_score()) <= 1


def test_composition_score_matches_dense():
    L, DL = fm(batch=(3,), m=6, k=2, n=5, seed=7)
    R, DR = fm(batch=(3,), m=5, k=3, n=4, seed=8)

    def dense(x, y):
        fro = torch.linalg.matrix_norm
        return fro(x @ y) / (fro(x) * fro(y))

    expected = dense(DL, DR)
    for left in (L, DL):
        for right in (R, DR):
            close(composition_score(left, right), expected)
    aligned = rand(5, 5, seed="al")
    q, _ = torch.linalg.qr(aligned)
    proj = q[:, :1] @ q[:, :1].T  # a projector composes perfectly with itself
    close(composition_score(proj, proj), torch.tensor(1.0, dtype=F64))


# --------------------------------------------------------------------------- vocab scale
VOCAB_SCRIPT = textwrap.dedent(
    """
    import json, resource, time, torch
    from qtoy_core.analysis.factored import FactoredMatrix, DEFAULT_CHUNK_BYTES, rows_per_chunk
    torch.manual_seed(0)
    V, K, TOP = 50257, 64, 20
    # Embedding-like factors: most tokens small, a few hundred with large norms.
    scale = torch.full((V,), 0.05)
    scale[torch.randperm(V)[:300]] = torch.rand(300) * 2 + 1
    A = torch.randn(V, K) * scale[:, None]
    B = (torch.randn(V, K) * scale.flip(0)[:, None]).T.contiguous()
    M = FactoredMatrix(A, B)
    t0 = time.perf_counter()
    top = M.topk(TOP, abs=True)
    eig = M.eigenvalues()
    seconds = time.perf_counter() - t0

    # Reference without the V x V matrix: by Cauchy-Schwarz only rows with
    # ||a_i|| * max_j ||b_j|| >= t can hold an entry of modulus >= t; compute those rows
    # explicitly (float64) and take their dense top-k.
    t = float(top.values.abs().min())
    rn, cn = A.double().norm(dim=1), B.double().norm(dim=0)
    rows = (rn * cn.max() >= t * 0.999).nonzero().squeeze(1)
    assert len(rows) < 2000, len(rows)
    block = A.double()[rows] @ B.double()
    ref = block.abs().reshape(-1).topk(TOP).indices
    ref_rows, ref_cols = rows[ref // V], ref % V
    # Also some random explicit rows: none may beat the threshold.
    probe = torch.randint(0, V, (64,))
    probe_max = float((A.double()[probe] @ B.double()).abs().max())

    # Eigenvalues: compare with BA in float64, and check the eigen-equation through the factors.
    ba = B.double() @ A.double()
    lam, w = torch.linalg.eig(ba)
    order = lam.abs().argsort(descending=True)
    lam, w = lam[order], w[:, order]
    v = A.double().to(lam.dtype) @ w[:, :3]
    resid = (A.double().to(lam.dtype) @ (B.double().to(lam.dtype) @ v) - v * lam[:3]).norm(dim=0)
    print(json.dumps({
        "seconds": seconds,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "chunk_rows": rows_per_chunk(V, 4 * 2, DEFAULT_CHUNK_BYTES),
        "rows_match": sorted(zip(top.rows.tolist(), top.cols.tolist()))
        == sorted(zip(ref_rows.tolist(), ref_cols.tolist())),
        "values_err": float((top.values.double().abs() - block.abs().reshape(-1)[ref]).abs().max()),
        "threshold": t,
        "probe_max": probe_max,
        "eig_err": float(
            (eig.to(torch.complex128)[:, None] - lam[None, :]).abs().min(0).values.max()
            / lam.abs().max()
        ),
        "eig_resid": float((resid / (v.norm(dim=0) * lam[:3].abs())).max()),
        "trace_err": abs(float(eig.sum().real) - float(M.diag().double().sum()))
        / float(lam.abs().sum()),
    }))
    """
)


def test_vocab_sized_topk_and_eigenvalues_stay_factored():
    """m = n = 50257, k = 64 in float32: the V x V matrix (10 GB) would blow the RSS check."""
    proc = subprocess.run(
        [sys.executable, "-c", VOCAB_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # A dense V x V float32 matrix alone is 10 GB; the whole process must stay far below.
    assert out["max_rss_mb"] < 1500, out
    assert out["chunk_rows"] * 50257 * 4 * 2 <= 256 * 2**20
    assert out["rows_match"], out
    assert out["values_err"] < 1e-4 * out["threshold"], out
    assert out["probe_max"] <= out["threshold"] * (1 + 1e-5), out
    assert out["eig_err"] < 1e-4, out
    assert out["eig_resid"] < 1e-6, out
    assert out["trace_err"] < 1e-4, out
