"""Errors the data machinery raises on purpose. Each message names the problem and the fix; the CLI
prints them without a traceback (they are `qtoy_registry.QtoyError`s)."""

from __future__ import annotations

from qtoy_registry import QtoyError


class DataError(QtoyError):
    """Base of the data errors."""


class HubUnreachableError(DataError, ConnectionError):
    """A hub dataset or tokenizer was needed and the Hugging Face hub could not be reached."""


class DataFileError(DataError, ValueError):
    """Local data files that are missing, empty, unreadable, not UTF-8, or lack the text column."""


class EmptySplitError(DataError):
    """A split (or a rank's shard of it) holds no documents."""


class TokenizerError(DataError):
    """A tokenizer file that is missing or cannot be read, or lacks a token the pipeline needs."""


class VocabMismatchError(DataError, ValueError):
    """The model's vocab_size differs from the dataset tokenizer's vocabulary size."""


class ResumeError(DataError):
    """A stream state that does not belong to this stream (other dataset, mode, sizes or tokenizer)."""
