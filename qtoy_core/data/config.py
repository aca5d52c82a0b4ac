"""Dataset configs (pydantic only: importing this never loads torch, datasets or tokenizers).

`TextDatasetConfig` holds the options every dataset takes; dataset plugins derive their config from
it (or from `HubDatasetConfig` for a Hugging Face hub dataset) and add a `name: Literal[...]`.
`DataConfig` is the data section of a run config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator

from ..components import DatasetConfig, parse_component

TextSplit = Literal["auto", "endoftext", "paragraph", "line", "file"]
DEFAULT_DATASET = "synthetic"


class TextDatasetConfig(DatasetConfig):
    """Options common to every dataset.

    data_files: local files (paths, globs or a hub-like folder with `data/train-*.parquet`) in the
      dataset's own format, read through the same streaming code as the hub.
    tokenizer: a local tokenizer.json used instead of the dataset's own tokenizer.
    val_fraction / split_seed: the deterministic train/validation split by a hash of each text.
    """

    data_files: list[str] | None = None
    tokenizer: str | None = None
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    split_seed: int = Field(0, ge=-(2**63), le=2**63 - 1)

    @field_validator("data_files", mode="before")
    @classmethod
    def _files(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
            return value or None
        return value

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer(cls, value: Any) -> Any:
        return str(value) if value is not None and not isinstance(value, str) else value


class HubDatasetConfig(TextDatasetConfig):
    """A dataset streamed from the Hugging Face hub (or the same format from `data_files`)."""

    hub_id: str
    hub_config: str | None = None
    column: str = "text"
    # How .txt files divide into documents: `endoftext` (stories separated by `<|endoftext|>` lines),
    # `paragraph` (blank lines), `line`, `file`; `auto` picks endoftext when the first file has such
    # a line, else paragraph.
    text_split: TextSplit = "auto"


class DataConfig(BaseModel):
    """The data section of a run: which dataset, how batches are formed, and buffer sizes."""

    model_config = ConfigDict(extra="forbid")

    dataset: SerializeAsAny[DatasetConfig] = Field(default_factory=lambda: parse_component("dataset", DEFAULT_DATASET))
    # packed: documents joined by the end-of-text token into full windows; padded: one document per
    # row (long ones continue on further rows), right-padded, with an attention mask.
    mode: Literal["packed", "padded"] = "packed"
    shuffle_buffer: int = Field(1024, ge=1, description="documents held for shuffling (train split)")
    tokenize_batch: int = Field(256, ge=1, description="documents per encode_batch call")
    # A folder made by `qtoy data prepare`: train and validate from its memory-mapped shards instead
    # of tokenizing `dataset` on the fly (its manifest names the dataset; packed mode only).
    prepared: str | None = None
    # How the train split of prepared shards is read: random (windows in a fresh permutation every
    # epoch) or sequential (the packed token stream in order).
    shard_order: Literal["random", "sequential"] = "random"

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset(cls, value: Any) -> DatasetConfig:
        if isinstance(value, dict) and "name" not in value:  # options of the default dataset
            value = {"name": DEFAULT_DATASET, **value}
        return parse_component("dataset", value)
