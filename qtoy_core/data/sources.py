"""Where documents come from: a hub dataset or local files, both through `datasets` streaming.

`resolve_data_files` turns `data_files` (paths, globs, or a hub-like folder such as one made by
`hf download <id> --repo-type dataset --local-dir DIR`) into one file format and a list of files;
`HFSource` streams documents from the hub or from those files with the same code:
`load_dataset(hub_id, streaming=True)` vs `load_dataset("json"|"parquet"|"text"|"csv", data_files=...,
streaming=True)`. A source yields `(key, text)` records in a fixed order (key = the record's ordinal),
and can reopen at a position (through the `datasets` state dict when it has one, else by skipping).
Unreadable input (missing, empty, non-UTF-8, wrong column) becomes a `DataFileError` naming the file.
"""

from __future__ import annotations

import codecs
import glob
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import DataError, DataFileError, HubUnreachableError
from .hub import is_connection_error, load_hub_stream

END_OF_TEXT_LINE = "<|endoftext|>"
BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".txt": "text",
            ".text": "text", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
GLOB_CHARS = set("*?[")
# Text from a document longer than this without a separator is emitted in pieces (bounded memory).
MAX_GROUP_CHARS = 4_000_000


def builder_of(path: str) -> str | None:
    name = path.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return BUILDERS.get(os.path.splitext(name)[1])


@dataclass
class LocalFiles:
    """Files of one format; `split` is the split picked from a hub-like folder (else None)."""

    builder: str
    files: list[str]
    split: str | None = None
    text_split: str = "paragraph"
    skipped_empty: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        shown = self.files if len(self.files) <= 20 else self.files[:20] + [f"... ({len(self.files)} files)"]
        return {"format": self.builder, "files": shown, "split": self.split}


def resolve_data_files(entries: list[str], *, dataset: str, text_split: str = "auto") -> LocalFiles:
    """Expand paths, globs and folders into files of one format (see the module docstring)."""
    files: list[str] = []
    split: str | None = None
    for entry in entries:
        path = os.path.expanduser(entry)
        if any(c in path for c in GLOB_CHARS):
            matched = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matched:
                raise DataFileError(f"Dataset {dataset!r}: no file matches {entry!r}.")
            files += matched
        elif os.path.isdir(path):
            found, picked = _folder_files(path, dataset)
            files += found
            split = split or picked
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataFileError(f"Dataset {dataset!r}: data file {entry!r} does not exist.")
    files = list(dict.fromkeys(os.path.abspath(f) for f in files))
    kinds = {f: builder_of(f) for f in files}
    unknown = [f for f, b in kinds.items() if b is None]
    if unknown:
        raise DataFileError(f"Dataset {dataset!r}: cannot tell the format of {unknown[0]!r}; data files must be "
                            f".jsonl/.json, .parquet, .txt or .csv (optionally compressed).")
    builders = set(kinds.values())
    if len(builders) > 1:
        raise DataFileError(f"Dataset {dataset!r}: the data files mix formats ({', '.join(sorted(builders))}); "
                            f"pass files of one format.")
    if not files:
        raise DataFileError(f"Dataset {dataset!r}: no data files given.")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if len(empty) == len(files):
        raise DataFileError(f"Dataset {dataset!r}: the data file{'s are' if len(files) > 1 else ' is'} empty: "
                            f"{', '.join(files[:5])}.")
    if empty:
        warnings.warn(f"Dataset {dataset!r}: skipping {len(empty)} empty data file(s): {', '.join(empty[:5])}",
                      stacklevel=2)
    files = [f for f in files if f not in empty]
    builder = builders.pop()
    local = LocalFiles(builder, files, split, skipped_empty=empty)
    if builder == "text":
        local.text_split = _pick_text_split(files[0], text_split)
    return local


def _folder_files(folder: str, dataset: str) -> tuple[list[str], str | None]:
    """The files of a folder; in a hub-like folder (data/train-*.parquet ...) those of its train split."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(folder)
    except Exception:  # EmptyDatasetError: no data files in the folder
        raise DataFileError(f"Dataset {dataset!r}: the folder {folder!r} holds no data files.") from None
    resolved = DataFilesDict.from_patterns(patterns, base_path=folder)
    splits = {str(k): [str(f) for f in v] for k, v in resolved.items()}
    split = "train" if "train" in splits else (next(iter(splits)) if len(splits) == 1 else None)
    if split is None:
        raise DataFileError(f"Dataset {dataset!r}: the folder {folder!r} has splits {', '.join(splits)} but no "
                            f"'train' split; pass the files of the split you want.")
    chosen = [f for f in splits[split] if builder_of(f) is not None]
    if not chosen:
        raise DataFileError(f"Dataset {dataset!r}: the folder {folder!r} holds no .jsonl/.json/.parquet/.txt/"
                            f".csv files.")
    hub_like = any(p != ["**"] for p in patterns.values())
    return sorted(chosen), (split if hub_like else None)


def _pick_text_split(first_file: str, text_split: str) -> str:
    if text_split != "auto":
        return text_split
    if first_file.lower().endswith(COMPRESSIONS):
        return "paragraph"
    with open(first_file, "rb") as f:
        head = f.read(1 << 20).decode("utf-8", errors="replace")
    return "endoftext" if any(line.strip() == END_OF_TEXT_LINE for line in head.splitlines()) else "paragraph"


# -- datasets' log noise: qtoy reports these failures itself ------------------------------------------
class _QuietReads(logging.Filter):
    active = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and record.levelno >= logging.ERROR and str(record.msg).startswith("Failed to"))


_QUIET = _QuietReads()
for _name in ("datasets.packaged_modules.json.json", "datasets.packaged_modules.parquet.parquet",
              "datasets.packaged_modules.csv.csv", "datasets.packaged_modules.text.text"):
    logging.getLogger(_name).addFilter(_QUIET)


class HFSource:
    """Documents of a hub dataset, or of local files in its format, streamed with `datasets`."""

    finite = True

    def __init__(self, *, dataset: str, column: str, hint: str, hub_id: str | None = None,
                 hub_config: str | None = None, local: LocalFiles | None = None):
        if (hub_id is None) == (local is None):
            raise ValueError("HFSource needs exactly one of hub_id and local")
        self.dataset, self.column, self.hint = dataset, column, hint
        self.hub_id, self.hub_config, self.local = hub_id, hub_config, local

    def describe(self) -> dict[str, Any]:
        if self.local is not None:
            return {"source": "files", **self.local.describe(), "column": self.column,
                    **({"text_split": self.local.text_split} if self.local.builder == "text" else {})}
        return {"source": "hub", "hub_id": self.hub_id, "hub_config": self.hub_config, "column": self.column}

    def _load(self):
        if self.local is None:
            return load_hub_stream(self.hub_id, self.hub_config, dataset=self.dataset, hint=self.hint)
        import datasets

        kwargs: dict[str, Any] = {}
        if self.local.builder == "text":
            kwargs["sample_by"] = {"endoftext": "line", "line": "line", "paragraph": "paragraph",
                                   "file": "document"}[self.local.text_split]
        try:
            _QUIET.active += 1
            return datasets.load_dataset(self.local.builder, data_files={"train": self.local.files}, split="train",
                                         streaming=True, **kwargs)
        except StopIteration:
            raise DataFileError(f"Dataset {self.dataset!r}: no records in {self._files_text()} (empty files?).") from None
        except Exception as exc:
            raise self._translate(exc) from None
        finally:
            _QUIET.active -= 1

    def open(self, *, start: int = 0, state: dict | None = None) -> "SourceIterator":
        return SourceIterator(self, start, state)

    # -- records ---------------------------------------------------------------------------------
    def _texts(self, rows: Iterator[dict]) -> Iterator[str]:
        column = self.column
        if self.local is not None and self.local.builder == "text":
            column = "text"
        first = True
        grouping = self.local is not None and self.local.builder == "text" and self.local.text_split == "endoftext"
        lines: list[str] = []
        size = 0
        for row in rows:
            if first:
                first = False
                if column not in row:
                    where = self._files_text() if self.local is not None else self.hub_id
                    raise DataFileError(
                        f"Dataset {self.dataset!r}: there is no column {column!r} in {where}; its columns are "
                        f"{', '.join(map(repr, row))}. Name the text column with the dataset's `column` option "
                        f"(e.g. `--set column=<name>`).")
            text = row[column]
            if not isinstance(text, str):
                continue
            if grouping:
                if text.strip() == END_OF_TEXT_LINE:
                    doc = "\n".join(lines).strip()
                    lines, size = [], 0
                    if doc:
                        yield doc
                    continue
                lines.append(text)
                size += len(text) + 1
                if size > MAX_GROUP_CHARS:
                    yield "\n".join(lines).strip()
                    lines, size = [], 0
                continue
            if text.strip():
                yield text.strip("\n") if self.local is not None and self.local.builder == "text" else text
        if grouping:
            doc = "\n".join(lines).strip()
            if doc:
                yield doc

    def _files_text(self) -> str:
        files = self.local.files if self.local is not None else []
        return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")

    def _translate(self, exc: BaseException) -> BaseException:
        """A clear qtoy error for a failure while loading or reading the stream."""
        if isinstance(exc, DataError):
            return exc
        if self.local is None and is_connection_error(exc):
            return HubUnreachableError(f"Dataset {self.dataset!r}: the connection to the Hugging Face hub failed "
                                       f"while streaming {self.hub_id} ({type(exc).__name__}: {exc}). {self.hint}")
        if isinstance(exc, UnicodeDecodeError) and self.local is not None:
            bad = find_non_utf8(self.local.files)
            if bad is not None:
                path, offset, byte = bad
                return DataFileError(f"Dataset {self.dataset!r}: the data file {path!r} is not UTF-8 text (byte "
                                     f"0x{byte:02x} at offset {offset}). Convert it to UTF-8, e.g. `iconv -f latin1 "
                                     f"-t utf-8 in.txt > out.txt`.")
            return DataFileError(f"Dataset {self.dataset!r}: the data files are not UTF-8 text ({exc}).")
        if isinstance(exc, (ValueError, OSError, TypeError, KeyError)) or "Arrow" in type(exc).__name__:
            where = self._files_text() if self.local is not None else f"the hub dataset {self.hub_id}"
            fmt = f" as {self.local.builder}" if self.local is not None else ""
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return DataFileError(f"Dataset {self.dataset!r}: could not read {where}{fmt}: {message}")
        return exc


class SourceIterator:
    """Iterates `(key, text)` from position `start` of a source; `state()` lets a later one resume.

    Resuming uses the `datasets` stream state saved by `state()` when it comes from the same
    `datasets` version (no re-reading), and otherwise re-reads and skips `start` records.
    """

    def __init__(self, source: HFSource, start: int, state: dict | None):
        self.source = source
        self.start = start
        self.pos = 0
        self.resumed = False
        self.ds = source._load()
        saved = state.get("state") if isinstance(state, dict) and state.get("datasets") == _datasets_version() else None
        if saved is not None and start > 0:
            try:
                self.ds.load_state_dict(saved)
                self.resumed = True
            except Exception:  # an incompatible state: fall back to skipping
                self.resumed = False
        self._open()

    def _open(self) -> None:
        self._rows = iter(self.ds)
        self._gen = self.source._texts(self._rows)
        if self.resumed:
            self.pos = self.start
            return
        while self.pos < self.start:
            if self._next_text() is None:
                break

    def _next_text(self) -> str | None:
        try:
            _QUIET.active += 1
            text = next(self._gen)
        except StopIteration:
            return None
        except Exception as exc:
            if self.resumed and self.pos == self.start and not isinstance(exc, DataError):
                # the saved `datasets` state did not work after all: start over and skip instead
                self.close()
                self.resumed, self.pos = False, 0
                self.ds = self.source._load()
                self._open()
                return self._next_text()
            raise self.source._translate(exc) from None
        finally:
            _QUIET.active -= 1
        self.pos += 1
        return text

    def __iter__(self) -> "SourceIterator":
        return self

    def __next__(self) -> tuple[int, str]:
        text = self._next_text()
        if text is None:
            raise StopIteration
        return self.pos - 1, text

    def state(self) -> dict | None:
        try:
            return {"datasets": _datasets_version(), "state": self.ds.state_dict()}
        except Exception:
            return None

    def close(self) -> None:
        for it in (self._gen, self._rows):
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass


def _datasets_version() -> str:
    import datasets

    return datasets.__version__


def find_non_utf8(files: list[str]) -> tuple[str, int, int] | None:
    """(file, byte offset, byte) of the first invalid UTF-8 byte among plain (uncompressed) files."""
    for path in files:
        if path.lower().endswith(COMPRESSIONS) or builder_of(path) == "parquet":
            continue
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    return path, offset + exc.start, block[exc.start]
                offset += len(block)
    return None
