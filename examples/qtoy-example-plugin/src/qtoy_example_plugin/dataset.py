"""The `sums` dataset: a deterministic corpus of additions, and a small BPE trained on it.

A dataset plugin registers a factory `factory(config) -> qtoy_core.TextDataset`; the class itself
is such a factory. It implements `make_source()` (where the documents come from) and
`load_tokenizer()`; qtoy provides the train/validation split (a hash of each text), the sharding
across ranks, shuffling, tokenising and batching.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

from qtoy_core import TextDataset, Tokenizer, cached_tokenizer, train_bpe

TOKENIZER_RECIPE = 1  # bump when the tokenizer's training recipe changes (it is part of the cache key)
TOKENIZER_DOCUMENTS = 500


class SumsSource:
    """Documents 0..n_documents-1, each `sums_per_document` lines "a+b=c" (a `qtoy_core.DocumentSource`)."""

    finite = True

    def __init__(self, config):
        self.config = config

    def document(self, index: int) -> str:
        c = self.config
        rng = random.Random(f"sums-{c.seed}-{index}")  # str seeds hash with sha512: stable everywhere
        lines = []
        for _ in range(c.sums_per_document):
            a, b = rng.randint(0, c.max_operand), rng.randint(0, c.max_operand)
            lines.append(f"{a}+{b}={a + b}")
        return "\n".join(lines)

    def open(self, *, start: int = 0, state: dict | None = None) -> Iterator[tuple[int, str]]:
        for index in range(start, self.config.n_documents):
            yield index, self.document(index)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"source": "generated sums", "seed": c.seed, "n_documents": c.n_documents,
                "max_operand": c.max_operand}


class SumsDataset(TextDataset):
    def make_source(self) -> SumsSource:
        return SumsSource(self.config)

    def load_tokenizer(self) -> Tokenizer:
        c = self.config
        key = f"qtoy-example-sums-s{c.seed}-m{c.max_operand}-k{c.sums_per_document}-v{c.vocab_size}-r{TOKENIZER_RECIPE}"
        source = self.make_source()

        def build():
            n = min(TOKENIZER_DOCUMENTS, c.n_documents)
            return train_bpe((source.document(i) for i in range(n)), vocab_size=c.vocab_size)

        return cached_tokenizer(key, build, source=f"sums BPE ({key})")
