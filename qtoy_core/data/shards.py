"""Prepared token shards: tokenize a dataset once, then train from memory-mapped files.

`prepare_shards` reads a dataset's documents once (the same source, the same hash split and the
same caps as `StreamingTextDataset`), tokenizes them in parallel processes and writes, per split,
the packed token stream `[bos] doc sep [bos] doc sep ...` (exactly the tokens the streaming path
builds, in source order) as flat binary files plus each document's start offset and key:

    DIR/manifest.json                 written last, atomically: a DIR without it is incomplete
    DIR/tokenizer.json                the tokenizer the ids belong to
    DIR/<split>/tokens-00000.bin      token ids, uint16 where the vocabulary fits (<= 65536), else uint32
    DIR/<split>/doc_starts.bin        int64 (documents,): offset of each document's first token
    DIR/<split>/doc_keys.bin          int64 (documents,): its key (ordinal in the source; ranks use it)
    DIR/progress.json                 only while preparing: what is committed, to resume from

Preparing commits every few seconds: files are fsynced, then progress.json (source position, file
lengths) is replaced atomically. Interrupted, the same command resumes from the last commit
(appended bytes past it are cut off); the manifest, written last, is what makes DIR trainable, so
a DIR holding partial data is refused by `PreparedShards` with the command that finishes it.

`ShardBatches` reads a split by memmap into `Batch`es of (batch, n_ctx + 1) windows: `random`
(train default: aligned windows in a fresh permutation every epoch, shifted by a per-epoch offset)
or `sequential` (packed order: the token stream as written). Windows overlap by one token like the
stream's packed rows. Ranks take disjoint windows. Its `state_dict()` is three integers plus the
identity, so resume is exact. The validation split is read in order, once per `iter()`, exactly as
`StreamingTextDataset` reads it (same rows, same padded last row).

Importing this module loads numpy only; torch loads when batches are made (prepare workers never
import it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ..run_files import write_atomic
from .cache import hash_files
from .dataset import SPLITS, TextDataset, check_split, split_of
from .errors import DataError, ResumeError

if TYPE_CHECKING:
    import torch

    from .stream import Batch
    from .tokenizer import Tokenizer

FORMAT = "qtoy-shards/1"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
TOKENIZER_FILE = "tokenizer.json"
SHARD_TOKENS = 1 << 31  # tokens per shard file (4 GiB at uint16): shards end at document boundaries
CHUNK_DOCS = 512  # documents per task sent to a worker
COMMIT_SECONDS = 5.0
STATE_VERSION = 1
ORDERS = ("random", "sequential")


class IncompleteShardsError(DataError):
    """A prepared-shards folder without its manifest: preparation was interrupted or is running."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# -- preparing ----------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: "Tokenizer", val_fraction: float, split_seed: int, dtype: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process = one core
    _WORKER.update(tokenizer=tokenizer, val_fraction=val_fraction, split_seed=split_seed, dtype=np.dtype(dtype))


def _encode_chunk(records: list[tuple[int, str]]) -> dict[str, Any]:
    """Split and tokenize one chunk of `(key, text)` records, in order (runs in a worker, or inline).

    Returns, per split, the documents' keys, their packed lengths and their tokens `[bos] ids sep`
    concatenated, plus the number of unknown tokens.
    """
    tok, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    vf, seed = _WORKER["val_fraction"], _WORKER["split_seed"]
    sep, bos, unk = tok.separator_id, tok.bos_id, tok.unk_id
    splits = [split_of(text, val_fraction=vf, seed=seed) for _, text in records]
    ids = tok.encode_batch([text for _, text in records])
    out: dict[str, Any] = {"unknown": 0}
    head = [bos] if bos is not None else []
    for split in SPLITS:
        chosen = [i for i, s in enumerate(splits) if s == split]
        seqs = [head + ids[i] + [sep] for i in chosen]
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=sum(map(len, seqs)))
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
            raise DataError(f"The tokenizer produced id {int(flat.max())}, which does not fit {dtype.name}.")
        out[split] = (np.array([records[i][0] for i in chosen], dtype=np.int64),
                      np.array([len(s) for s in seqs], dtype=np.int64), flat.astype(dtype))
        if unk is not None:
            out["unknown"] += int(sum(ids[i].count(unk) for i in chosen))
    return out


class _SplitWriter:
    """Appends one split's documents to its shard files; `commit()` state / `restore()` after a crash."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[int] = [0]  # tokens in each shard file
        self.documents = 0
        self.seen = 0  # documents of this split read from the source (counted against its cap)
        self._files: dict[str, Any] = {}

    @property
    def tokens(self) -> int:
        return sum(self.shards)

    def _path(self, shard: int) -> Path:
        return self.folder / f"tokens-{shard:05d}.bin"

    def _file(self, name: str, path: Path):
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(path, "ab")
        return f

    def restore(self, saved: dict | None) -> None:
        """Cut the files back to the committed state (bytes appended after the last commit go)."""
        if saved:
            self.shards, self.documents, self.seen = list(saved["shards"]), saved["documents"], saved["seen"]
        lengths = {self._path(i).name: n * self.dtype.itemsize for i, n in enumerate(self.shards)}
        lengths["doc_starts.bin"] = lengths["doc_keys.bin"] = self.documents * 8
        for path in self.folder.iterdir():
            if path.name not in lengths:
                path.unlink()
        for name, size in lengths.items():
            path = self.folder / name
            with open(path, "ab") as f:
                if f.tell() < size:
                    raise IncompleteShardsError(f"{path} is shorter than its committed length: the folder was "
                                                f"changed by something else. Remove {self.folder.parent} and "
                                                f"prepare again.")
                f.truncate(size)

    def append(self, keys: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> None:
        if not len(keys):
            return
        starts = self.tokens + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        # a new shard file when this chunk would overflow the current one (shards end at documents)
        if self.shards[-1] and self.shards[-1] + len(tokens) > self.shard_tokens:
            self._close_shard()
            self.shards.append(0)
        self._file("tokens", self._path(len(self.shards) - 1)).write(tokens.tobytes())
        self.shards[-1] += len(tokens)
        self._file("starts", self.folder / "doc_starts.bin").write(starts.astype(np.int64).tobytes())
        self._file("keys", self.folder / "doc_keys.bin").write(keys.tobytes())
        self.documents += len(keys)

    def _close_shard(self) -> None:
        f = self._files.pop("tokens", None)
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def sync(self) -> None:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self.sync()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def state(self) -> dict:
        return {"shards": list(self.shards), "documents": self.documents, "seen": self.seen}


def _source_identity(dataset: TextDataset) -> dict:
    """What the documents are: the source's description, and the content hash of local files."""
    source = dataset.source()
    described = source.describe()
    local = getattr(source, "local", None)
    files = list(local.files) if local is not None else None
    return {"source": described, "files_hash": hash_files(files) if files else None,
            "files": len(files) if files else None}


def prepare_shards(dataset: TextDataset, out: str | os.PathLike, *, num_proc: int = 1,
                   max_documents: int | None = None, shard_tokens: int = SHARD_TOKENS,
                   chunk_docs: int = CHUNK_DOCS, progress: Callable[[dict], None] | None = None,
                   stop_after_chunks: int | None = None) -> dict:
    """Tokenize `dataset` into `out` (see the module docstring); returns the manifest.

    `max_documents` reads only the source's first N records (needed for an endless source such as
    the default synthetic generator). Run again on an interrupted `out`, it resumes; on a complete
    one made from the same request it returns the manifest as it is. `num_proc` processes tokenize
    (the result is the same for any number). `stop_after_chunks` stops (uncommitted) after that many
    chunks, as an interruption would (for tests).
    """
    out = Path(out)
    if num_proc < 1:
        raise DataError(f"--num-proc must be at least 1, not {num_proc}.")
    source = dataset.source()
    if not source.finite and max_documents is None:
        raise DataError(f"Dataset {dataset.name!r} is an endless stream: say how many documents to prepare with "
                        f"--max-documents N (or make it finite, e.g. --set n_stories=N for synthetic).")
    tokenizer = dataset.tokenizer()
    dtype = token_dtype(tokenizer.vocab_size)
    identity = {"format": FORMAT, "dataset": dataset.config.model_dump(mode="json"),
                **_source_identity(dataset), "tokenizer": tokenizer.fingerprint(),
                "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
                "split": {"rule": "blake2b(text, key=split_seed) / 2**64 < val_fraction -> validation",
                          "val_fraction": dataset.val_fraction, "split_seed": dataset.split_seed},
                "caps": {s: dataset.max_documents(s) for s in SPLITS}, "max_documents": max_documents,
                "shard_tokens": int(shard_tokens)}

    manifest_path, progress_path = out / MANIFEST, out / PROGRESS
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("identity") == identity:
            return manifest
        raise DataError(f"{out} already holds prepared shards of a different request ({_difference(manifest.get('identity', {}), identity)}). "
                        f"Choose another --out, or remove {out} first.")
    saved = None
    if progress_path.is_file():
        saved = json.loads(progress_path.read_text(encoding="utf-8"))
        if saved.get("identity") != identity:
            raise DataError(f"{out} holds an interrupted preparation of a different request "
                            f"({_difference(saved.get('identity', {}), identity)}). Run that command again to "
                            f"finish it, or remove {out} to start this one.")
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a prepared-shards folder (no {MANIFEST} or {PROGRESS}): choose "
                        f"an empty or new --out.")
    out.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(out / s, dtype, shard_tokens) for s in SPLITS}
    for s, w in writers.items():
        w.restore(saved["splits"][s] if saved else None)
    position = saved["source_pos"] if saved else 0
    unknown = saved["unknown"] if saved else 0
    if saved is None:  # start the record at once, so an interrupted first pass is known as such
        write_atomic(progress_path, _progress_json(identity, 0, writers, 0))
    tokenizer.save(out / TOKENIZER_FILE)
    caps = identity["caps"]

    def records() -> Iterator[list[tuple[int, str]]]:
        """Chunks of (key, text) from the committed position (a chunk never spans a cap)."""
        it = source.open(start=position)
        try:
            chunk = []
            for key, text in it:
                chunk.append((key, text))
                if len(chunk) == chunk_docs or (max_documents is not None and key + 1 >= max_documents):
                    yield chunk
                    chunk = []
                if max_documents is not None and key + 1 >= max_documents:
                    break
            if chunk:
                yield chunk
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    start_time, start_tokens = time.perf_counter(), sum(w.tokens for w in writers.values())
    last_commit = time.perf_counter()
    init_args = (tokenizer, dataset.val_fraction, dataset.split_seed, dtype.name)
    pool = None
    if num_proc > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=init_args)
        results = _bounded_imap(pool, _encode_chunk, records(), 2 * num_proc)
    else:
        _init_worker(*init_args)
        results = ((chunk, _encode_chunk(chunk)) for chunk in records())
    done = 0
    try:
        for chunk, result in results:
            for split in SPLITS:
                keys, lengths, tokens = result[split]
                w, cap = writers[split], caps[split]
                if cap is not None:
                    room = max(0, cap - w.seen)
                    if len(keys) > room:  # the split's cap: its first `cap` documents (as the stream reads)
                        keys, lengths = keys[:room], lengths[:room]
                        tokens = tokens[: int(lengths.sum())]
                w.seen += len(keys)
                w.append(keys, lengths, tokens)
            unknown += result["unknown"]
            position = chunk[-1][0] + 1
            done += 1
            if stop_after_chunks is not None and done >= stop_after_chunks:
                for w in writers.values():
                    w.close()
                raise KeyboardInterrupt  # as if interrupted here: no commit of the last chunks
            now = time.perf_counter()
            if now - last_commit >= COMMIT_SECONDS:
                _commit(progress_path, identity, position, writers, unknown)
                last_commit = now
                if progress is not None:
                    progress({"source_pos": position, "tokens": sum(w.tokens for w in writers.values()),
                              "seconds": now - start_time})
            if all(c is not None and writers[s].seen >= c for s, c in caps.items()):
                break  # every split capped and full: the rest of the source adds nothing
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for w in writers.values():
        w.close()
    _commit(progress_path, identity, position, writers, unknown)
    empty = [s for s in SPLITS if writers[s].documents == 0 and not (s == "validation" and dataset.val_fraction <= 0)]
    if "train" in empty:
        raise DataError(f"Dataset {dataset.name!r}: no document hashed into the train split "
                        f"({position} records read); nothing to train on.")
    elapsed = time.perf_counter() - start_time
    made = sum(w.tokens for w in writers.values()) - start_tokens
    manifest = {"format": FORMAT, "identity": identity, "dataset": dataset.name, "vocab_size": tokenizer.vocab_size,
                "tokenizer": tokenizer.describe(), "dtype": dtype.name, "source_records": position,
                "unknown_tokens": unknown,
                "splits": {s: {"documents": w.documents, "tokens": w.tokens, "shards": w.shards} for s, w in writers.items()},
                "prepared": {"num_proc": num_proc, "seconds": round(elapsed, 3),
                             "tokens_per_s": round(made / elapsed) if elapsed > 0 else None,
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    write_atomic(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))
    progress_path.unlink(missing_ok=True)
    return manifest


def _progress_json(identity: dict, position: int, writers: dict, unknown: int) -> bytes:
    return json.dumps({"identity": identity, "source_pos": position, "unknown": unknown,
                       "splits": {s: w.state() for s, w in writers.items()}}).encode("utf-8")


def _commit(path: Path, identity: dict, position: int, writers: dict, unknown: int) -> None:
    for w in writers.values():
        w.sync()
    write_atomic(path, _progress_json(identity, position, writers, unknown))


def _bounded_imap(pool, fn, items, in_flight: int):
    """(item, fn(item)) in order, with at most `in_flight` tasks queued (Pool.imap reads its input to the end)."""
    queue: deque = deque()
    for item in items:
        queue.append((item, pool.apply_async(fn, (item,))))
        if len(queue) >= in_flight:
            item0, res = queue.popleft()
            yield item0, res.get()
    while queue:
        item0, res = queue.popleft()
        yield item0, res.get()


def _difference(saved: dict, now: dict) -> str:
    diffs = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    return "differs in " + ", ".join(diffs) if diffs else "same"


# -- reading ----------------------------------------------------------------------------------------
class _Tokens:
    """A split's token stream over its shard files (memmaps), read as one array."""

    def __init__(self, files: list[Path], counts: list[int], dtype: np.dtype):
        self.maps = [np.memmap(f, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype) for f, n in zip(files, counts)]
        self.bounds = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.size = int(self.bounds[-1])
        self.single = self.maps[0] if len(self.maps) == 1 else None

    def slice(self, start: int, stop: int) -> np.ndarray:
        if self.single is not None:
            return self.single[start:stop]
        i = int(np.searchsorted(self.bounds, start, side="right")) - 1
        parts = []
        while start < stop:
            lo, hi = int(self.bounds[i]), int(self.bounds[i + 1])
            take = min(stop, hi)
            parts.append(self.maps[i][start - lo: take - lo])
            start, i = take, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def windows(self, starts: np.ndarray, width: int) -> np.ndarray:
        """(len(starts), width) tokens: row i is tokens[starts[i] : starts[i] + width]."""
        if self.single is not None:
            return self.single[starts[:, None] + np.arange(width)]
        return np.stack([self.slice(int(s), int(s) + width) for s in starts])

    def aligned_into(self, out: np.ndarray, offset: int, idx: np.ndarray, n: int) -> None:
        """out[i] = tokens[offset + idx[i] * n : ... + n + 1], converted to out's dtype.

        With one shard, the stream from `offset` is viewed as rows of n tokens: a window is row k
        plus the first token of row k + 1, so a batch is one row gather (a memcpy per row) and one
        small gather, with no per-row Python work and no (batch, n + 1) index array.
        """
        if self.single is not None:
            flat = np.asarray(self.single)
            rows = (self.size - offset) // n
            view = flat[offset:offset + rows * n].reshape(rows, n)
            out[:, :n] = view[idx]
            out[:, n] = flat[offset + (idx + 1) * n]
            return
        for j, k in enumerate(idx.tolist()):
            s = offset + k * n
            out[j] = self.slice(s, s + n + 1)


class PreparedShards:
    """A complete prepared-shards folder (refuses an incomplete one, naming the command that finishes it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            if (self.path / PROGRESS).is_file():
                prog = json.loads((self.path / PROGRESS).read_text(encoding="utf-8"))
                raise IncompleteShardsError(
                    f"{self.path} is incomplete: `qtoy data prepare` stopped (or is still running) after "
                    f"{prog.get('source_pos', 0):,} source records, and training on it would use partial data. "
                    f"Run the same `qtoy data prepare ... --out {self.path}` command again to finish it.")
            what = "does not exist" if not self.path.exists() else f"has no {MANIFEST}"
            raise IncompleteShardsError(f"{self.path} {what}: it is not a prepared-shards folder. Make one with "
                                        f"`qtoy data prepare --dataset NAME --out {self.path}`.")
        self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{manifest} is not a qtoy shards manifest (format {self.manifest.get('format')!r}, "
                            f"expected {FORMAT!r}).")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.fingerprint = self.manifest["identity"]["tokenizer"]
        self._splits: dict[str, dict] = {}
        self._tokenizer = None
        for split in SPLITS:
            self._check_files(split)

    @property
    def dataset_config(self) -> dict:
        return self.manifest["identity"]["dataset"]

    def describe(self) -> dict:
        return {"path": str(self.path), "dataset": self.manifest["dataset"], "tokenizer": self.fingerprint,
                "vocab_size": self.vocab_size, "dtype": self.dtype.name,
                "splits": {s: {k: v for k, v in info.items() if k != "shards"} for s, info in self.manifest["splits"].items()}}

    def _check_files(self, split: str) -> None:
        info = self.manifest["splits"][split]
        folder = self.path / split
        expected = {f"tokens-{i:05d}.bin": n * self.dtype.itemsize for i, n in enumerate(info["shards"])}
        expected["doc_starts.bin"] = expected["doc_keys.bin"] = info["documents"] * 8
        for name, size in expected.items():
            path = folder / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                raise DataError(f"{path} is {'missing' if actual is None else f'{actual:,} bytes'} but the manifest "
                                f"says {size:,} bytes: the folder is damaged. Prepare it again (remove {self.path} "
                                f"and run `qtoy data prepare` with the same options).")

    def tokenizer(self) -> "Tokenizer":
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            tok = Tokenizer.from_file(self.path / TOKENIZER_FILE)
            if tok.fingerprint() != self.fingerprint:
                raise DataError(f"{self.path / TOKENIZER_FILE} is not the tokenizer the shards were made with "
                                f"(fingerprint {tok.fingerprint()}, manifest {self.fingerprint}). Prepare again.")
            self._tokenizer = tok
        return self._tokenizer

    def split(self, split: str) -> dict:
        """{"tokens": _Tokens, "doc_starts": int64 memmap, "doc_keys": int64 memmap, "documents", "size"}."""
        check_split(split)
        if split not in self._splits:
            info = self.manifest["splits"][split]
            folder = self.path / split
            files = [folder / f"tokens-{i:05d}.bin" for i in range(len(info["shards"]))]
            d = info["documents"]

            def ints(name):
                return np.memmap(folder / name, dtype=np.int64, mode="r", shape=(d,)) if d else np.zeros(0, np.int64)

            self._splits[split] = {"tokens": _Tokens(files, info["shards"], self.dtype), "doc_starts": ints("doc_starts.bin"),
                                   "doc_keys": ints("doc_keys.bin"), "documents": d, "size": info["tokens"]}
        return self._splits[split]


def _mix(*values: int) -> int:
    """A 63-bit number from integers (blake2b, as the stream's shuffle draws; not Python's hash)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(values)}q", *values), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ShardBatches:
    """Batches of windows from one split of a `PreparedShards` folder (see the module docstring).

    Train split: endless; `order="random"` visits the aligned windows `offset_e + k * n_ctx` (k < R)
    of epoch e in a permutation drawn from (seed, epoch), offset_e in [0, n_ctx) also drawn from
    them; `sequential` visits them in order with offset 0. Each epoch is cut into world_size equal
    parts (the R mod world_size windows left over are skipped that epoch), rank r takes the r-th
    (disjoint windows), and a batch runs on into the next epoch rather than ending short.
    Validation split: windows `k * n_ctx` in order, rank r taking k = r mod world_size; finite; the
    last window may be short (padded, with an attention mask), as in `StreamingTextDataset`.

    `pin_memory=True` puts batches in page-locked memory where CUDA is present (for non_blocking copies).
    """

    def __init__(self, shards: PreparedShards | str | os.PathLike, *, split: str, n_ctx: int, batch_size: int,
                 order: str = "random", seed: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False, track_documents: bool = False):
        check_split(split)
        if order not in ORDERS:
            raise DataError(f"shard order must be one of {', '.join(ORDERS)}, not {order!r}.")
        for name, value in (("n_ctx", n_ctx), ("batch_size", batch_size), ("world_size", world_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), not {rank}")
        self.shards = shards if isinstance(shards, PreparedShards) else PreparedShards(shards)
        self.split, self.n_ctx, self.batch_size = split, int(n_ctx), int(batch_size)
        self.order, self.seed, self.rank, self.world_size = order, int(seed), int(rank), int(world_size)
        self.track_documents = bool(track_documents)
        self.data = self.shards.split(split)
        self.tokens: _Tokens = self.data["tokens"]
        n, size = self.n_ctx, self.data["size"]
        if split == "train" and (size - 1) // n < world_size:
            raise DataError(f"The train split of {self.shards.path} holds {size:,} tokens: fewer than "
                            f"{world_size} window(s) of n_ctx + 1 = {n + 1}. Prepare more data or use a smaller n_ctx.")
        if split == "validation" and size < 2:
            from .errors import EmptySplitError

            raise EmptySplitError(f"The validation split of {self.shards.path} is empty: prepare with a larger "
                                  f"val_fraction (--set val_fraction=0.05) or more documents.")
        self._pad = self.shards.tokenizer().padding_id
        self._pin = bool(pin_memory)
        self.epoch, self.pos, self.batches, self.targets = 0, 0, 0, 0
        self._epoch_rows: tuple | None = None  # (epoch, rows, per_rank, offset, first) of the current epoch

    @property
    def is_train(self) -> bool:
        return self.split == "train"

    # -- state -------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        m = self.shards.manifest
        return {"version": STATE_VERSION, "kind": "shards", "dataset": m["dataset"], "split": self.split,
                "order": self.order, "n_ctx": self.n_ctx, "batch_size": self.batch_size, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "tokenizer": self.shards.fingerprint,
                "tokens": self.data["size"], "track_documents": self.track_documents}

    def state_dict(self) -> dict:
        """The position after the batches yielded so far: epoch and window index (plain ints)."""
        return {**self._identity(), "epoch": self.epoch, "pos": self.pos, "batches": self.batches,
                "targets": self.targets}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise ResumeError("Cannot resume reading the prepared shards from the saved state; it belongs to "
                              "other data or another batch layout (" + "; ".join(diffs) + ").")
        self.epoch, self.pos, self.batches, self.targets = (int(state[k]) for k in ("epoch", "pos", "batches", "targets"))

    def stats(self) -> dict[str, int]:
        return {"epoch": self.epoch, "documents": self.data["documents"], "batches": self.batches,
                "target_tokens": self.targets, "unknown_tokens": 0}

    # -- windows ------------------------------------------------------------------------------------
    def _rows(self) -> tuple[np.ndarray | None, int, int, int]:
        """This rank's windows of the current epoch: (window indices, or None for `first + i` in order;
        how many; the epoch's offset; first)."""
        cached = self._epoch_rows
        if cached is not None and cached[0] == self.epoch:
            return cached[1:]
        n, size, epoch = self.n_ctx, self.data["size"], self.epoch
        rows, offset = None, 0
        if self.order == "random":
            offset = _mix(self.seed, epoch, 1) % n
            if (size - 1 - offset) // n < self.world_size:
                offset = 0
        total = (size - 1 - offset) // n
        per_rank = total // self.world_size
        first = self.rank * per_rank
        if self.order == "random":
            perm = np.random.Generator(np.random.Philox(key=_mix(self.seed, epoch, 2))).permutation(total)
            rows = perm[first:first + per_rank].astype(np.int64)
            first = 0
        self._epoch_rows = (epoch, rows, per_rank, offset, first)
        return rows, per_rank, offset, first

    def _segments(self, count: int) -> list[tuple[int, np.ndarray]]:
        """The next `count` windows as (epoch offset, window indices) runs (two where an epoch ends)."""
        out = []
        while count:
            rows, per_rank, offset, first = self._rows()
            take = min(count, per_rank - self.pos)
            if rows is None:
                idx = np.arange(first + self.pos, first + self.pos + take, dtype=np.int64)
            else:
                idx = rows[self.pos:self.pos + take]
            out.append((offset, idx))
            self.pos += take
            count -= take
            if self.pos >= per_rank:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def _to_batch(self, rows: np.ndarray, starts: np.ndarray, mask: np.ndarray | None = None) -> "Batch":
        tokens = self._empty(rows.shape)
        tokens.numpy()[:] = rows
        return self._batch(tokens, starts, mask)

    def _empty(self, shape: tuple[int, ...]) -> "torch.Tensor":
        import torch

        return torch.empty(shape, dtype=torch.long, pin_memory=self._pin and torch.cuda.is_available())

    def _batch(self, tokens: "torch.Tensor", starts: np.ndarray, mask: np.ndarray | None) -> "Batch":
        import torch

        from .stream import Batch

        doc_ids = doc_pos = None
        if self.track_documents:
            doc_ids, doc_pos = self._documents(starts, tokens.shape[1], mask)
        return Batch(tokens, None if mask is None else torch.from_numpy(mask), doc_ids, doc_pos)

    def _documents(self, starts: np.ndarray, width: int, mask: np.ndarray | None):
        """Each token's document key and its index in the document's ids (as the stream's track_documents)."""
        import torch

        positions = starts[:, None] + np.arange(width)
        d_starts = np.asarray(self.data["doc_starts"])
        doc = np.searchsorted(d_starts, positions, side="right") - 1
        keys = np.asarray(self.data["doc_keys"])[doc]
        bos = 1 if self.shards.tokenizer().bos_id is not None else 0
        pos = positions - d_starts[doc] - bos
        if mask is not None:
            keys = np.where(mask.astype(bool), keys, -1)
            pos = np.where(mask.astype(bool), pos, -1)
        return torch.from_numpy(keys.astype(np.int64)), torch.from_numpy(pos.astype(np.int64))

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator["Batch"]:
        return self._train() if self.is_train else self._validation()

    def _train(self) -> Iterator["Batch"]:
        n, B = self.n_ctx, self.batch_size
        while True:
            tokens = self._empty((B, n + 1))  # filled in place: pinned already where it should be
            out = tokens.numpy()
            j, starts = 0, []
            for offset, idx in self._segments(B):
                self.tokens.aligned_into(out[j:j + len(idx)], offset, idx, n)
                j += len(idx)
                if self.track_documents:
                    starts.append(offset + idx * n)
            batch = self._batch(tokens, np.concatenate(starts) if starts else None, None)
            self.batches += 1
            self.targets += B * n
            yield batch

    def _validation(self) -> Iterator["Batch"]:
        self.batches = self.targets = 0
        n, width, size = self.n_ctx, self.n_ctx + 1, self.data["size"]
        count = (size - 2) // n + 1  # windows k * n with at least two tokens
        mine = np.arange(self.rank, count, self.world_size, dtype=np.int64)
        for i in range(0, len(mine), self.batch_size):
            starts = mine[i:i + self.batch_size] * n
            full = starts + width <= size
            if full.all():
                rows, mask = self.tokens.windows(starts, width), None
            else:
                rows = np.full((len(starts), width), self._pad, dtype=self.shards.dtype)
                mask = np.zeros((len(starts), width), dtype=np.int64)
                for j, s in enumerate(starts):
                    part = self.tokens.slice(int(s), min(int(s) + width, size))
                    rows[j, :len(part)] = part
                    mask[j, :len(part)] = 1
            batch = self._to_batch(rows, starts, mask)
            self.batches += 1
            self.targets += batch.n_targets
            yield batch


def check_shards_match(shards: PreparedShards, data: Any) -> None:
    """Refuse a run whose data section contradicts the shards: padded mode, another dataset, or a
    tokenizer other than the one the shards were tokenized with (the vocabulary is checked against
    the model by `check_vocab`, as for the stream)."""
    if getattr(data, "mode", "packed") != "packed":
        raise DataError(f"Prepared shards ({shards.path}) hold the packed token stream; data.mode "
                        f"{data.mode!r} needs the streaming path. Drop data.mode, or train without --data.")
    if "dataset" not in getattr(data, "model_fields_set", ()):
        return
    name = data.dataset.name
    if name != shards.manifest["dataset"]:
        raise DataError(f"The run names dataset {name!r} but {shards.path} was prepared from "
                        f"{shards.manifest['dataset']!r}. Drop --dataset (the shards say what they are), or "
                        f"prepare {name!r} with `qtoy data prepare --dataset {name} --out DIR`.")
    path = getattr(data.dataset, "tokenizer", None)
    if path:
        from .tokenizer import Tokenizer

        given = Tokenizer.from_file(path)
        if given.fingerprint() != shards.fingerprint:
            raise DataError(f"The tokenizer {path} (fingerprint {given.fingerprint()}, {given.vocab_size} tokens) is "
                            f"not the one {shards.path} was tokenized with (fingerprint {shards.fingerprint}, "
                            f"{shards.vocab_size} tokens). Drop --tokenizer (the shards bring theirs), or prepare "
                            f"the data again with this tokenizer.")
