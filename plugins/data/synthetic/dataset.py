"""The `synthetic` dataset: `StoryGenerator` output, its BPE tokenizer, and per-token ground truth.

Documents are stories 0, 1, 2, ... of `StoryGenerator(seed, difficulty)` (key = story index), split
by the usual text hash. The tokenizer is a byte-level BPE (default 4096 tokens, `<|endoftext|>`
between stories) trained once on the first 4000 stories of seed 0 at difficulty 1.0 (every word of
the lexicon can appear) and cached under qtoy's cache folder, keyed by the generator version and
those settings: one vocabulary for every seed and difficulty, so models stay comparable.

Ground truth, per token of `tokenizer.encode(story.text)`:
  label: the most informative label among the generator spans the token overlaps (free > copyable >
    fixed); the separator after a story is "fixed" (stories end with a fixed closing phrase);
  nats: each span's nats are charged to the token holding the span's first character, so a story's
    token nats sum to its `entropy_nats`.
`entropy_per_token(n_docs)` is the corpus' total entropy over its total number of predicted tokens
(separators included): the loss floor of a perfect model of the generator.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterator

from qtoy_core import DataError, TextDataset, Tokenizer, cached_tokenizer, train_bpe

from .generator import GENERATOR_VERSION, LABELS, Story, StoryGenerator, describe_structure

if TYPE_CHECKING:
    import torch

    from qtoy_core import Batch

TOKENIZER_STORIES = 4000
TOKENIZER_SEED = 0
TOKENIZER_DIFFICULTY = 1.0
TOKENIZER_RECIPE = 1  # bump when the training recipe changes
LABEL_CODES = {label: i for i, label in enumerate(LABELS)}  # fixed 0, copyable 1, free 2
_RANK = {"fixed": 0, "copyable": 1, "free": 2}


class GeneratorSource:
    """Stories `start, start + 1, ...` (up to n_stories) as `(index, text)` records."""

    def __init__(self, generator: StoryGenerator, n_stories: int | None, recent: "OrderedDict[str, int]"):
        self.generator = generator
        self.n_stories = n_stories
        self.finite = n_stories is not None
        self._recent = recent

    def describe(self) -> dict[str, Any]:
        return {"source": "generator", "generator_version": GENERATOR_VERSION, "seed": self.generator.seed,
                "difficulty": self.generator.difficulty, "n_stories": self.n_stories}

    def open(self, *, start: int = 0, state: dict | None = None) -> Iterator[tuple[int, str]]:
        gen, end, recent = self.generator, self.n_stories, self._recent
        i = start
        while end is None or i < end:
            text = gen.text(i)
            recent[text] = i
            if len(recent) > 8192:
                recent.popitem(last=False)
            yield i, text
            i += 1


class SyntheticDataset(TextDataset):
    """Generated children's stories with exact entropy and per-token labels (see the module docstring)."""

    LABELS = LABELS  # the label names batch_ground_truth's codes index (qtoy eval's excess loss reads them)

    def __init__(self, config):
        super().__init__(config)
        self.generator = StoryGenerator(seed=config.seed, difficulty=config.difficulty)
        self._recent: OrderedDict[str, int] = OrderedDict()

    # -- TextDataset ---------------------------------------------------------------------------------
    def make_source(self):
        if self.config.data_files:
            from qtoy_core import HFSource, resolve_data_files

            local = resolve_data_files(self.config.data_files, dataset=self.name)
            return HFSource(dataset=self.name, column="text", local=local,
                            hint="Check the paths given with --data-files.")
        return GeneratorSource(self.generator, self.config.n_stories, self._recent)

    def max_documents(self, split: str) -> int | None:
        if split == "validation" and not self.config.data_files:
            return self.config.val_documents
        return None

    def load_tokenizer(self) -> Tokenizer:
        size = self.config.vocab_size
        key = (f"synthetic-g{GENERATOR_VERSION}-bpe{size}-s{TOKENIZER_SEED}-d{TOKENIZER_DIFFICULTY}"
               f"-n{TOKENIZER_STORIES}-r{TOKENIZER_RECIPE}")

        def build():
            gen = StoryGenerator(seed=TOKENIZER_SEED, difficulty=TOKENIZER_DIFFICULTY)
            return train_bpe((gen.text(i) for i in range(TOKENIZER_STORIES)), vocab_size=size)

        return cached_tokenizer(key, build, source=f"synthetic BPE ({key})")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "generator_version": GENERATOR_VERSION}

    # -- ground truth ------------------------------------------------------------------------------
    def story(self, index: int) -> Story:
        return self.generator.story(index)

    def _story(self, story: "Story | int | str") -> Story:
        if isinstance(story, Story):
            return story
        if self.config.data_files:
            raise DataError("Ground truth comes from the generator; this synthetic dataset reads data_files, "
                            "whose documents are not indexed stories. Pass a Story object.")
        if isinstance(story, int):
            return self.generator.story(story)
        if isinstance(story, str):
            index = self._recent.get(story)
            if index is None:
                raise DataError("token_labels(text) knows only stories this dataset generated recently; pass the "
                                "story index (a batch's doc_ids) or the Story object instead.")
            return self.generator.story(index)
        raise TypeError(f"expected a Story, a story index or a story text, not {type(story).__name__}")

    def ground_truth(self, story: "Story | int | str") -> dict[str, list]:
        """Per token of `encode(story.text)`: ids, labels ("fixed"/"copyable"/"free") and nats."""
        story = self._story(story)
        ids, offsets, norm = self.tokenizer().encode_with_offsets(story.text)
        if norm != story.text:
            raise DataError("Token labels need a tokenizer that leaves the text unchanged; this one normalizes it.")
        starts = [s.start for s in story.spans]
        labels: list[str] = []
        for s, e in offsets:
            if e <= s:
                labels.append("fixed")
                continue
            k = max(bisect_right(starts, s) - 1, 0)
            best = "fixed"
            while k < len(story.spans) and story.spans[k].start < e:
                if _RANK[story.spans[k].label] > _RANK[best]:
                    best = story.spans[k].label
                k += 1
            labels.append(best)
        nats = [0.0] * len(ids)
        ends = [e for _, e in offsets]
        for span in story.spans:
            if span.nats:
                t = min(bisect_right(ends, span.start), len(ids) - 1)  # first token ending after span.start
                if t >= 0:
                    nats[t] += span.nats
        return {"ids": ids, "labels": labels, "nats": nats}

    def token_labels(self, story: "Story | int | str") -> list[str]:
        """The label of each token of `tokenizer.encode(text)` for a Story, a story index, or a text
        this dataset generated recently."""
        return self.ground_truth(story)["labels"]

    def batch_ground_truth(self, batch: "Batch") -> tuple["torch.Tensor", "torch.Tensor"]:
        """(label codes, nats) with the batch's shape, for a batch of a stream made with
        `track_documents=True`: codes index LABELS (fixed 0, copyable 1, free 2), -1 on padding; the
        separator after a story is fixed with 0 nats."""
        import torch

        if batch.doc_ids is None or batch.doc_pos is None:
            raise DataError("This batch carries no document positions: make the stream with "
                            "StreamingTextDataset(..., track_documents=True).")
        codes = torch.full_like(batch.tokens, -1)
        nats = torch.zeros(batch.tokens.shape, dtype=torch.float64)
        cache: dict[int, tuple[list[int], list[float]]] = {}
        keys, positions = batch.doc_ids.tolist(), batch.doc_pos.tolist()
        for r, (krow, prow) in enumerate(zip(keys, positions)):
            for c, (key, pos) in enumerate(zip(krow, prow)):
                if key < 0:
                    continue
                if key not in cache:
                    truth = self.ground_truth(int(key))
                    cache[key] = ([LABEL_CODES[x] for x in truth["labels"]], truth["nats"])
                lab, nat = cache[key]
                if 0 <= pos < len(lab):
                    codes[r, c] = lab[pos]
                    nats[r, c] = nat[pos]
                else:  # bos / separator
                    codes[r, c] = LABEL_CODES["fixed"]
        return codes, nats

    def entropy_stats(self, n_docs: int = 1000, split: str = "train") -> dict[str, Any]:
        """Entropy and label statistics of the first `n_docs` documents of `split`."""
        tok = self.tokenizer()
        extra = 1 + (tok.bos_id is not None)  # separator (+ bos) per story
        total_nats = 0.0
        tokens = 0
        counts = dict.fromkeys(LABELS, 0)
        nats_by_label = dict.fromkeys(LABELS, 0.0)
        docs = 0
        for key, _ in self.records(split):
            truth = self.ground_truth(int(key))
            total_nats += math.fsum(truth["nats"])
            tokens += len(truth["ids"]) + extra
            counts["fixed"] += extra
            for label, n in zip(truth["labels"], truth["nats"]):
                counts[label] += 1
                nats_by_label[label] += n
            docs += 1
            if docs >= n_docs:
                break
        if docs == 0:
            raise DataError(f"No documents in the {split} split to measure.")
        return {
            "documents": docs, "tokens": tokens, "nats": total_nats,
            "nats_per_token": total_nats / tokens, "bits_per_token": total_nats / tokens / math.log(2),
            "tokens_per_document": tokens / docs, "nats_per_document": total_nats / docs,
            "label_fractions": {k: v / tokens for k, v in counts.items()},
            "nats_per_token_by_label": {k: (nats_by_label[k] / counts[k] if counts[k] else 0.0) for k in LABELS},
        }

    def entropy_per_token(self, n_docs: int = 1000, split: str = "train") -> float:
        """The corpus' entropy in nats per predicted token (separators included) over `n_docs` stories:
        the loss of a perfect model of the generator."""
        return self.entropy_stats(n_docs, split)["nats_per_token"]

    @staticmethod
    def structure() -> dict:
        """The generator's planted structure (episodes, copying, fixed phrases, labels)."""
        return describe_structure()
