"""How far the exact functional similarity scales (qtoy_core.analysis.similarity, method="exact").

For 1- and 2-layer attention-only quadratic models (d_model 16, 2 heads, RoPE) and a grid of
vocabulary sizes V and lengths T, this builds the pair network of the last output position
(both models' tensor networks joined at logit_{T-1}, sharing tok_in_*), searches its contraction path
(cotengra greedy, as `similarity` does) and prints the path's largest intermediate (entries) and
cost (flops); where the largest intermediate is at most 2^22 entries it also contracts and times it.
`similarity` refuses paths above MAX_EXACT_WIDTH (2^27 entries) with a message pointing at
method="data".

    python benchmarks/similarity_scaling.py            # the grid in docs/dynamics.md
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

import qtoy_core
from qtoy_core.analysis.similarity import pair_network


def main() -> None:
    import cotengra as ctg

    print(f"{'layers':>6} {'V':>5} {'T':>3} {'tensors':>8} {'log2 width':>10} {'log10 flops':>11} {'search s':>9} "
          f"{'contract s':>10}")
    for layers, grid in (("1L", [(5, 3), (16, 3), (64, 3), (256, 3), (4096, 2), (16, 4), (8, 5), (24, 6)]),
                         ("2L", [(5, 2), (16, 2), (64, 2), (5, 3), (16, 3), (5, 4)])):
        for V, T in grid:
            torch.manual_seed(0)
            model = qtoy_core.build_model(f"attention_only_{layers}", d_model=16, n_head=2, vocab_size=V,
                                          n_ctx=T).double()
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.3)
            arrays, inputs, size = pair_network(model, model, T - 1)
            t = time.perf_counter()
            tree = ctg.array_contract_tree(inputs, (), size, optimize="greedy")
            search = time.perf_counter() - t
            width = tree.contraction_width()
            flops = math.log10(float(tree.contraction_cost()))
            took = "-"
            if width <= 22:
                t = time.perf_counter()
                tree.contract(arrays, backend="numpy")
                took = f"{time.perf_counter() - t:.2f}"
            print(f"{layers:>6} {V:>5} {T:>3} {len(arrays):>8} {width:>10.1f} {flops:>11.1f} {search:>9.2f} {took:>10}",
                  flush=True)


if __name__ == "__main__":
    main()
