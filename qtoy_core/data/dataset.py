"""`TextDataset`: what a dataset plugin's factory returns, and the deterministic train/validation split.

A dataset is an ordered source of documents plus a tokenizer. The split is a pure function of each
document's text: blake2b(text, key=split_seed) read as a number in [0, 1) below `val_fraction` means
validation. So a document lands in the same split on every run, machine, rank or worker count, and
the splits never overlap (identical texts share a split). Ranks then take the documents whose key (the
record's ordinal in the source) is congruent to their rank modulo world_size.
"""

from __future__ import annotations

import abc

import hashlib
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from qtoy_registry import QtoyError

from .errors import DataError, VocabMismatchError
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from ..components import DatasetConfig
    from .config import HubDatasetConfig, TextDatasetConfig

SPLITS = ("train", "validation")


def split_value(text: str, seed: int = 0) -> float:
    """A stable number in [0, 1) for `text` (blake2b keyed with the seed; not Python's hash)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def split_of(text: str, *, val_fraction: float, seed: int = 0) -> str:
    return "validation" if split_value(text, seed) < val_fraction else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}: use 'train' or 'validation'.")
    return split


class DocumentSource(Protocol):
    """An ordered, re-openable source of `(key, text)` records (keys are ordinals)."""

    finite: bool

    def open(self, *, start: int = 0, state: dict | None = None) -> Iterator[tuple[int, str]]: ...

    def describe(self) -> dict[str, Any]: ...


class TextDataset(abc.ABC):
    """A named source of documents and its tokenizer. Subclasses implement `source()` and
    `load_tokenizer()`; the split, the rank sharding and `describe()` are provided."""

    name: str = ""

    def __init__(self, config: "TextDatasetConfig"):
        self.config = config
        self.name = config.name
        self._tokenizer: Tokenizer | None = None
        self._source: DocumentSource | None = None

    # -- to implement --------------------------------------------------------------------------
    @abc.abstractmethod
    def make_source(self) -> DocumentSource:
        """Where the documents come from (a generator, local files, a hub stream)."""

    @abc.abstractmethod
    def load_tokenizer(self) -> Tokenizer:
        """The dataset's own tokenizer (used when the config gives no `tokenizer` file)."""

    def max_documents(self, split: str) -> int | None:
        """A cap on a split's documents (an endless generator's validation split needs one)."""
        return None

    # -- provided ----------------------------------------------------------------------------------
    def source(self) -> DocumentSource:
        if self._source is None:
            self._source = self.make_source()
        return self._source

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            path = getattr(self.config, "tokenizer", None)
            self._tokenizer = Tokenizer.from_file(path) if path else self.load_tokenizer()
        return self._tokenizer

    @property
    def val_fraction(self) -> float:
        return float(getattr(self.config, "val_fraction", 0.0))

    @property
    def split_seed(self) -> int:
        return int(getattr(self.config, "split_seed", 0))

    def split_of(self, text: str) -> str:
        return split_of(text, val_fraction=self.val_fraction, seed=self.split_seed)

    def records(self, split: str, *, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, str]]:
        """One pass over `split` (this rank's share): `(key, text)` in the source's order."""
        check_split(split)
        cap = self.max_documents(split)
        if (cap is not None and cap <= 0) or (split == "validation" and self.val_fraction <= 0):
            return  # (an endless source would otherwise be searched forever)
        seen = 0
        it = self.source().open()
        try:
            for key, text in it:
                if self.split_of(text) != split:
                    continue
                seen += 1
                if key % world_size == rank:
                    yield key, text
                if cap is not None and seen >= cap:
                    return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def documents(self, split: str, *, rank: int = 0, world_size: int = 1) -> Iterator[str]:
        """The texts of `split` (after the hash split), in the source's deterministic order."""
        for _, text in self.records(split, rank=rank, world_size=world_size):
            yield text

    def describe(self) -> dict[str, Any]:
        """JSON-able: dataset name, its config, where the documents come from, and the tokenizer."""
        tok = self.tokenizer()
        return {"name": self.name, "config": self.config.model_dump(mode="json"), **self.source().describe(),
                "tokenizer": tok.describe(), "vocab_size": tok.vocab_size,
                "val_fraction": self.val_fraction, "split_seed": self.split_seed}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class HubTextDataset(TextDataset):
    """A hub dataset (`hub_id`, `hub_config`, text `column`), or the same format from `data_files`."""

    config: "HubDatasetConfig"

    def local_hint(self) -> str:
        c = self.config
        return (f"Pass local files instead with --data-files (a folder made by `hf download {c.hub_id} --repo-type "
                f"dataset --local-dir DIR`, or .jsonl/.parquet/.txt files with a {c.column!r} column), and a local "
                f"tokenizer.json with --tokenizer if its tokenizer is not in the local Hugging Face cache either.")

    def make_source(self) -> DocumentSource:
        from .sources import HFSource, resolve_data_files

        c = self.config
        if c.data_files:
            local = resolve_data_files(c.data_files, dataset=self.name, text_split=c.text_split)
            return HFSource(dataset=self.name, column=c.column, hint=self.local_hint(), local=local)
        return HFSource(dataset=self.name, column=c.column, hint=self.local_hint(), hub_id=c.hub_id,
                        hub_config=c.hub_config)


def build_dataset(dataset_config: "DatasetConfig | str | dict") -> TextDataset:
    """The dataset a config describes, built by the plugin registered for its name."""
    from ..components import parse_component
    from ..registry_access import component_implementation

    try:
        config = parse_component("dataset", dataset_config)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    dataset = component_implementation(config)(config)
    if not isinstance(dataset, TextDataset):
        raise QtoyError(f"The dataset plugin for {config.name!r} returned {type(dataset).__name__}, not a "
                        f"qtoy_core.data.TextDataset.")
    return dataset


def check_vocab(model_config: Any, tokenizer: Tokenizer | TextDataset) -> None:
    """Refuse a model whose vocab_size differs from the tokenizer's, naming both numbers."""
    if isinstance(tokenizer, TextDataset):
        what = f"the {tokenizer.name!r} dataset's tokenizer"
        tokenizer = tokenizer.tokenizer()
    else:
        what = "the tokenizer" + (f" ({tokenizer.source})" if getattr(tokenizer, "source", None) else "")
    if isinstance(model_config, int):
        model_vocab = model_config
    elif isinstance(model_config, dict):
        model_vocab = (model_config.get("model") or model_config).get("vocab_size")
    else:
        model_vocab = getattr(model_config, "vocab_size", None)
    if model_vocab is None:
        raise VocabMismatchError(f"The model config has no vocab_size; {what} has {tokenizer.vocab_size} tokens.")
    if int(model_vocab) != tokenizer.vocab_size:
        raise VocabMismatchError(
            f"The model's vocab_size is {model_vocab} but {what} has {tokenizer.vocab_size} tokens. Set the "
            f"model's vocab_size to {tokenizer.vocab_size} (e.g. `--set vocab_size={tokenizer.vocab_size}`), or use "
            f"a dataset/tokenizer with {model_vocab} tokens.")
