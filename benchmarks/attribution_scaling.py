"""How far the exact path expansion scales: time and memory of `path_expansion` against n_head, the
sequence length T and d_model, for a 2-layer attention-only quadratic model (float32, CPU).

    python benchmarks/attribution_scaling.py            # the default grid
    python benchmarks/attribution_scaling.py --quick    # three points

Two uses are timed per point, each for one layer-1 head:
  * "one prediction": one query position projected on one target logit (what `qtoy attribute` and
    `top_paths` do per head): n_src^5 terms, each a sum over <= T keys;
  * "all positions": every query position, d_model-vectors (what the sums-to-hook_result check uses):
    n_src^5 * T * d_model numbers.
n_src = 1 (embed) + n_head (layer-0 heads) with rope. Each point runs in a fresh subprocess so its
peak resident memory (ru_maxrss) is its own; "terms MiB" is the size of the returned term tensor.
Times are the best of 3 calls after a warm-up: wall-clock and process CPU time (all threads; less
sensitive to other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

POINT = r"""
import json, resource, sys, time
import torch
from qtoy_core import build_model
from qtoy_core.analysis.attribution import path_expansion
n_head, T, d_model, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = build_model("attention_only_2L", vocab_size=512, d_model=d_model, n_head=n_head, n_ctx=max(T, 8)).eval()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0.0, 0.1)
tokens = torch.randint(0, 512, (1, T))
kw = dict(position=-1, target=7) if mode == "one" else {}
path_expansion(model, tokens, 1, 0, **kw)
best = cpu = float("inf")
for _ in range(3):
    t0, c0 = time.perf_counter(), time.process_time()
    exp = path_expansion(model, tokens, 1, 0, **kw)
    best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
print(json.dumps({"seconds": best, "cpu_seconds": cpu, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "terms_mib": exp.terms.numel() * exp.terms.element_size() / 2**20, "n_src": len(exp.sources)}))
"""

GRID = [  # (n_head, T, d_model)
    (2, 16, 32), (4, 16, 32), (8, 16, 32), (12, 16, 48),
    (4, 64, 32), (4, 256, 32),
    (4, 16, 512),
]
QUICK = [(2, 16, 32), (4, 16, 32), (4, 64, 32)]


def run_point(n_head: int, T: int, d_model: int, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", POINT, str(n_head), str(T), str(d_model), mode],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three points only")
    args = parser.parse_args()
    import torch

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32")
    print(f"{'n_head':>6} {'T':>5} {'d_model':>7} {'n_src':>5} | {'one prediction s':>16} {'cpu s':>7} {'MiB rss':>8} | "
          f"{'all positions s':>15} {'cpu s':>7} {'terms MiB':>9} {'MiB rss':>8}")
    for n_head, T, d_model in (QUICK if args.quick else GRID):
        one = run_point(n_head, T, d_model, "one")
        full = run_point(n_head, T, d_model, "all")
        if "error" in one or "error" in full:
            print(f"{n_head:>6} {T:>5} {d_model:>7}   error: {one.get('error') or full.get('error')}")
            continue
        print(f"{n_head:>6} {T:>5} {d_model:>7} {one['n_src']:>5} | {one['seconds']:>16.4f} {one['cpu_seconds']:>7.3f} "
              f"{one['maxrss_mib']:>8.0f} | {full['seconds']:>15.4f} {full['cpu_seconds']:>7.3f} "
              f"{full['terms_mib']:>9.1f} {full['maxrss_mib']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
