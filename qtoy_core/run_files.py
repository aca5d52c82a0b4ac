"""Files of run and model folders, written and read one way.

One durability rule for every file qtoy replaces (config.json, checkpoint.json, weights, tokenizers,
cached downloads): write a temporary file in the same folder, fsync it, `os.replace` it over the
target, then fsync the folder so the rename itself survives a power cut. A reader sees the old file
or the new one, never half of one; concurrent writers (several ranks saving one tokenizer) each
rename a complete file.

Logs that grow during a run (metrics.jsonl, a callback's own .jsonl) are JSON Lines: one record
per line, appended. A kill can cut the last line short, so reading skips lines that are not a JSON
object, and a resumed run truncates the log back to its checkpoint's step.

`load_run` is the one way to open a trained folder: the model, its tokenizer (when the folder has
one) and the config document.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    from .data.tokenizer import Tokenizer
    from .model import ToyTransformer

TOKENIZER_NAME = "tokenizer.json"


# -- atomic replacement ---------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error the file written there
    gets the usual permissions, is fsynced and renamed onto `path`, and the folder is fsynced. On an
    error the temporary file is removed and `path` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp (and safetensors) make 0600: use the umask
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` with `data` (str is written as UTF-8) under the rule of `atomic_path`."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to find it out is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in folder `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- JSON Lines logs ------------------------------------------------------------------------------
def _lines_and_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, record) for each line of `path` that is a JSON object; nothing when it is missing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield line, record


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON Lines file, in order; [] when it does not exist. Lines that are not a
    JSON object (a line cut short by a kill, a stray edit) are skipped."""
    return [record for _, record in _lines_and_records(Path(path))]


def append_jsonl(path: str | os.PathLike, *records: Mapping[str, Any]) -> None:
    """Append each record as one line (one write, so a kill loses at most the last line). OSError
    (a full disk) propagates: the caller knows what the log is for and what to tell the user."""
    text = "".join(json.dumps(dict(r)) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def truncate_jsonl(path: str | os.PathLike, after_step: int, key: str = "step") -> None:
    """Keep the records with record[key] <= after_step: a resumed run rewrites what came after its
    checkpoint. Records without a numeric `key` (a summary line) and invalid lines are dropped; the
    kept lines are copied as they were, and the file is replaced atomically. A missing file stays
    missing."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line, record in _lines_and_records(path):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= after_step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


# -- opening a trained folder ---------------------------------------------------------------------
def run_tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The tokenizer.json of a run or model folder: in the folder itself, or, for a checkpoint folder
    (RUN/checkpoints/step_N, or the RUN/best and RUN/latest links to one), in its run folder."""
    folder = Path(path)
    candidates = [folder / TOKENIZER_NAME]
    resolved = folder.resolve()
    if resolved.parent.name == "checkpoints":
        candidates.append(resolved.parent.parent / TOKENIZER_NAME)
    return next((c for c in candidates if c.is_file()), None)


def load_run(path: str | os.PathLike, *, map_location: str = "cpu") -> tuple["ToyTransformer", "Tokenizer | None", dict[str, Any]]:
    """(model, tokenizer or None, config document) of a run folder, a checkpoint folder or a model
    folder written by `save_pretrained`. The tokenizer is None when no tokenizer.json belongs to the
    folder (a model saved without one). A folder that is not a model is one clear CheckpointError."""
    from .checkpoint import read_document
    from .model import ToyTransformer

    document = read_document(path)  # a clear message for a missing or corrupt config.json
    model = ToyTransformer.from_pretrained(str(path), map_location=map_location)
    tokenizer = None
    tokenizer_path = run_tokenizer_path(path)
    if tokenizer_path is not None:
        from .data.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(tokenizer_path)
    return model, tokenizer, document


def load_run_dataset(path: str | os.PathLike, *, require_record: bool = False) -> tuple[Any, Any]:
    """(DataConfig, dataset) a run trained on, with the run's own tokenizer.json when it has one, so
    token ids match the model's. A folder whose config.json records no ``data`` section (a model
    written by `save_pretrained`) gets the default DataConfig, or, with ``require_record``, one clear
    CheckpointError (where guessing the corpus would mislead)."""
    from .checkpoint import CheckpointError, read_document
    from .data import build_dataset
    from .data.config import DataConfig

    document = read_document(path)
    if require_record and "data" not in document:
        raise CheckpointError(
            f"{path} records no dataset (its config.json has no data section: a model saved with save_pretrained, "
            f"not a training run folder), so its corpus is unknown. Use the run folder the model was trained in.")
    data = DataConfig.model_validate(document.get("data", {}))
    dataset = data.dataset.model_dump()
    tokenizer_path = run_tokenizer_path(path)
    if tokenizer_path is not None:
        dataset["tokenizer"] = str(tokenizer_path)
    data = DataConfig.model_validate({**data.model_dump(), "dataset": dataset})
    return data, build_dataset(data.dataset)


__all__ = ["TOKENIZER_NAME", "append_jsonl", "atomic_path", "current_umask", "fsync_dir", "load_run",
           "load_run_dataset", "read_jsonl", "run_tokenizer_path", "truncate_jsonl", "write_atomic"]
