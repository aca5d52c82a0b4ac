"""Data: tokenizers, datasets (through the registry), the deterministic split and the streaming batches.

    from qtoy_core.data import DataConfig, StreamingTextDataset, build_dataset, check_vocab
    data = DataConfig(dataset="synthetic")
    dataset = build_dataset(data.dataset)
    check_vocab(model_config, dataset.tokenizer())
    train = StreamingTextDataset.from_config(data, split="train", n_ctx=256, batch_size=32, dataset=dataset)
    for batch in train: ...   # batch.tokens (B, n_ctx + 1); batch.attention_mask None when packed

Importing this package loads neither torch nor datasets nor tokenizers; they load on first use
(`StreamingTextDataset` and `Batch` come from `.stream`, which imports torch, when first named;
`prepare_shards`, `PreparedShards` and `ShardBatches` from `.shards`, prepared token shards).
"""

import importlib
from typing import TYPE_CHECKING, Any

from .cache import cache_dir
from .config import DataConfig, HubDatasetConfig, TextDatasetConfig
from .dataset import (
    SPLITS,
    DocumentSource,
    HubTextDataset,
    TextDataset,
    build_dataset,
    check_vocab,
    split_of,
    split_value,
)
from .errors import (
    DataError,
    DataFileError,
    EmptySplitError,
    HubUnreachableError,
    ResumeError,
    TokenizerError,
    VocabMismatchError,
)
from .tokenizer import END_OF_TEXT, MappedTokenizer, Tokenizer, cached_tokenizer, train_bpe

_LAZY = {"Batch": ".stream", "StreamingTextDataset": ".stream", "PreparedShards": ".shards",
         "ShardBatches": ".shards", "prepare_shards": ".shards", "IncompleteShardsError": ".shards"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .shards import IncompleteShardsError, PreparedShards, ShardBatches, prepare_shards
    from .stream import Batch, StreamingTextDataset

__all__ = [
    "END_OF_TEXT", "SPLITS", "Batch", "DataConfig", "DataError", "DataFileError", "DocumentSource", "EmptySplitError",
    "HubDatasetConfig", "HubTextDataset", "HubUnreachableError", "IncompleteShardsError", "MappedTokenizer",
    "PreparedShards", "ResumeError", "ShardBatches", "StreamingTextDataset", "TextDataset", "TextDatasetConfig", "Tokenizer", "TokenizerError", "VocabMismatchError",
    "build_dataset", "cache_dir", "cached_tokenizer", "check_vocab", "prepare_shards", "split_of", "split_value",
    "train_bpe",
]
