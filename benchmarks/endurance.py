"""Memory over a long run: does a training run on the streaming data keep flat memory?

    python benchmarks/endurance.py                 # 4000 tiny steps (~2-5 min on a loaded 2-core CPU)
    python benchmarks/endurance.py --quick         # 600 steps (~40 s)
    python benchmarks/endurance.py --steps 20000 --every 500 --json
    python benchmarks/endurance.py --part trainer  # the same training on in-memory batches (no data pipeline)
    python benchmarks/endurance.py --part data --steps 60000   # the stream alone (no model), fast

A tiny model (d_model 32, n_ctx 64, batch 8) trains on the endless `synthetic` stream (generated,
tokenized, shuffled and packed on the fly) with an evaluation and a checkpoint every 250 steps, so
every buffer and cache of the pipeline and every save path runs many times. Every --every steps it
records the resident set size (RSS) as it is and after a garbage collection and malloc_trim (what is
really held: glibc's free lists make the raw figure jump by tens of MiB), the peak RSS, the number
of Python objects the garbage collector tracks, the stream's buffer sizes, and the size of the
synthetic generator's two bounded caches (recent texts, at most 8192; episode tables, at most 100k
before they are cleared), which fill over tens of thousands of steps.

It reports the slope of the settled RSS over the second half of the run, in MiB per 1000 steps, and
the same slope of RSS minus the generator's caches: flat when within noise (< 1 MiB / 1000 steps).
The tokenizers library's own word cache (bounded, about 4 MiB here) fills during the first ~2000
steps, so a run shorter than 4000 steps (--quick) shows the figures but its verdict is "too short
to judge" unless the slope is already under the threshold. Exit status 1 only for "growing".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import machine  # benchmarks/machine.py: how host memory is allocated (--malloc)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FLAT_MIB_PER_1000_STEPS = 1.0
WARMUP_STEPS = 2000  # the tokenizer's word cache fills meanwhile
N_CTX, BATCH = 64, 8


def settle() -> None:
    """Collect garbage and hand free heap pages back to the OS, so RSS shows what is still held."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cache_bytes(recent, episodes) -> float:
    """Approximate bytes held by the synthetic generator's two bounded caches (in MiB): the recent
    texts (text -> story index, at most 8192) and the episode tables (at most 100k, then cleared)."""
    size = sys.getsizeof(recent) + sum(sys.getsizeof(text) + 32 for text in recent)
    size += sys.getsizeof(episodes)
    for key, value in list(episodes.items()):
        size += sys.getsizeof(key) + sys.getsizeof(value) + sum(sys.getsizeof(part) for part in value)
        size += sum(24 for part in value[1:] for _ in part)  # the floats of the two number columns
    return size / 2**20


def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of this process, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024
    return {"rss_mib": out.get("VmRSS", float("nan")), "peak_mib": out.get("VmHWM", float("nan"))}


class Probe:
    """Samples memory every `every` steps (a trainer callback, or called by hand for the data part)."""

    def __init__(self, every: int, stream=None):
        self.every = every
        self.stream = stream
        self.samples: list[dict] = []
        self.start = time.perf_counter()

    def __getattr__(self, name):  # the other callback hooks: nothing to do
        return lambda *a, **k: None

    def on_step_end(self, trainer, metrics) -> None:
        self.sample(metrics["step"], getattr(trainer, "train_stream", None))

    def sample(self, step: int, stream=None) -> None:
        if step % self.every and step != 1:
            return
        state = getattr(stream, "_state", None)
        dataset = getattr(stream, "dataset", None)
        lexicon = getattr(getattr(dataset, "generator", None), "_lex", None)
        raw = proc_status()
        settle()
        recent, episodes = getattr(dataset, "_recent", {}), getattr(lexicon, "episode_cache", {})
        self.samples.append({
            "step": step, "rss_raw_mib": round(raw["rss_mib"], 2),
            **{k: round(v, 2) for k, v in proc_status().items()},
            "gc_objects": len(gc.get_objects()),
            "stream_tokens": len(state.tokens) if state else 0, "shuffle_buffer": len(state.buffer) if state else 0,
            "recent_texts": len(recent), "episode_cache": len(episodes),
            "caches_mib": round(cache_bytes(recent, episodes), 3),
            "seconds": round(time.perf_counter() - self.start, 1),
        })


def run_full(args, steps: int, probe: Probe, out: str, fixed: bool = False) -> dict:
    """The Trainer on the synthetic stream (or, fixed=True, on random in-memory batches: no data pipeline)."""
    import torch

    from qtoy_core.training.config import assemble_run_config
    from qtoy_core.training.trainer import Trainer

    flags = {"d_model": 32, "n_head": 2, "n_ctx": N_CTX, "batch_size": BATCH, "precision": "fp32", "compile": False,
             "max_iters": steps, "eval_interval": args.eval_interval, "eval_iters": 2, "warmup": 10,
             "checkpoint_interval": args.checkpoint_interval, "log_interval": 50}
    if fixed:
        flags["vocab_size"] = 4096
    config = assemble_run_config({}, flags, ["data.shuffle_buffer=256", "data.tokenize_batch=64"])
    batches = val = None
    if fixed:
        def random_batches(seed):
            g = torch.Generator().manual_seed(seed)
            while True:
                yield torch.randint(0, 4096, (BATCH, N_CTX + 1), generator=g)

        batches, val = random_batches(0), [next(random_batches(1)) for _ in range(2)]
    return Trainer(config, out, callbacks=[probe], train_batches=batches, val_batches=val).fit()


def run_data(args, steps: int, probe: Probe) -> dict:
    """The synthetic stream alone: batches drawn (and the state saved, as at checkpoints), no model."""
    from qtoy_core.data import StreamingTextDataset, build_dataset

    stream = StreamingTextDataset(build_dataset("synthetic"), split="train", n_ctx=N_CTX, batch_size=BATCH,
                                  shuffle_buffer=256, tokenize_batch=64)
    tokens = 0
    for step, batch in enumerate(stream, start=1):
        tokens += batch.tokens.numel()
        if step % args.checkpoint_interval == 0:
            stream.state_dict()
        probe.sample(step, stream)
        if step >= steps:
            break
    return {"tokens": tokens, "train_loss": None}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 4000, quick 600)")
    parser.add_argument("--every", type=int, default=None, help="sample every N steps (default steps/40)")
    parser.add_argument("--quick", action="store_true", help="600 steps")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--checkpoint-interval", type=int, default=250)
    parser.add_argument("--eval-interval", type=int, default=250)
    parser.add_argument("--out", help="run folder (default: a temporary one, removed)")
    parser.add_argument("--part", choices=("full", "trainer", "data"), default="full",
                        help="full: training on the synthetic stream; trainer: the same training on random "
                             "in-memory batches (no data pipeline); data: the stream alone (no model)")
    machine.add_malloc_option(parser)
    args = parser.parse_args(argv)
    malloc_kept = machine.apply_malloc(args.malloc)
    steps = args.steps or (600 if args.quick else 4000)
    every = args.every or max(1, steps // 40)

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    probe = Probe(every)
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="qtoy-endurance-")
    out = args.out or os.path.join(tmp.name, "run")
    start = time.perf_counter()
    if args.part == "data":
        summary = run_data(args, steps, probe)
    else:
        summary = run_full(args, steps, probe, out, fixed=args.part == "trainer")
    seconds = time.perf_counter() - start
    samples = probe.samples
    half = [s for s in samples if s["step"] >= steps // 2]
    rss_slope = slope([(s["step"] / 1000, s["rss_mib"]) for s in half])
    rest_slope = slope([(s["step"] / 1000, s["rss_mib"] - s["caches_mib"]) for s in half])
    # with freed memory kept (--malloc qtoy) the raw figure is what the process holds from the OS
    raw_slope = slope([(s["step"] / 1000, s["rss_raw_mib"]) for s in half])
    result = {
        "part": args.part, "steps": steps, "every": every, "seconds": round(seconds, 1), "tokens": summary["tokens"],
        "final_loss": summary["train_loss"], "samples": samples,
        "rss_start_mib": samples[0]["rss_mib"], "rss_half_mib": half[0]["rss_mib"],
        "rss_end_mib": samples[-1]["rss_mib"],
        "peak_rss_mib": max(s["peak_mib"] for s in samples),
        "rss_slope_mib_per_1000_steps_second_half": round(rss_slope, 3),
        "raw_rss_end_mib": samples[-1]["rss_raw_mib"],
        "raw_rss_slope_mib_per_1000_steps_second_half": round(raw_slope, 3),
        "malloc": args.malloc, "malloc_kept_block_bytes": malloc_kept,
        "rss_growth_second_half_mib": round(samples[-1]["rss_mib"] - half[0]["rss_mib"], 2),
        "generator_caches_growth_second_half_mib": round(samples[-1]["caches_mib"] - half[0]["caches_mib"], 2),
        "rss_minus_caches_slope_mib_per_1000_steps_second_half": round(rest_slope, 3),
        "gc_objects_growth_second_half": samples[-1]["gc_objects"] - half[0]["gc_objects"],
        "max_stream_tokens": max(s["stream_tokens"] for s in samples),
        "max_shuffle_buffer": max(s["shuffle_buffer"] for s in samples),
        "flat": abs(rss_slope) < FLAT_MIB_PER_1000_STEPS,
        "flat_apart_from_bounded_caches": abs(rest_slope) < FLAT_MIB_PER_1000_STEPS,
        "verdict": ("flat" if abs(rest_slope) < FLAT_MIB_PER_1000_STEPS else
                    "growing" if steps >= 2 * WARMUP_STEPS or args.part == "trainer" else "too short to judge"),
        "torch_threads": torch.get_num_threads(),
    }
    if tmp is not None:
        tmp.cleanup()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'step':>7} {'RSS MiB':>8} {'raw RSS':>8} {'peak MiB':>8} {'gc objs':>8} {'stream tok':>10} "
              f"{'shuffle':>7} {'recent':>6} {'episodes':>8} {'caches MiB':>10} {'s':>6}")
        for s in samples:
            print(f"{s['step']:>7} {s['rss_mib']:>8.1f} {s['rss_raw_mib']:>8.1f} {s['peak_mib']:>8.1f} "
                  f"{s['gc_objects']:>8} "
                  f"{s['stream_tokens']:>10} {s['shuffle_buffer']:>7} {s['recent_texts']:>6} {s['episode_cache']:>8} "
                  f"{s['caches_mib']:>10.2f} {s['seconds']:>6}")
        print(f"{steps} steps in {seconds:.0f} s; RSS {result['rss_start_mib']:.1f} -> {result['rss_half_mib']:.1f} "
              f"(half-time) -> {result['rss_end_mib']:.1f} MiB, peak {result['peak_rss_mib']:.1f} MiB; slope over the "
              f"second half {rss_slope:+.3f} MiB / 1000 steps ({'flat' if result['flat'] else 'growing'}); "
              f"gc objects {result['gc_objects_growth_second_half']:+d} over the second half")
        print(f"raw RSS (before malloc_trim; malloc: {args.malloc}) ends at {result['raw_rss_end_mib']:.1f} MiB, "
              f"slope over the second half {raw_slope:+.3f} MiB / 1000 steps")
        print(f"the synthetic generator's bounded caches grew {result['generator_caches_growth_second_half_mib']:+.2f} "
              f"MiB over the second half; RSS minus those caches: {rest_slope:+.3f} MiB / 1000 steps "
              f"({result['verdict']})")
        if result["verdict"] == "too short to judge":
            print(f"(the tokenizer's bounded word cache, about 4 MiB, fills during the first ~{WARMUP_STEPS} steps: "
                  f"a slope over fewer than {2 * WARMUP_STEPS} steps includes it)")
    return 1 if result["verdict"] == "growing" else 0


if __name__ == "__main__":
    sys.exit(main())
