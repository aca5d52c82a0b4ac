"""A run folder: the only hand-off between training and everything after it.

    RUN/config.json            the run document: model, data, optimizer, callbacks, train, plugins
    RUN/model.safetensors      weights of the latest checkpoint (with config.json: the HF hub format)
    RUN/metrics.jsonl          one JSON record per step and per evaluation
    RUN/checkpoint.json        pointer to the latest complete checkpoint and the best one
    RUN/checkpoints/step_N/    model.safetensors, trainer_state.pt, config.json (one complete checkpoint)
    RUN/latest, RUN/best       links to checkpoint folders (from_pretrained(RUN / "best") works)
    RUN/checkpoints/snapshots/step_N.safetensors
                               weights-only snapshots of the log schedule (metadata: step, tokens)
    RUN/trainer.lock           held (flock) by the one trainer writing the folder

A checkpoint folder is written under a temporary name and renamed when complete; only then does
checkpoint.json (itself written atomically) point at it. A kill at any moment leaves the previous
checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from qtoy_registry import QtoyError, get_registry

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_document, component_providers, model_document
from ..run_files import append_jsonl, atomic_path, current_umask, read_jsonl, truncate_jsonl, write_atomic

POINTER_NAME = "checkpoint.json"
SNAPSHOT_DIR = "checkpoints/snapshots"
LOCK_NAME = "trainer.lock"
STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
MIN_FREE_BYTES = 64 * 2**20


class RunFolderError(QtoyError):
    pass


def run_document(run_config: Any) -> dict[str, Any]:
    """config.json of a run: the model document plus data, optimizer, callbacks and train sections,
    and the provider of every component used (so a missing plugin can be named on load)."""
    dump = run_config.model_dump(mode="json")
    doc = model_document(run_config.model, data=dump["data"], optimizer=dump["optimizer"],
                         callbacks=dump["callbacks"], train=dump["train"])
    registry = get_registry()
    extra = [("dataset", run_config.data.dataset.name), ("optimizer", run_config.optimizer.name)]
    extra += [("callback", c.name) for c in run_config.callbacks]
    for kind, name in extra:
        p = registry.get(kind, name).provider
        key = kind if kind != "callback" else f"callback:{name}"
        doc["plugins"][key] = {"name": name, "distribution": p.distribution, "version": p.version}
    return doc


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    # -- before training ---------------------------------------------------------------------
    def prepare(self, *, fresh: bool) -> None:
        """Create the folder and prove it is writable (with some free space) before any training."""
        if fresh and (self.path / POINTER_NAME).exists():
            raise RunFolderError(f"{self.path} already holds a run. Resume it with --resume {self.path}, or choose "
                                 f"another --out folder.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-", delete=True) as f:
                f.write(b"x" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise RunFolderError(f"Cannot write to the output folder {self.path} ({exc.strerror or exc}). Choose a "
                                 f"writable --out folder, or fix its permissions.") from None
        self.check_free_space(MIN_FREE_BYTES)
        # Leftovers of a process killed mid-write: half-written checkpoint folders and temporary files.
        for leftover in (self.path / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in [*self.path.glob(".*.tmp"), *self.path.glob(".write-test-*")]:
            if leftover.is_file() or leftover.is_symlink():
                leftover.unlink(missing_ok=True)
        if fresh:  # a new run's log starts empty (an earlier attempt here died before its first checkpoint)
            self.metrics_path.unlink(missing_ok=True)

    def check_free_space(self, needed: int) -> None:
        """Refuse to start when the disk of the run folder has less than `needed` bytes free."""
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise RunFolderError(f"Only {free / 2**20:.0f} MiB free on the disk of {self.path}, but checkpoints need "
                                 f"about {needed / 2**20:.0f} MiB: saving would fail. Free some space or choose another "
                                 f"--out folder.")

    def write_config(self, doc: dict[str, Any]) -> None:
        write_atomic(self.path / CONFIG_NAME, json.dumps(doc, indent=2) + "\n")

    def read_config(self) -> dict[str, Any]:
        """The run document, checked: a qtoy run of this format whose components are all installed."""
        try:
            doc = json.loads((self.path / CONFIG_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunFolderError(f"{self.path} has no {CONFIG_NAME}: it is not a qtoy run folder.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunFolderError(f"{self.path / CONFIG_NAME} is corrupt ({exc}). Restore it from a checkpoint "
                                 f"folder: copy {self.path / 'checkpoints'}/step_*/{CONFIG_NAME} over it.") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict) or "train" not in doc:
            raise RunFolderError(f"{self.path / CONFIG_NAME} is not the config of a qtoy training run (it lacks the "
                                 f"'model' and 'train' sections); --resume needs a folder written by `qtoy train`.")
        check_document(doc, str(self.path))
        return doc

    # -- checkpoints -----------------------------------------------------------------------------
    def pointer(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / POINTER_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:  # cannot happen with atomic writes, unless edited by hand
            raise RunFolderError(f"{self.path / POINTER_NAME} is corrupt ({exc}); point it at a folder in "
                                 f"{self.path / 'checkpoints'} by hand to recover.") from None

    def latest_checkpoint(self) -> tuple[Path, int] | None:
        pointer = self.pointer()
        if pointer is None:
            return None
        folder = self.path / pointer["latest"]
        if not (folder / STATE_NAME).exists() or not (folder / WEIGHTS_NAME).exists():
            raise RunFolderError(f"The latest checkpoint {folder} is incomplete (files were removed by hand?). Point "
                                 f"'latest' in {self.path / POINTER_NAME} at another complete checkpoint folder, "
                                 f"or start the run again.")
        return folder, int(pointer["step"])

    def save_checkpoint(self, model: torch.nn.Module, model_doc: dict[str, Any], state: dict[str, Any], step: int,
                        *, val_loss: float | None = None, keep_best: bool = True) -> Path:
        from safetensors.torch import save_model

        checkpoints = self.path / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:08d}"
        final = checkpoints / name
        pointer = self.pointer() or {}
        if pointer.get("latest") == f"checkpoints/{name}":
            return final  # this exact step is already saved and pointed to
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=checkpoints))
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; keep the usual permissions
            save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "step": str(step),
                                                                 "tokens": str(state.get("tokens", ""))})
            torch.save(state, tmp / STATE_NAME)
            (tmp / CONFIG_NAME).write_text(json.dumps(model_doc, indent=2) + "\n", encoding="utf-8")
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~current_umask())  # safetensors writes 0600: use the umask
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():  # a stale folder of an abandoned attempt at this step
                shutil.rmtree(final)
            os.replace(tmp, final)
            tmp = None
            best = pointer.get("best")
            if keep_best and val_loss is not None and (best is None or val_loss < best["val_loss"]):
                best = {"path": f"checkpoints/{name}", "step": step, "val_loss": val_loss}
            new_pointer = {"latest": f"checkpoints/{name}", "step": step, "best": best}
            # The commit point: until this rename, checkpoint.json points at the previous checkpoint.
            write_atomic(self.path / POINTER_NAME, json.dumps(new_pointer, indent=2) + "\n")
        except OSError as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise RunFolderError(f"Saving the checkpoint at step {step} failed ({_why(exc)}); the previous "
                                 f"checkpoint in {self.path} is intact. Free disk space or fix permissions, then "
                                 f"resume with --resume {self.path}.") from None
        try:
            self._publish(final, best)
        except OSError as exc:
            raise RunFolderError(f"The checkpoint at step {step} is saved in {final}, but {self.path / WEIGHTS_NAME} "
                                 f"could not be updated ({_why(exc)}). Free disk space or fix permissions, then resume "
                                 f"with --resume {self.path} (which updates it).") from None
        self._prune(keep={f"checkpoints/{name}", (best or {}).get("path")})
        return final

    def republish(self) -> None:
        """Make the top-level weights and the latest/best links match checkpoint.json again (a process
        killed between committing a checkpoint and publishing it leaves them one checkpoint behind)."""
        pointer = self.pointer()
        if pointer is None:
            return
        try:
            self._publish(self.path / pointer["latest"], pointer.get("best"))
        except OSError as exc:
            raise RunFolderError(f"Cannot update {self.path / WEIGHTS_NAME} from the latest checkpoint ({_why(exc)}). "
                                 f"Free disk space or fix permissions, then resume again.") from None

    def _publish(self, latest: Path, best: dict | None) -> None:
        """Top-level model.safetensors (a hard link, swapped in atomically) and the latest/best links."""
        target = self.path / WEIGHTS_NAME
        tmp = self.path / f".{WEIGHTS_NAME}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(latest / WEIGHTS_NAME, tmp)
        except OSError:
            shutil.copyfile(latest / WEIGHTS_NAME, tmp)
        os.replace(tmp, target)
        self._link("latest", latest)
        if best is not None:
            self._link("best", self.path / best["path"])

    def _link(self, name: str, folder: Path) -> None:
        tmp = self.path / f".{name}.tmp"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.relpath(folder, self.path), tmp)
            os.replace(tmp, self.path / name)
        except OSError:
            pass  # links are a convenience (unavailable on some file systems); checkpoint.json is the truth

    def _prune(self, keep: set) -> None:
        for folder in (self.path / "checkpoints").glob("step_*"):
            if f"checkpoints/{folder.name}" not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def load_state(self, folder: Path) -> dict[str, Any]:
        """The trainer state, unpickled with weights_only=True: plain tensors and values only, no code runs."""
        import pickle

        path = folder / STATE_NAME
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunFolderError(f"Refusing to load {path}: it holds objects other than plain tensors and values "
                                 f"({first}), and unpickling them could run code. qtoy never writes such a file: "
                                 f"it was replaced. Restore it, or start the run again.") from None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunFolderError(f"{path} is truncated or corrupt ({type(exc).__name__}: {first[:200]}). Resume "
                                 f"from the best checkpoint instead (copy its path into 'latest' in "
                                 f"{self.path / POINTER_NAME}), or start the run again.") from None

    # -- one writer ------------------------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Hold an exclusive OS lock (``flock``) on RUN/trainer.lock for as long as this process trains
        into the folder. The kernel drops it when the process dies (even by kill -9), so a crash never
        leaves the folder locked; a second trainer onto a folder whose trainer is alive is refused."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one writer is then the user's job
            return
        if getattr(self, "_lock_fd", None) is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError as exc:  # the same message prepare() gives for a folder it cannot write
            raise RunFolderError(f"Cannot write to the output folder {self.path} ({exc.strerror or exc}). Choose a "
                                 f"writable --out folder, or fix its permissions.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"{self.path} is being written by another trainer that is still running ({holder}). "
                                 f"Two trainers in one folder would interleave checkpoints and metrics. Wait for it "
                                 f"to finish (or stop it: Ctrl-C / kill its process), then resume with --resume "
                                 f"{self.path}; or train into another --out folder.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            self._lock_fd = None
            os.close(fd)  # closing the descriptor releases the flock

    # -- snapshots (log schedule) -------------------------------------------------------------------
    def save_snapshot(self, model: torch.nn.Module, step: int, tokens: int) -> Path:
        """Weights only, atomically, as checkpoints/snapshots/step_N.safetensors (step and tokens in
        the safetensors metadata)."""
        from safetensors.torch import save_model

        path = self.path / SNAPSHOT_DIR / f"step_{step:08d}.safetensors"
        try:
            with atomic_path(path) as tmp:
                save_model(model, str(tmp), metadata={"format": "pt", "step": str(step), "tokens": str(tokens)})
        except OSError as exc:
            raise RunFolderError(f"Saving the snapshot at step {step} failed ({_why(exc)}). Free disk space or fix "
                                 f"permissions, then resume with --resume {self.path}.") from None
        return path

    def drop_snapshots_after(self, step: int) -> None:
        """A resumed run rewrites the snapshots after its checkpoint, like metrics.jsonl."""
        for entry in list_checkpoints(self.path, kinds=("snapshot",)):
            if entry["step"] > step:
                Path(entry["path"]).unlink(missing_ok=True)

    # -- metrics ---------------------------------------------------------------------------------
    def append_metrics(self, records: list[dict[str, Any]]) -> None:
        self.append_log(METRICS_NAME, records)

    def truncate_metrics(self, after_step: int) -> None:
        """Keep the records of steps <= after_step (a resumed run rewrites what came after), dropping a
        line cut short by a kill."""
        self.truncate_log(METRICS_NAME, after_step)

    # -- the logs of plugins and features (samples.jsonl, dynamics.jsonl, ...) ---------------------
    def plugin_logs(self) -> list[str]:
        """The .jsonl logs in the run folder besides metrics.jsonl."""
        return sorted(p.name for p in self.path.glob("*.jsonl") if p.name != METRICS_NAME)

    def append_log(self, name: str, records: list[dict[str, Any]]) -> None:
        """Append JSON records to the log `name` (metrics.jsonl, samples.jsonl, ...) in one write."""
        path = self.path / name
        try:
            append_jsonl(path, *records)
        except OSError as exc:
            raise RunFolderError(f"Writing {path} failed ({_why(exc)}); the last checkpoint in {self.path} is "
                                 f"intact. Free disk space or fix permissions, then resume with --resume "
                                 f"{self.path}.") from None

    def truncate_log(self, name: str, after_step: int) -> None:
        """Keep the records of steps <= after_step of the log `name`, dropping a line cut short by a kill."""
        truncate_jsonl(self.path / name, after_step)


def _why(exc: OSError) -> str:
    return f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else (exc.strerror or str(exc))


def _snapshot_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def list_checkpoints(run: str | os.PathLike, kinds: tuple[str, ...] = ("snapshot", "checkpoint")) -> list[dict[str, Any]]:
    """Every saved set of weights of a run, by step: ``{"step", "tokens", "kind", "path", "latest",
    "best"}`` where kind is "snapshot" (weights only, log schedule) or "checkpoint" (full trainer
    state); a step saved both ways is listed once, as the checkpoint. Tokens are None where unknown."""
    run = Path(run)
    found: dict[int, dict[str, Any]] = {}
    if "snapshot" in kinds:
        for path in sorted((run / SNAPSHOT_DIR).glob("step_*.safetensors")):
            try:
                meta = _snapshot_meta(path)
                step = int(meta.get("step", path.stem.split("_")[-1]))
            except Exception:  # a file cut short by hand: not listed
                continue
            tokens = meta.get("tokens")
            found[step] = {"step": step, "tokens": int(tokens) if tokens else None, "kind": "snapshot",
                           "path": str(path), "latest": False, "best": False}
    if "checkpoint" in kinds:
        try:
            pointer = json.loads((run / POINTER_NAME).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pointer = {}
        best = (pointer.get("best") or {}).get("path")
        for folder in sorted((run / "checkpoints").glob("step_*")):
            weights = folder / WEIGHTS_NAME
            if not weights.exists() or not (folder / STATE_NAME).exists():
                continue
            step = int(folder.name.split("_")[-1])
            rel = f"checkpoints/{folder.name}"
            tokens = found.get(step, {}).get("tokens")
            try:
                tokens = int(_snapshot_meta(weights).get("tokens", "")) if tokens is None else tokens
            except Exception:
                pass
            found[step] = {"step": step, "tokens": tokens, "kind": "checkpoint", "path": str(weights),
                           "latest": pointer.get("latest") == rel, "best": best == rel}
    return [found[s] for s in sorted(found)]


def checkpoint_weights(run: str | os.PathLike, step: int) -> Path:
    """The weights file a run saved at ``step``; a clear error naming the saved steps otherwise."""
    saved = list_checkpoints(run)
    for entry in saved:
        if entry["step"] == step:
            return Path(entry["path"])
    if not saved:
        raise RunFolderError(f"{run} has no saved checkpoints or snapshots, so there is no step {step} to load. "
                             f"Train with --checkpoint-schedule log to keep weights at steps 1, 2, 4, ... "
                             f"(qtoy checkpoints RUN lists what a run kept).")
    steps = [e["step"] for e in saved]
    shown = ", ".join(map(str, steps[:20])) + (" ..." if len(steps) > 20 else "")
    raise RunFolderError(f"{run} has no weights saved at step {step}; it kept steps {shown}. Pick one of these "
                         f"(qtoy checkpoints {run}).")


def read_metrics(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl (a line cut short by a kill is skipped)."""
    return read_jsonl(Path(run) / METRICS_NAME)


__all__ = ["RunFolder", "RunFolderError", "checkpoint_weights", "list_checkpoints", "read_metrics", "run_document", "component_providers"]
