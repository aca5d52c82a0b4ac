"""Functional similarity of two models: the cosine of their output functions.

    sim = similarity(model_a, model_b, method="exact", n_ctx=4)        # polynomial models, no sampling
    sim = similarity(model_a, model_b, method="data", batches=stream)  # any model, with a standard error
    sim.value, sim.stderr

For two models with the same vocabulary, ``f(x)`` are the logits a model computes on the token
sequence ``x`` (length ``T = n_ctx``) and

    <f, g> = E_x [ f(x) . g(x) ],     similarity = <f_a, f_b> / (|f_a| |f_b|),   |f| = <f, f>^(1/2).

Which outputs: ``positions="last"`` compares the logits at the last position, ``f(x) = logits[T-1]``
(vocab,), i.e. the next-token prediction after a full context; ``positions="all"`` compares the logits
at every position, flattened, so ``f(x) . g(x) = sum_t logits_a[t] . logits_b[t]`` (each position's
prediction from its prefix). Raw logits are compared: a constant shift of all logits (which softmax
ignores) changes the similarity, as it changes the function.

Estimators:

* ``exact`` (polynomial models: no softmax, no RMSNorm): x is uniform over all ``vocab ** T``
  sequences and the expectation is computed without sampling by contracting the two models' exact
  tensor networks (`to_tensor_network`) into one scalar. The two networks of output position ``t``
  are joined at their ``logit_t`` index (the dot product) and share each position's input
  hyperindex ``tok_in_s``: a one-hot token is idempotent, so one shared index is every embedding copy
  of both models reading the same token, and summing it is the sum over that position's token. The
  sum over all sequences divided by ``vocab ** (t + 1)`` is the expectation (positions after ``t``
  are not read). The contraction path is searched once per network structure (cotengra, cached in
  `PATH_CACHE`), so comparing many checkpoints of one architecture pays the search once. The cost
  grows with depth and ``T``: see docs/dynamics.md for measured limits.
* ``data`` (any model): the same inner products averaged over sequences, either uniform random ones
  (``batches=None``: a Monte Carlo estimate of ``exact``) or the sequences of a dataset (the inner
  product under the data distribution, which is what a trained model is good at). The standard
  error comes from the delta method on the per-sequence products (``p_ab``, ``p_aa``, ``p_bb``):
  the cosine's influence per sequence is ``p_ab / (|a||b|) - c/2 (p_aa/|a|^2 + p_bb/|b|^2)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch

from qtoy_registry import QtoyError

__all__ = ["HYPER_SECONDS", "Similarity", "SimilarityError", "exact_inner_products", "path_optimizer", "similarity",
           "similarity_matrix"]

#: Largest intermediate tensor (entries) an exact contraction may build before it is refused.
MAX_EXACT_WIDTH = 2**27


class SimilarityError(QtoyError, ValueError):
    """Two models that cannot be compared this way (the message says why and what to do)."""


@dataclass
class Similarity:
    """``value`` = cos(f_a, f_b); ``stderr`` is 0 for ``exact``. ``inner`` = <f_a, f_b>,
    ``norm_a``/``norm_b`` = |f_a|, |f_b| (the same estimate). ``samples``: sequences averaged (data)."""

    value: float
    stderr: float
    method: str
    positions: str
    n_ctx: int
    inner: float
    norm_a: float
    norm_b: float
    samples: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------------------ checks
def _config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise SimilarityError(f"similarity compares qtoy models (with a .config); got {type(model).__name__}.")
    return config


def _check_pair(model_a: Any, model_b: Any, n_ctx: int | None) -> int:
    a, b = _config(model_a), _config(model_b)
    if a.vocab_size != b.vocab_size:
        raise SimilarityError(
            f"The models have different vocabularies ({a.vocab_size} and {b.vocab_size} tokens), so their "
            f"output functions live on different inputs and outputs and cannot be compared. Compare models "
            f"trained with the same tokenizer (the same dataset and vocab_size).")
    if a.n_ctx != b.n_ctx:
        raise SimilarityError(
            f"The models have different contexts (n_ctx {a.n_ctx} and {b.n_ctx}). Compare models with the "
            f"same n_ctx, or retrain one with --n-ctx {a.n_ctx}.")
    T = a.n_ctx if n_ctx is None else int(n_ctx)
    if not 1 <= T <= a.n_ctx:
        raise SimilarityError(f"n_ctx (the sequence length compared) must lie in 1..{a.n_ctx}, not {T}.")
    return T


def _check_positions(positions: str) -> None:
    if positions not in ("last", "all"):
        raise SimilarityError(f"positions must be 'last' (the logits at the last position) or 'all' (every "
                              f"position's logits), not {positions!r}.")


# ------------------------------------------------------------------------------------------ exact
def _networks(model: Any, T: int, outputs: Sequence[int]) -> Any:
    from qtoy_core.analysis.tensor_network import NotPolynomialError, to_tensor_network

    try:
        return to_tensor_network(model, T, dtype=np.float64, outputs=outputs)
    except NotPolynomialError as exc:
        raise SimilarityError(
            f"method='exact' needs polynomial models (an exact tensor network), and this one is not: {exc}\n"
            f"Use method='data', which estimates the same similarity from sequences (uniform random ones, "
            f"or a dataset's) with a standard error, for any model.") from None


def _part(tn: Any, t: int, prefix: str) -> tuple[list[np.ndarray], list[tuple[str, ...]]]:
    """Output ``t``'s subnetwork: arrays and index names, internal indices prefixed by ``prefix``
    (input ``tok_in_*`` and output ``logit_*`` indices keep their names, so two parts join there)."""
    arrays, inputs = [], []
    for ten in tn.select_tensors(f"out_{t}"):
        arrays.append(np.asarray(ten.data, dtype=np.float64))
        inputs.append(tuple(i if i.startswith(("tok_in_", "logit_")) else f"{prefix}{i}" for i in ten.inds))
    return arrays, inputs


def _join(tn_a: Any, tn_b: Any, t: int) -> tuple[list[np.ndarray], list[tuple[str, ...]], dict[str, int]]:
    arrays_a, inputs_a = _part(tn_a, t, "a:")
    arrays_b, inputs_b = _part(tn_b, t, "b:")
    arrays, inputs = arrays_a + arrays_b, inputs_a + inputs_b
    size_dict: dict[str, int] = {}
    for arr, inds in zip(arrays, inputs):
        for i, s in zip(inds, arr.shape):
            size_dict[i] = s
    return arrays, inputs, size_dict


def pair_network(model_a: Any, model_b: Any, t: int) -> tuple[list[np.ndarray], list[tuple[str, ...]], dict[str, int]]:
    """(arrays, index names, sizes) of the closed network whose value is the sum over all token
    sequences x_0..x_t of ``logits_a[t](x) . logits_b[t](x)`` (for benchmarks and inspection)."""
    T = t + 1
    return _join(_networks(model_a, T, [t]), _networks(model_b, T, [t]), t)


#: ``optimize="hyper"``: cotengra's hyper-optimizer over greedy paths with randomised cost
#: parameters (its random search needs no optional library): at most HYPER_REPEATS trials and
#: HYPER_SECONDS per network structure, single process (the machines are shared).
HYPER_SECONDS = 30.0
HYPER_REPEATS = 128
_HYPER: dict[tuple[float, int], Any] = {}


def path_optimizer(optimize: Any) -> Any:
    """What `PathCache` gets for ``optimize``: "hyper" is one shared cotengra ``ReusableHyperOptimizer``
    per setting (so its paths are cached by structure like the presets'); anything else is passed on."""
    if not (isinstance(optimize, str) and optimize == "hyper"):
        return optimize
    key = (float(HYPER_SECONDS), int(HYPER_REPEATS))
    if key not in _HYPER:
        import cotengra as ctg

        _HYPER[key] = ctg.ReusableHyperOptimizer(methods=["greedy"], optlib="random", max_repeats=key[1],
                                                 max_time=key[0], minimize="flops", parallel=False, progbar=False)
    return _HYPER[key]


def _contract_pair(tn_a: Any, tn_b: Any, t: int, optimize: Any, cache: Any) -> float:
    """sum over all token sequences x_0..x_t of logits_a[t](x) . logits_b[t](x) (no normalisation)."""
    arrays, inputs, size_dict = _join(tn_a, tn_b, t)
    tree = cache.tree(inputs, (), size_dict, path_optimizer(optimize))
    width = 2.0 ** float(tree.contraction_width())
    if width > MAX_EXACT_WIDTH:
        raise SimilarityError(
            f"The exact contraction at length {t + 1} needs an intermediate of {width:.3g} entries (more than "
            f"{MAX_EXACT_WIDTH:.3g}): too large for this model, vocabulary and length. "
            + ("Try optimize='hyper' (qtoy similarity --optimize hyper: a path search of up to "
               f"{HYPER_SECONDS:g} s that finds far narrower paths), " if optimize == "greedy" else "")
            + "Use a shorter n_ctx for the comparison, or method='data' (a sampled estimate with a standard error).")
    return float(tree.contract(arrays, backend="numpy"))


def exact_inner_products(models: Sequence[Any], *, n_ctx: int | None = None, positions: str = "last",
                         optimize: Any = "greedy", pairs: Iterable[tuple[int, int]] | None = None
                         ) -> np.ndarray:
    """(K, K) float64 matrix of exact <f_i, f_j> (uniform x over sequences of length ``n_ctx``) for
    polynomial models of one vocabulary and context; only ``pairs`` (and their mirror) are filled when
    given (others are NaN). See the module docstring for ``positions``."""
    from qtoy_core.analysis.tensor_network import PATH_CACHE

    _check_positions(positions)
    if not models:
        return np.zeros((0, 0))
    T = 0
    for m in models:
        T = _check_pair(models[0], m, n_ctx)
    outputs = [T - 1] if positions == "last" else list(range(T))
    V = _config(models[0]).vocab_size
    nets = [_networks(m, T, outputs) for m in models]
    K = len(models)
    pairs = [(i, j) for i in range(K) for j in range(i, K)] if pairs is None else list(pairs)
    out = np.full((K, K), np.nan)
    for i, j in pairs:
        total = 0.0
        for t in outputs:
            # sum over the V^(t+1) sequences of x_0..x_t, / V^(t+1): the mean (later positions unread)
            total += _contract_pair(nets[i], nets[j], t, optimize, PATH_CACHE) / float(V) ** (t + 1)
        out[i, j] = out[j, i] = total
    return out


# ------------------------------------------------------------------------------------------ data
def _sequences(batches: Iterable | None, T: int, vocab: int, samples: int, batch_size: int,
               seed: int) -> Iterable[torch.Tensor]:
    """Token batches (B, T): the given ones cut to T (a (tokens, mask) pair or a Batch gives its
    tokens), or uniform random sequences."""
    if batches is None:
        g = torch.Generator().manual_seed(seed)
        done = 0
        while done < samples:
            n = min(batch_size, samples - done)
            yield torch.randint(0, vocab, (n, T), generator=g)
            done += n
        return
    done = 0
    for batch in batches:
        tokens = batch if isinstance(batch, torch.Tensor) else getattr(batch, "tokens", None)
        if tokens is None:
            tokens = batch[0]
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.shape[1] < T:
            raise SimilarityError(f"The batches hold sequences of {tokens.shape[1]} tokens, fewer than the "
                                  f"n_ctx {T} compared: pass longer sequences or a smaller n_ctx.")
        tokens = tokens[:, :T]
        if samples:
            tokens = tokens[: samples - done]
        if len(tokens) == 0:
            break
        yield tokens
        done += len(tokens)
        if samples and done >= samples:
            break


@torch.no_grad()
def _outputs(model: Any, tokens: torch.Tensor, positions: str) -> torch.Tensor:
    """(B, n) float64 flattened outputs compared per sequence."""
    p = next(iter(model.parameters()), None)
    logits = model(tokens.to(p.device if p is not None else "cpu")).double().cpu()
    return logits[:, -1] if positions == "last" else logits.reshape(len(tokens), -1)


def _data_products(models: Sequence[Any], batches: Iterable | None, T: int, positions: str, samples: int,
                   batch_size: int, seed: int) -> np.ndarray:
    """(K, K, N): per-sequence products f_i(x_n) . f_j(x_n)."""
    vocab = _config(models[0]).vocab_size
    chunks = []
    for tokens in _sequences(batches, T, vocab, samples, batch_size, seed):
        if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
            raise SimilarityError(f"The batches hold token ids outside the models' vocabulary 0..{vocab - 1}.")
        outs = torch.stack([_outputs(m, tokens, positions) for m in models])  # (K, B, n)
        chunks.append(torch.einsum("ibn,jbn->ijb", outs, outs).numpy())
    if not chunks:
        raise SimilarityError("The batches produced no sequence to compare on.")
    return np.concatenate(chunks, axis=2)


def _cosine_with_error(p_ab: np.ndarray, p_aa: np.ndarray, p_bb: np.ndarray) -> tuple[float, float, float, float, float]:
    n = len(p_ab)
    s_ab, s_aa, s_bb = p_ab.mean(), p_aa.mean(), p_bb.mean()
    if s_aa <= 0 or s_bb <= 0:
        raise SimilarityError("A model's outputs are all zero on these sequences: its similarity to anything is "
                              "undefined (an untrained model with zero output weights?).")
    value = s_ab / math.sqrt(s_aa * s_bb)
    influence = p_ab / math.sqrt(s_aa * s_bb) - 0.5 * value * (p_aa / s_aa + p_bb / s_bb)
    stderr = float(influence.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    return float(value), stderr, float(s_ab), math.sqrt(s_aa), math.sqrt(s_bb)


# ------------------------------------------------------------------------------------------ API
def similarity(model_a: Any, model_b: Any, method: Literal["exact", "data"] = "exact", *,
               n_ctx: int | None = None, positions: Literal["last", "all"] = "last",
               batches: Iterable | None = None, samples: int = 2048, batch_size: int = 256, seed: int = 0,
               optimize: Any = "greedy") -> Similarity:
    """Cosine similarity of the output functions of two models of one vocabulary and context.

    ``n_ctx``: the sequence length T compared (default the models' n_ctx; ``exact`` is practical only
    for short lengths, see docs/dynamics.md). ``positions``: "last" or "all" (module docstring).
    ``data`` options: ``batches`` (token tensors (B, >=T), (tokens, mask) pairs or Batches, e.g. a
    validation stream; default uniform random sequences), ``samples`` (sequences to use; 0 = every
    sequence of ``batches``), ``batch_size`` and ``seed`` for the random sequences. ``optimize``: the
    cotengra path optimizer of ``exact``: "greedy" (default, instant), "hyper" (a random search over
    greedy paths, up to `HYPER_SECONDS` per network structure, once per process: narrower paths, so
    larger vocabularies and lengths fit; see docs/dynamics.md), or any cotengra preset or optimizer.
    Raises `SimilarityError` for mismatched vocabularies or contexts, or ``exact`` on a model that
    is not polynomial.
    """
    _check_positions(positions)
    T = _check_pair(model_a, model_b, n_ctx)
    start = time.perf_counter()
    if method == "exact":
        G = exact_inner_products([model_a, model_b], n_ctx=T, positions=positions, optimize=optimize)
        if G[0, 0] <= 0 or G[1, 1] <= 0:
            raise SimilarityError("A model's output function is zero (e.g. zero output weights): its similarity "
                                  "to anything is undefined.")
        value = G[0, 1] / math.sqrt(G[0, 0] * G[1, 1])
        return Similarity(float(value), 0.0, "exact", positions, T, float(G[0, 1]), math.sqrt(G[0, 0]),
                          math.sqrt(G[1, 1]), None, time.perf_counter() - start)
    if method == "data":
        P = _data_products([model_a, model_b], batches, T, positions, samples, batch_size, seed)
        value, stderr, inner, na, nb = _cosine_with_error(P[0, 1], P[0, 0], P[1, 1])
        notes = [] if batches is not None else ["uniform random sequences (a Monte Carlo estimate of 'exact')"]
        return Similarity(value, stderr, "data", positions, T, inner, na, nb, P.shape[2],
                          time.perf_counter() - start, notes)
    raise SimilarityError(f"method must be 'exact' (polynomial models, no sampling) or 'data' (any model, a "
                          f"sampled estimate with a standard error), not {method!r}.")


def similarity_matrix(models: Sequence[Any], method: Literal["exact", "data"] = "exact", *,
                      n_ctx: int | None = None, positions: Literal["last", "all"] = "last",
                      batches: Iterable | None = None, samples: int = 2048, batch_size: int = 256,
                      seed: int = 0, optimize: Any = "greedy") -> tuple[np.ndarray, np.ndarray]:
    """(values, stderrs), each (K, K): pairwise `similarity` of ``models`` (e.g. a run's checkpoints).
    Exact: K norms and K(K-1)/2 inner products, one contraction path for all. Data: every model on the
    same sequences (``batches`` is read once)."""
    _check_positions(positions)
    if not models:
        raise SimilarityError("similarity_matrix needs at least one model.")
    T = 0
    for m in models:
        T = _check_pair(models[0], m, n_ctx)
    K = len(models)
    if method == "exact":
        G = exact_inner_products(models, n_ctx=T, positions=positions, optimize=optimize)
        d = np.sqrt(np.clip(np.diag(G), 0, None))
        if (d == 0).any():
            raise SimilarityError(f"The output function of model {int(np.argmin(d))} is zero (zero output "
                                  f"weights?): its similarity to anything is undefined.")
        return G / np.outer(d, d), np.zeros((K, K))
    if method == "data":
        if batches is not None and samples == 0:
            batches = list(batches)  # read once; every model sees the same sequences
        P = _data_products(models, batches, T, positions, samples, batch_size, seed)
        values, errs = np.ones((K, K)), np.zeros((K, K))
        for i in range(K):
            for j in range(i + 1, K):
                v, e, *_ = _cosine_with_error(P[i, j], P[i, i], P[j, j])
                values[i, j] = values[j, i] = v
                errs[i, j] = errs[j, i] = e
        return values, errs
    raise SimilarityError(f"method must be 'exact' or 'data', not {method!r}.")
