"""`StreamingTextDataset`: documents -> shuffled, tokenized, batched windows, resumable exactly.

The pipeline, per split and rank:

1. source records `(key, text)` in order -> keep those whose text hashes into `split` and whose key
   is congruent to `rank` mod `world_size`;
2. train split only: a shuffle buffer of `shuffle_buffer` documents; each draw picks slot
   blake2b(seed, epoch, rank, draw) mod size, so the "RNG state" is one counter; at the end of the
   source the buffer drains in the same way, the epoch counter moves on and the source restarts
   (finite datasets loop forever, reshuffled per epoch; an endless generator stays in epoch 0);
3. `tokenize_batch` documents at a time through `Tokenizer.encode_batch`;
4. batches:
   packed (default): `[bos] doc eos [bos] doc eos ...` in one token stream, cut into rows of
     n_ctx + 1 tokens; consecutive rows overlap by one token, so every token but the very first is
     predicted exactly once. attention_mask is None.
   padded: one document per row, `[bos] doc eos`, right-padded to n_ctx + 1 with the padding id,
     attention_mask 1 on real tokens; a longer document continues on further rows (again
     overlapping by one token, no token lost).
   The trainer feeds tokens[:, :-1], predicts tokens[:, 1:], with loss mask attention_mask[:, 1:].

The validation split is read in source order (no shuffle), once: it is finite, and every `iter()`
starts it afresh, so "the first N batches" are the same documents at every evaluation. Its last
batch may have fewer rows, and a last partial row comes padded with an attention mask.

`state_dict()` (plain ints, strings and lists, loadable with torch.load(weights_only=True)) holds
the epoch, the source position (and the `datasets` stream state when there is one), the shuffle
buffer's documents and draw counter, and the tokens not yet batched; `load_state_dict()` then makes
a new stream yield exactly the batches the old one would have.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .dataset import TextDataset, check_split, split_of
from .errors import EmptySplitError, ResumeError

if TYPE_CHECKING:
    from .config import DataConfig

STATE_VERSION = 1


@dataclass
class Batch:
    """tokens: LongTensor (batch, n_ctx + 1); attention_mask: same shape or None (packed mode).

    With `track_documents`, doc_ids holds each token's document key (-1 on padding) and doc_pos its
    index in the document's `encode(text)` ids (-1 for a bos token, len(ids) for the separator after
    the document, -1 on padding).
    """

    tokens: "torch.Tensor"
    attention_mask: "torch.Tensor | None" = None
    doc_ids: "torch.Tensor | None" = None
    doc_pos: "torch.Tensor | None" = None

    @property
    def inputs(self) -> "torch.Tensor":
        return self.tokens[:, :-1]

    @property
    def targets(self) -> "torch.Tensor":
        return self.tokens[:, 1:]

    @property
    def loss_mask(self) -> "torch.Tensor | None":
        return None if self.attention_mask is None else self.attention_mask[:, 1:]

    @property
    def n_targets(self) -> int:
        """Tokens predicted in this batch (real tokens only)."""
        if self.attention_mask is None:
            return self.targets.numel()
        return int(self.attention_mask[:, 1:].sum())

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.tokens), move(self.attention_mask), move(self.doc_ids), move(self.doc_pos))


class _State:
    """The live state of one pass (plain data, plus the open source iterator)."""

    FIELDS = ("epoch", "source_pos", "source_state", "source_done", "split_seen", "epoch_kept", "buffer",
              "draws", "tokens", "keys", "pos", "rows", "documents", "batches", "targets", "unknown")

    def __init__(self) -> None:
        self.epoch = 0
        self.source_pos = 0  # records read from the source in this epoch
        self.source_state: dict | None = None  # the `datasets` stream state at source_pos
        self.source_done = False  # the source is exhausted for this epoch (the buffer drains)
        self.split_seen = 0  # records of this split seen in this epoch (all ranks), for max_documents
        self.epoch_kept = 0  # records this rank kept in this epoch
        self.buffer: list[list] = []  # shuffle buffer: [key, text]
        self.draws = 0  # shuffle draws in this epoch: the RNG state
        self.tokens: list[int] = []  # packed: tokens not yet batched
        self.keys: list[int] = []
        self.pos: list[int] = []
        self.rows: list[list] = []  # padded: [ids, keys, pos] rows not yet batched
        self.documents = 0  # documents tokenized so far
        self.batches = 0
        self.targets = 0  # real tokens predicted in the batches yielded
        self.unknown = 0  # unknown tokens among the documents tokenized
        self.live_source: Any = None  # not saved

    def to_dict(self) -> dict:
        out = {}
        for name in self.FIELDS:
            value = getattr(self, name)
            out[name] = [list(x) if isinstance(x, list) else x for x in value] if isinstance(value, list) else value
        if self.live_source is not None and not self.source_done:
            out["source_state"] = self.live_source.state() if hasattr(self.live_source, "state") else None
        out["rows"] = [[list(part) for part in row] for row in self.rows]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "_State":
        state = cls()
        for name in cls.FIELDS:
            if name in data:
                setattr(state, name, data[name])
        state.buffer = [list(x) for x in state.buffer]
        state.tokens, state.keys, state.pos = list(state.tokens), list(state.keys), list(state.pos)
        state.rows = [[list(part) for part in row] for row in state.rows]
        return state


class StreamingTextDataset(IterableDataset):
    """Training batches from a `TextDataset`, streamed with bounded memory (see the module docstring).

    `rank`/`world_size` shard documents across processes; inside a torch DataLoader with workers the
    shards are further divided per worker (state_dict/resume is for in-process iteration).
    """

    def __init__(self, dataset: TextDataset, *, split: str, n_ctx: int, batch_size: int, mode: str = "packed",
                 seed: int = 0, shuffle_buffer: int = 1024, tokenize_batch: int = 256, rank: int = 0,
                 world_size: int = 1, track_documents: bool = False):
        check_split(split)
        if mode not in ("packed", "padded"):
            raise ValueError(f"mode must be 'packed' or 'padded', not {mode!r}")
        for name, value in (("n_ctx", n_ctx), ("batch_size", batch_size), ("shuffle_buffer", shuffle_buffer),
                            ("tokenize_batch", tokenize_batch), ("world_size", world_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), not {rank}")
        self.dataset = dataset
        self.split = split
        self.n_ctx, self.batch_size = int(n_ctx), int(batch_size)
        self.mode, self.seed = mode, int(seed)
        self.shuffle_buffer, self.tokenize_batch = int(shuffle_buffer), int(tokenize_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.track_documents = bool(track_documents)
        self.tokenizer = dataset.tokenizer()
        self._sep = self.tokenizer.separator_id
        self._bos = self.tokenizer.bos_id
        self._pad = self.tokenizer.padding_id
        self._unk = self.tokenizer.unk_id
        self._state = _State()

    @classmethod
    def from_config(cls, data: "DataConfig", *, split: str, n_ctx: int, batch_size: int, seed: int = 0,
                    rank: int = 0, world_size: int = 1, dataset: TextDataset | None = None,
                    **kwargs: Any) -> "StreamingTextDataset":
        """The stream a run's DataConfig describes (the dataset is built through the registry)."""
        from .dataset import build_dataset

        dataset = dataset if dataset is not None else build_dataset(data.dataset)
        return cls(dataset, split=split, n_ctx=n_ctx, batch_size=batch_size, mode=data.mode, seed=seed,
                   shuffle_buffer=data.shuffle_buffer, tokenize_batch=data.tokenize_batch, rank=rank,
                   world_size=world_size, **kwargs)

    @property
    def is_train(self) -> bool:
        return self.split == "train"

    # -- state -------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"version": STATE_VERSION, "dataset": self.dataset.name, "split": self.split, "mode": self.mode,
                "n_ctx": self.n_ctx, "batch_size": self.batch_size, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "shuffle_buffer": self.shuffle_buffer,
                "track_documents": self.track_documents, "tokenizer": self.tokenizer.fingerprint(),
                "val_fraction": self.dataset.val_fraction, "split_seed": self.dataset.split_seed}

    def state_dict(self) -> dict:
        """The position of the stream after the batches yielded so far (plain Python data)."""
        return {**self._identity(), **self._state.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next batches are exactly those the saved stream would have yielded."""
        mine = self._identity()
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise ResumeError("Cannot resume this data stream from the saved state; it belongs to a different "
                              "stream (" + "; ".join(diffs) + ").")
        self._state = _State.from_dict(state)

    @property
    def epoch(self) -> int:
        return self._state.epoch

    def stats(self) -> dict[str, int]:
        s = self._state
        return {"epoch": s.epoch, "documents": s.documents, "batches": s.batches, "target_tokens": s.targets,
                "unknown_tokens": s.unknown}

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        rank, world = self.rank, self.world_size
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            rank, world = rank * info.num_workers + info.id, world * info.num_workers
        if self.is_train:
            state = self._state
        else:
            state = self._state = _State()
        return self._batches(state, rank, world)

    def _draw(self, state: _State, rank: int, size: int) -> int:
        digest = hashlib.blake2b(struct.pack("<qqqq", self.seed, state.epoch, rank, state.draws),
                                 digest_size=8).digest()
        state.draws += 1
        return int.from_bytes(digest, "little") % size

    def _documents(self, state: _State, rank: int, world: int) -> Iterator[tuple[int, str]]:
        dataset = self.dataset
        source = dataset.source()
        cap = dataset.max_documents(self.split)
        shuffle = self.is_train and self.shuffle_buffer > 1
        split, val_fraction, split_seed = self.split, dataset.val_fraction, dataset.split_seed
        if split == "validation" and val_fraction <= 0:
            raise EmptySplitError(f"The validation split of dataset {dataset.name!r} is empty: val_fraction is 0.")

        while True:
            if not state.source_done and (cap is None or state.split_seen < cap):
                it = source.open(start=state.source_pos, state=state.source_state)
                state.live_source = it
                try:
                    for key, text in it:
                        state.source_pos += 1
                        if split_of(text, val_fraction=val_fraction, seed=split_seed) != split:
                            continue
                        state.split_seen += 1
                        last = cap is not None and state.split_seen >= cap
                        if key % world == rank:
                            state.epoch_kept += 1
                            if not shuffle:
                                yield key, text
                            elif len(state.buffer) < self.shuffle_buffer:
                                state.buffer.append([key, text])
                            else:
                                j = self._draw(state, rank, len(state.buffer))
                                out = state.buffer[j]
                                state.buffer[j] = [key, text]
                                yield out[0], out[1]
                        if last:
                            break
                finally:
                    # Keep the `datasets` position of an interrupted pass (a stream closed between batches).
                    state.source_state = it.state() if hasattr(it, "state") else None
                    state.live_source = None
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
            state.source_done = True
            state.source_state = None
            while state.buffer:
                j = self._draw(state, rank, len(state.buffer))
                key, text = state.buffer.pop(j)
                yield key, text
            if state.epoch_kept == 0:
                raise self._empty_error(state, rank, world)
            if not (self.is_train and source.finite):
                return
            state.epoch += 1
            state.source_pos, state.split_seen, state.epoch_kept, state.draws = 0, 0, 0, 0
            state.source_done = False

    def _empty_error(self, state: _State, rank: int, world: int) -> EmptySplitError:
        name = self.dataset.name
        if state.source_pos == 0:
            return EmptySplitError(f"Dataset {name!r} has no documents (its source is empty).")
        if state.split_seen == 0:
            return EmptySplitError(
                f"The {self.split} split of dataset {name!r} is empty: none of the {state.source_pos} documents "
                f"hashed into it (val_fraction={self.dataset.val_fraction}). Change val_fraction or add documents.")
        return EmptySplitError(
            f"Rank {rank} of {world} got no documents of the {self.split} split of dataset {name!r} "
            f"({state.split_seen} documents in the split): use fewer processes or more data.")

    def _add(self, state: _State, key: int, ids: list[int]) -> None:
        seq = ids + [self._sep]
        first = 0
        if self._bos is not None:
            seq = [self._bos] + seq
            first = -1
        if self._unk is not None:
            state.unknown += ids.count(self._unk)
        state.documents += 1
        track = self.track_documents
        if self.mode == "packed":
            state.tokens.extend(seq)
            if track:
                state.keys.extend([key] * len(seq))
                state.pos.extend(range(first, first + len(seq)))
            return
        if len(seq) < 2:  # nothing to predict
            return
        n, width = self.n_ctx, self.n_ctx + 1
        positions = list(range(first, first + len(seq))) if track else []
        start = 0
        while True:
            row = seq[start:start + width]
            state.rows.append([row, [key] * len(row) if track else [], positions[start:start + width]])
            start += n
            if start + 1 >= len(seq):
                break

    def _ready(self, state: _State) -> bool:
        if self.mode == "packed":
            return len(state.tokens) >= self.batch_size * self.n_ctx + 1
        return len(state.rows) >= self.batch_size

    def _batches(self, state: _State, rank: int, world: int) -> Iterator[Batch]:
        docs = self._documents(state, rank, world)
        encode = self.tokenizer.encode_batch
        try:
            while True:
                exhausted = False
                while not self._ready(state):
                    chunk = list(islice(docs, self.tokenize_batch))
                    if not chunk:
                        exhausted = True
                        break
                    for (key, _), ids in zip(chunk, encode([text for _, text in chunk])):
                        self._add(state, key, ids)
                if exhausted:
                    yield from self._final_batches(state)
                    return
                batch = self._take(state)
                state.batches += 1
                state.targets += batch.n_targets
                yield batch
        finally:
            docs.close()

    def _take(self, state: _State) -> Batch:
        B, n, width = self.batch_size, self.n_ctx, self.n_ctx + 1
        if self.mode == "packed":
            span = B * n + 1
            tokens = torch.tensor(state.tokens[:span], dtype=torch.long).unfold(0, width, n).contiguous()
            doc_ids = doc_pos = None
            if self.track_documents:
                doc_ids = torch.tensor(state.keys[:span], dtype=torch.long).unfold(0, width, n).contiguous()
                doc_pos = torch.tensor(state.pos[:span], dtype=torch.long).unfold(0, width, n).contiguous()
                del state.keys[: B * n], state.pos[: B * n]
            del state.tokens[: B * n]
            return Batch(tokens, None, doc_ids, doc_pos)
        rows = state.rows[:B]
        del state.rows[:B]
        return self._padded(rows)

    def _padded(self, rows: list[list]) -> Batch:
        width, pad = self.n_ctx + 1, self._pad
        lengths = torch.tensor([len(r[0]) for r in rows], dtype=torch.long)
        tokens = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows], dtype=torch.long)
        mask = (torch.arange(width) < lengths[:, None]).long()
        doc_ids = doc_pos = None
        if self.track_documents:
            doc_ids = torch.tensor([r[1] + [-1] * (width - len(r[1])) for r in rows], dtype=torch.long)
            doc_pos = torch.tensor([r[2] + [-1] * (width - len(r[2])) for r in rows], dtype=torch.long)
        return Batch(tokens, mask, doc_ids, doc_pos)

    def _final_batches(self, state: _State) -> Iterator[Batch]:
        """The end of a finite (validation) stream: what is left, in batches of at most batch_size rows."""
        n, width = self.n_ctx, self.n_ctx + 1
        if self.mode == "packed":
            rows = []
            while len(state.tokens) >= 2:
                k = min(width, len(state.tokens))
                rows.append([state.tokens[:k], state.keys[:k], state.pos[:k]])
                drop = min(n, len(state.tokens) - 1)
                del state.tokens[:drop], state.keys[:drop], state.pos[:drop]
                if k < width:
                    break
            state.tokens, state.keys, state.pos = [], [], []
        else:
            rows, state.rows = state.rows, []
        for start in range(0, len(rows), self.batch_size):
            part = rows[start:start + self.batch_size]
            batch = self._padded(part)
            if self.mode == "packed" and all(len(r[0]) == width for r in part):
                batch.attention_mask = None
            state.batches += 1
            state.targets += batch.n_targets
            yield batch
