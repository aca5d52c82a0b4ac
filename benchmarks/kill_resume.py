"""Kill a training run with SIGKILL at random moments (many inside a checkpoint save), resume it,
and check that no work is lost and nothing in the run folder is corrupt.

    python benchmarks/kill_resume.py                  # 50 kills (~4-6 min on a loaded 2-core CPU)
    python benchmarks/kill_resume.py --quick          # 6 kills (~1 min)
    python benchmarks/kill_resume.py --kills 200 --json
    python benchmarks/kill_resume.py --launcher exec  # a fresh `python -m qtoy_cli.main train` per process

What it does:

1. A reference run: `qtoy train` (tiny model, fp32, no compile, synthetic data, a checkpoint every
   2 steps) from start to end, never interrupted.
2. The same command in another folder, killed again and again. Each training process is a real OS
   process running the `qtoy train` entry point (forked from this script after its imports, or a
   fresh interpreter with --launcher exec). In the killed runs every file operation of a checkpoint
   save (weights, trainer state, fsync, rename, pointer, links, pruning) sleeps a little before and
   after, so the save window is wide; the process records the operation it is in, in a shared
   file, so each kill is classified by where it landed. Half the kills wait for a save to begin and
   strike at a random moment inside it; the others strike after a random number of steps plus a
   random delay (including during start-up).
   Some cycles send SIGINT or SIGTERM instead (--signals): the run must stop cleanly (exit 2, a
   message naming `--resume`) with a checkpoint at the very step it stopped.
3. After every kill the run folder is checked (every file parses, the checkpoint pointed to is
   complete and loads, the published weights load, metrics.jsonl has steps 1..k once each, with at
   most a cut-off last line); then `qtoy train --resume` continues it. A run killed before its first
   checkpoint cannot resume: that refusal (a clear message) is checked, and the run is started again.
4. At the end: the resumed run's per-step losses, validation losses and final weights must equal
   the reference run's exactly (CPU, one thread), the folder must hold no temporary leftovers, and
   every resume must have continued from the checkpoint pointed to at the kill.

Prints "N kills, N clean resumes" (and with --json one JSON object). Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # deterministic and fast on a shared machine
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHASE_BYTES = 64  # the shared file holds two slots: the current phase, and the step the loop started at
CHECKPOINT_INTERVAL = 2
SAVE_PHASES = ("weights", "state", "fsync", "rename", "pointer", "publish", "prune")


def train_args(run: Path, max_iters: int) -> list[str]:
    """A tiny, fast, deterministic run on the synthetic data (whose stream state is checkpointed)."""
    return ["train", "--d-model", "32", "--n-head", "2", "--n-ctx", "32", "--batch-size", "4", "--precision", "fp32",
            "--no-compile", "--warmup", "2", "--eval-interval", "10", "--eval-iters", "1", "--max-iters",
            str(max_iters), "--set", f"train.checkpoint_interval={CHECKPOINT_INTERVAL}", "--set",
            "data.shuffle_buffer=8", "--set", "data.tokenize_batch=8", "--set", "data.dataset.val_fraction=0.2",
            "--set", "data.dataset.val_documents=8", "--quiet", "--out", str(run)]


def resume_args(run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--quiet"]


# -- the training process ------------------------------------------------------------------------
def _slot(shared: mmap.mmap, index: int, text: str) -> None:
    data = text.encode()[:PHASE_BYTES - 1]
    shared[index * PHASE_BYTES:(index + 1) * PHASE_BYTES] = data + b"\0" * (PHASE_BYTES - len(data))


def _install_markers(shared: mmap.mmap) -> None:
    """Record the step the training loop starts at (after any resume), for the parent to read."""
    from qtoy_core.training.trainer import Trainer

    real_loop = Trainer._loop

    def loop(self):
        _slot(shared, 0, "train")
        _slot(shared, 1, str(self.step))
        return real_loop(self)

    Trainer._loop = loop


def _install_slow_saves(shared: mmap.mmap, slow: float, seed: int) -> None:
    """Record where the process is (each file operation of a checkpoint save, metrics, evaluation); with
    `slow`, each save operation also sleeps up to that long before and after (a wider save window)."""
    import safetensors.torch
    import torch

    from qtoy_core.training import run_folder

    rng = random.Random(seed)

    def mark(name: str) -> None:
        _slot(shared, 0, name)

    def slowed(name, fn):
        def wrapper(*args, **kwargs):
            mark(f"before {name}")
            if slow:
                time.sleep(slow * rng.random())
            result = fn(*args, **kwargs)
            mark(f"after {name}")
            if slow:
                time.sleep(slow * rng.random())
            return result
        return wrapper

    saving = {"on": False}

    def only_in_save(name, fn):
        slow_fn = slowed(name, fn)
        return lambda *a, **k: slow_fn(*a, **k) if saving["on"] else fn(*a, **k)

    safetensors.torch.save_model = slowed("weights", safetensors.torch.save_model)
    torch.save = slowed("state", torch.save)
    os.fsync = only_in_save("fsync", os.fsync)
    os.replace = only_in_save("rename", os.replace)
    run_folder.write_atomic = only_in_save("pointer", run_folder.write_atomic)
    folder = run_folder.RunFolder
    folder._publish = slowed("publish", folder._publish)
    folder._prune = slowed("prune", folder._prune)
    real_save, real_append = folder.save_checkpoint, folder.append_metrics

    def save_checkpoint(self, *args, **kwargs):
        saving["on"] = True
        try:
            return real_save(self, *args, **kwargs)
        finally:
            saving["on"] = False
            mark("train")

    def append_metrics(self, records):
        mark("metrics")
        real_append(self, records)
        mark("train")

    folder.save_checkpoint, folder.append_metrics = save_checkpoint, append_metrics
    from qtoy_core.training.trainer import Trainer

    real_evaluate = Trainer.evaluate

    def evaluate(self):
        mark("eval")
        try:
            return real_evaluate(self)
        finally:
            mark("train")

    Trainer.evaluate = evaluate


def child_main(spec: dict) -> int:
    """Run `qtoy <argv>` in this process (stdout/stderr to the given files); returns the exit code."""
    for stream, path in ((1, spec["stdout"]), (2, spec["stderr"])):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, stream)
        os.close(fd)
    fd = os.open(spec["phase"], os.O_RDWR)
    shared = mmap.mmap(fd, 2 * PHASE_BYTES)
    os.close(fd)
    _install_markers(shared)
    _install_slow_saves(shared, spec.get("slow", 0.0), spec.get("seed", 0))
    from qtoy_cli.main import main

    try:
        main(spec["argv"])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


class Process:
    """One training (or checking) process: forked from this script, or a fresh interpreter."""

    def __init__(self, spec: dict, launcher: str):
        self.spec = spec
        self.started = time.perf_counter()
        self.code: int | None = None
        if launcher == "fork":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child
                code = 1
                try:
                    code = spec["target"](spec) if "target" in spec else child_main(spec)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
            self.pid, self.popen = pid, None
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(
                {k: v for k, v in spec.items() if k != "target"} | {"check": spec.get("target") is check_folder})]
            self.popen = subprocess.Popen(cmd)
            self.pid = self.popen.pid

    def poll(self) -> int | None:
        if self.code is None:
            if self.popen is not None:
                self.code = self.popen.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait(self, timeout: float = 600.0) -> int:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                self.kill()
                raise TimeoutError(f"process {self.spec.get('argv')} did not finish in {timeout:.0f} s")
            time.sleep(0.01)
        return self.code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def stderr(self) -> str:
        return Path(self.spec["stderr"]).read_text(errors="replace") if Path(self.spec["stderr"]).exists() else ""


# -- checking a run folder (in a separate process: this one stays free of torch threads) ----------
def check_folder(spec: dict) -> int:
    """Write {"ok": bool, "problems": [...], "step": latest checkpoint step} to spec["result"]."""
    problems, info = [], {"step": None}
    try:
        info.update(_check(Path(spec["run"]), final=spec.get("final", False), problems=problems,
                           reference=Path(spec["reference"]) if spec.get("reference") else None))
    except Exception as exc:  # a check that crashes is itself a finding
        problems.append(f"checking crashed: {type(exc).__name__}: {exc}")
    Path(spec["result"]).write_text(json.dumps({"ok": not problems, "problems": problems, **info}))
    return 0


def _check(run: Path, *, final: bool, problems: list[str], reference: Path | None = None) -> dict:
    import torch
    from safetensors.torch import load_file

    from qtoy_core import ToyTransformer
    from qtoy_core.checkpoint import model_config_from_document, read_document
    from qtoy_core.training.config import RunConfig

    out: dict = {"step": None}
    pointer_path = run / "checkpoint.json"
    if (run / "config.json").exists():
        doc = read_document(run)
        model_config_from_document(doc, str(run))
        RunConfig.model_validate(doc)
    if not pointer_path.exists():
        out["step"] = 0
    else:
        pointer = json.loads(pointer_path.read_text())
        latest = run / pointer["latest"]
        step = int(pointer["step"])
        out["step"] = step
        for name in ("model.safetensors", "trainer_state.pt", "config.json"):
            if not (latest / name).is_file():
                problems.append(f"the latest checkpoint {latest.name} lacks {name}")
        model = ToyTransformer.from_pretrained(latest)
        state = torch.load(latest / "trainer_state.pt", map_location="cpu", weights_only=True)
        if state["step"] != step:
            problems.append(f"trainer_state step {state['step']} != pointer step {step}")
        for p in model.parameters():
            if not torch.isfinite(p).all():
                problems.append("non-finite weights in the latest checkpoint")
                break
        if pointer.get("best"):
            ToyTransformer.from_pretrained(run / pointer["best"]["path"])
        top = ToyTransformer.from_pretrained(run)  # the published weights (HF layout)
        del top
        for link in ("latest", "best"):
            path = run / link
            if path.is_symlink() and not (path / "model.safetensors").is_file():
                problems.append(f"the {link} link points to {os.readlink(path)}, which is not a checkpoint")
        if final and reference is not None:
            ref = load_file(reference / "model.safetensors")
            mine = load_file(run / "model.safetensors")
            out["weights_match_reference"] = ref.keys() == mine.keys() and all(
                torch.equal(ref[k], mine[k]) for k in ref)
        if final:
            top = load_file(run / "model.safetensors")
            mine = load_file(latest / "model.safetensors")
            if top.keys() != mine.keys() or any(not torch.equal(top[k], mine[k]) for k in top):
                problems.append("the published model.safetensors differs from the latest checkpoint")
            if os.path.realpath(run / "latest") != os.path.realpath(latest):
                problems.append("the latest link does not point to the latest checkpoint")
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    steps = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if final or i != len(lines) - 1:
                problems.append(f"metrics.jsonl line {i + 1} is not JSON: {line[:60]!r}")
            continue
        if "loss" in record:
            steps.append(record["step"])
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"metrics.jsonl steps are not 1..{len(steps)} once each: {_compress(steps)}")
    out["metrics_steps"] = len(steps)
    if final:
        leftovers = [str(p.relative_to(run)) for p in run.rglob("*")
                     if p.name.startswith((".tmp-", ".write-test-")) or p.name.endswith(".tmp")]
        if leftovers:
            problems.append(f"temporary files left behind: {leftovers[:5]}")
        kept = sorted(p.name for p in (run / "checkpoints").iterdir())
        if len(kept) > 2:
            problems.append(f"more than latest and best kept: {kept}")
    return out


def _compress(steps: list[int]) -> str:
    return str(steps) if len(steps) < 30 else f"{steps[:10]} ... {steps[-10:]} ({len(steps)} records)"


def read_metrics(run: Path) -> list[dict]:
    out = []
    path = run / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def last_step(run: Path) -> int:
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    return steps[-1] if steps else 0


def pointer_step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoint.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


# -- the experiment -------------------------------------------------------------------------------
class Experiment:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.rng = random.Random(args.seed)
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.phase = work / "phase"
        self.phase.write_bytes(b"\0" * 2 * PHASE_BYTES)
        fd = os.open(self.phase, os.O_RDWR)
        self.shared = mmap.mmap(fd, 2 * PHASE_BYTES)
        os.close(fd)
        self.n = 0
        self.events: list[dict] = []

    def read_phase(self) -> str:
        return bytes(self.shared[:PHASE_BYTES]).split(b"\0", 1)[0].decode(errors="replace")

    def loop_start(self) -> int | None:
        """The step the current process's training loop started at, once it has started."""
        text = bytes(self.shared[PHASE_BYTES:2 * PHASE_BYTES]).split(b"\0", 1)[0].decode()
        return int(text) if text else None

    def launch(self, argv: list[str], *, slow: float = 0.0) -> Process:
        self.n += 1
        self.shared[:] = b"\0" * 2 * PHASE_BYTES
        spec = {"argv": argv, "stdout": str(self.logs / f"{self.n:03d}.out"),
                "stderr": str(self.logs / f"{self.n:03d}.err"), "phase": str(self.phase), "slow": slow,
                "seed": self.rng.randrange(2**31)}
        return Process(spec, self.args.launcher)

    def check(self, run: Path, *, final: bool = False, reference: Path | None = None) -> dict:
        self.n += 1
        result = self.logs / f"{self.n:03d}.check.json"
        proc = Process({"target": check_folder, "run": str(run), "final": final, "result": str(result),
                        "reference": str(reference) if reference else None,
                        "stdout": str(self.logs / f"{self.n:03d}.check.out"),
                        "stderr": str(self.logs / f"{self.n:03d}.check.err")}, self.args.launcher)
        proc.wait()
        if not result.exists():
            return {"ok": False, "problems": [f"the check process failed: {proc.stderr()[-800:]}"], "step": None}
        return json.loads(result.read_text())

    # -- one cycle: start or resume, then stop the process somehow ----------------------------
    def _wait_for(self, proc: Process, condition, timeout: float = 300.0) -> bool:
        """Poll until condition() or the process ends; True when the condition held first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.002)
        raise TimeoutError("the training process made no progress")

    def stop(self, proc: Process, run: Path, how: str) -> dict:
        """Kill (or signal) `proc` at a random moment; returns what happened."""
        args, rng = self.args, self.rng
        event: dict = {"how": how}
        started = lambda: self.loop_start() is not None  # noqa: E731
        progressed = lambda n: lambda: started() and last_step(run) >= self.loop_start() + n  # noqa: E731
        if how == "save":  # strike inside a checkpoint save
            if self._wait_for(proc, lambda: started() and self.read_phase().startswith(("before", "after"))
                              and self.read_phase() != "after prune"):
                time.sleep(rng.uniform(0, args.slow * 4))
        elif how == "random" and rng.random() < 0.25:  # any moment of the first second, start-up included
            time.sleep(rng.uniform(0, 1.0))
        elif how == "random":  # a random number of steps, plus a random delay
            if self._wait_for(proc, progressed(rng.randint(1, 2 * CHECKPOINT_INTERVAL))):
                time.sleep(rng.uniform(0, 0.2))
        else:  # a graceful signal after at least one new step
            self._wait_for(proc, progressed(1))
        event["loop_started_at"] = self.loop_start()
        if proc.poll() is not None:
            event.update(how="finished", code=proc.code)
            return event
        if how in ("SIGINT", "SIGTERM"):
            proc.kill(getattr(signal, how))
            code = proc.wait(timeout=120)
            err = proc.stderr()
            event.update(code=code, message=err.strip().splitlines()[-1] if err.strip() else "")
            event["clean_stop"] = (code == 2 and f"Stopped by {how}" in err and f"--resume {run}" in err
                                   and "Traceback" not in err and pointer_step(run) == last_step(run))
            return event
        proc.kill()
        proc.wait()
        event["phase"] = self.read_phase() or ("start-up" if self.loop_start() is None else "train")
        event["killed_at_step"] = last_step(run) if self.loop_start() is not None else None
        return event

    def run(self) -> dict:
        args = self.args
        reference, run = self.work / "reference", self.work / "run"
        t0 = time.perf_counter()
        ref = self.launch(train_args(reference, args.max_iters))
        if ref.wait() != 0:
            raise SystemExit(f"the reference run failed:\n{ref.stderr()[-2000:]}")
        ref_seconds = time.perf_counter() - t0

        plan = ["save" if i % 2 == 0 else "random" for i in range(args.kills)]
        signals = [s for s in args.signals.split(",") if s]
        for i, sig in enumerate(signals):  # spread the graceful stops over the run
            plan.insert((i + 1) * len(plan) // (len(signals) + 1), sig)
        kills = signal_stops = restarts = 0
        failures: list[str] = []
        phases: dict[str, int] = {}
        # Saves are slowed only in processes whose kill targets a save; other kills meet natural timing.
        slow = lambda i: args.slow if i < len(plan) and plan[i] == "save" else 0.0  # noqa: E731
        proc = self.launch(train_args(run, args.max_iters), slow=slow(0))
        for i, how in enumerate(plan):
            event = self.stop(proc, run, how)
            self.events.append(event)
            if event["how"] == "finished":
                if event.get("code") != 0:
                    failures.append(f"a training process exited {event.get('code')}: {proc.stderr()[-600:]}")
                break
            if how in ("SIGINT", "SIGTERM"):
                signal_stops += 1
                if not event["clean_stop"]:
                    failures.append(f"{how} did not stop cleanly: {event}: {proc.stderr()[-600:]}")
            else:
                kills += 1
                phase = event["phase"]
                phases[phase] = phases.get(phase, 0) + 1
            check = self.check(run)
            event["check"] = check
            if not check["ok"]:
                failures.append(f"after {how} at {event.get('phase')}: {check['problems']}")
            expected = check["step"] or 0
            # resume; a run killed before its first checkpoint is refused and started again
            proc = self.launch(resume_args(run), slow=slow(i + 1))
            if expected == 0:
                code = proc.wait()
                err = proc.stderr()
                refused = code == 2 and "Traceback" not in err and (
                    "no complete checkpoint" in err or "not a qtoy run folder" in err or "does not exist" in err)
                event["refused_without_checkpoint"] = refused
                if not refused:
                    failures.append(f"resuming a run without a checkpoint: exit {code}: {err[-600:]}")
                event["recovered"] = refused and check["ok"]
                restarts += 1
                proc = self.launch(train_args(run, args.max_iters), slow=slow(i + 1))
            else:
                self._wait_for(proc, lambda: self.loop_start() is not None)
                event["continued_from"] = self.loop_start()
                event["recovered"] = self.loop_start() == expected and check["ok"]
                if self.loop_start() != expected:
                    failures.append(f"the resume after {how} started at step {self.loop_start()}, not at the "
                                    f"checkpoint's step {expected}: {proc.stderr()[-600:]}")
        if proc.wait() != 0:  # let the last one finish (resuming once more if it was stopped)
            failures.append(f"the last process exited {proc.code}: {proc.stderr()[-600:]}")
        while last_step(run) < args.max_iters and not failures:
            proc = self.launch(resume_args(run))
            if proc.wait() != 0:
                failures.append(f"the final resume exited {proc.code}: {proc.stderr()[-600:]}")

        final = self.check(run, final=True, reference=reference)
        if not final["ok"]:
            failures.append(f"final folder: {final['problems']}")
        ref_metrics, run_metrics = read_metrics(reference), read_metrics(run)
        ref_loss = [(m["step"], m["loss"]) for m in ref_metrics if "loss" in m]
        run_loss = [(m["step"], m["loss"]) for m in run_metrics if "loss" in m]
        ref_val = [(m["step"], m["val_loss"]) for m in ref_metrics if "val_loss" in m]
        run_val = [(m["step"], m["val_loss"]) for m in run_metrics if "val_loss" in m]
        same_loss, same_val = ref_loss == run_loss, ref_val == run_val
        same_weights = bool(final.get("weights_match_reference"))
        if not same_loss:
            first = next((a, b) for a, b in zip(ref_loss + [None] * 9, run_loss + [None] * 9) if a != b)
            failures.append(f"the loss curve differs from the reference (first difference: {first})")
        if not same_val:
            failures.append(f"validation losses differ: {ref_val} vs {run_val}")
        if not same_weights:
            failures.append("the final weights differ from the reference")
        save_kills = sum(v for k, v in phases.items() if k not in ("train", "metrics", "eval", "start-up"))
        return {
            "kills": kills,
            "clean_resumes": sum(1 for e in self.events if e.get("phase") and e.get("recovered")),
            "restarts_before_first_checkpoint": restarts, "kills_inside_a_save": save_kills,
            "kills_by_phase": dict(sorted(phases.items())), "signal_stops": signal_stops,
            "clean_signal_stops": sum(1 for e in self.events if e.get("clean_stop") and e.get("recovered")),
            "max_iters": args.max_iters, "steps_in_run": len(run_loss),
            "loss_curve_matches": same_loss, "val_loss_matches": same_val, "final_weights_match": same_weights,
            "reference_seconds": round(ref_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
            "launcher": args.launcher, "slow_save_s": args.slow, "seed": args.seed,
            "failures": failures, "ok": not failures,
            "events": [{k: e.get(k) for k in ("how", "phase", "killed_at_step", "continued_from", "recovered",
                                              "code", "message") if e.get(k) is not None}
                       | {"checkpoint_step": (e.get("check") or {}).get("step")} for e in self.events],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=None, help="SIGKILLs to deliver (default 50, quick 6)")
    parser.add_argument("--quick", action="store_true", help="6 kills")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--signals", default="SIGINT,SIGTERM", help="graceful stops mixed in (comma list)")
    parser.add_argument("--slow", type=float, default=0.03,
                        help="seconds each save operation may sleep before and after (widens the save window)")
    parser.add_argument("--launcher", choices=("fork", "exec"), default="fork",
                        help="fork: processes forked from this script after its imports (fast); exec: a fresh "
                             "interpreter per process")
    parser.add_argument("--workdir", help="keep the runs and logs here (default: a temporary folder, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        return check_folder(spec) if spec.get("check") else child_main(spec)
    args.kills = args.kills if args.kills is not None else (6 if args.quick else 50)
    # enough steps for every kill to land on fresh progress (each cycle advances up to ~4 steps)
    args.max_iters = 4 * args.kills + 10
    if args.launcher == "fork":  # import once; every forked process starts from here
        import qtoy_cli.main  # noqa: F401
        import qtoy_cli.train  # noqa: F401
        import qtoy_core.training.trainer  # noqa: F401
        from qtoy_core.data import build_dataset  # noqa: F401
        from qtoy_registry import get_registry

        get_registry().table
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qtoy-kill-resume-"))
    if (work / "run").exists() or (work / "reference").exists():
        shutil.rmtree(work / "run", ignore_errors=True)
        shutil.rmtree(work / "reference", ignore_errors=True)
    try:
        result = Experiment(args, work).run()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['kills']} kills, {result['clean_resumes']} clean resumes "
              f"({result['restarts_before_first_checkpoint']} of them before the first checkpoint: refused with a "
              f"message and restarted); "
              f"{result['kills_inside_a_save']} kills inside a checkpoint save; "
              f"{result['clean_signal_stops']}/{result['signal_stops']} SIGINT/SIGTERM stops clean")
        print(f"kills by phase: {result['kills_by_phase']}")
        print(f"loss curve matches the uninterrupted run: {result['loss_curve_matches']}; final weights match: "
              f"{result['final_weights_match']}; {result['seconds']} s")
        for f in result["failures"]:
            print("FAILURE:", f)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
