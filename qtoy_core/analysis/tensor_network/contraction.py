"""Contraction of a model's network for given tokens, with contraction paths cached by structure.

`contract_logits(tn, tokens)` puts the tokens in (a slice of every ``tok_in_{t}`` leg) and returns
the logits of ``model(tokens)``, to float rounding. Contraction paths: cotengra's greedy searches
are slow on networks this size and find worse paths, so by default the indices are contracted in
the order the model computes (the ``#{rank}`` suffix of every index name, `natural_tree`), as a
cotengra ``ContractionTree``; `PathCache` keeps the trees by structure.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .builder import INPUT_PREFIX, OUT_TAG_PREFIX, OUTPUT_PREFIX

if TYPE_CHECKING:
    import quimb.tensor as qtn

__all__ = ["BATCH", "DEFAULT_OPTIMIZE", "PATH_CACHE", "PathCache", "contract_logits", "natural_tree"]

#: The index a batch of token sequences shares (each token-reading tensor is sliced along it).
BATCH = "batch"


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
