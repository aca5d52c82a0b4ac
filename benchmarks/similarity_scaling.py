"""How far the exact functional similarity scales (qtoy_core.analysis.similarity, method="exact").

For 1- and 2-layer attention-only quadratic models (d_model 16, 2 heads, RoPE) and a grid of
vocabulary sizes V and lengths T, this builds the pair network of the last output position
(both models' tensor networks joined at logit_{T-1}, sharing tok_in_*), searches its contraction path
with each optimizer `similarity(..., optimize=)` accepts (default: "greedy" and "hyper") and prints
the path's largest intermediate (entries) and cost (flops); where the largest intermediate is at most
2^24 entries it also contracts and times it (and checks that every path gives the same number).
`similarity` refuses paths above MAX_EXACT_WIDTH (2^27 entries) with a message pointing at
method="data".

    python benchmarks/similarity_scaling.py                     # the grid in docs/dynamics.md
    python benchmarks/similarity_scaling.py --optimize greedy   # the quick half
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import qtoy_core
from qtoy_core.analysis.similarity import pair_network

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, one_line  # noqa: E402

#: Contract (and time) a path whose largest intermediate is at most 2^this entries (2^24 float64: 128 MiB).
CONTRACT_WIDTH = 24


def main() -> None:
    import argparse

    import cotengra as ctg

    from qtoy_core.analysis.similarity import path_optimizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimize", nargs="+", default=["greedy", "hyper"],
                        help="path optimizers to compare (similarity's optimize=): greedy, hyper, a cotengra preset")
    parser.add_argument("--layers", nargs="+", default=["1L", "2L"], choices=["1L", "2L"],
                        help="which half of the grid (each stays under ~5 minutes on a shared 2-core machine)")
    args = parser.parse_args()
    info = describe()
    print(f"{one_line(info)}; torch cpu capability {torch.backends.cpu.get_cpu_capability()}; avx512_bf16 "
          f"{info['isa'].get('avx512_bf16')}; load average {os.getloadavg()[0]:.1f}; threads {torch.get_num_threads()}")
    print(f"{'layers':>6} {'V':>5} {'T':>3} {'tensors':>8} {'optimize':>9} {'log2 width':>10} {'log10 flops':>11} "
          f"{'search s':>9} {'contract s':>10}")
    for layers, grid in (("1L", [(5, 3), (16, 3), (64, 3), (256, 3), (4096, 2), (16, 4), (8, 5), (24, 6)]),
                         ("2L", [(5, 2), (16, 2), (64, 2), (5, 3), (16, 3), (5, 4)])):
        if layers not in args.layers:
            continue
        for V, T in grid:
            torch.manual_seed(0)
            model = qtoy_core.build_model(f"attention_only_{layers}", d_model=16, n_head=2, vocab_size=V,
                                          n_ctx=T).double()
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.3)
            arrays, inputs, size = pair_network(model, model, T - 1)
            values = []
            for optimize in args.optimize:
                t = time.perf_counter()
                tree = ctg.array_contract_tree(inputs, (), size, optimize=path_optimizer(optimize))
                search = time.perf_counter() - t
                width = tree.contraction_width()
                flops = math.log10(float(tree.contraction_cost()))
                took = "-"
                if width <= CONTRACT_WIDTH:
                    t = time.perf_counter()
                    values.append(float(tree.contract(arrays, backend="numpy")))
                    took = f"{time.perf_counter() - t:.2f}"
                print(f"{layers:>6} {V:>5} {T:>3} {len(arrays):>8} {optimize:>9} {width:>10.1f} {flops:>11.1f} "
                      f"{search:>9.2f} {took:>10}", flush=True)
            if len(values) > 1:  # every path contracts to the same number
                assert np.allclose(values, values[0], rtol=1e-9), values


if __name__ == "__main__":
    main()
