"""Built-in datasets: synthetic (default, offline, with ground truth), simplestories, tinystories,
fineweb, and text (your own files).

Only configs live here (pydantic); the datasets register as lazy "module:attr" references, so
`qtoy list` imports neither torch nor datasets nor tokenizers. Every dataset takes the common options
of `qtoy_core.data.TextDatasetConfig`: data_files, tokenizer, val_fraction, split_seed.
"""

from typing import Literal

from pydantic import Field, model_validator

from qtoy_core import HubDatasetConfig, TextDatasetConfig, TextSplit, hookimpl


class SyntheticDatasetConfig(TextDatasetConfig):
    """Generated children's stories with exact entropy and per-token labels (copyable/fixed/free); offline."""

    name: Literal["synthetic"] = "synthetic"
    seed: int = 0
    difficulty: float = Field(0.5, ge=0.0, le=1.0)
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    # A finite corpus (stories 0..n_stories-1, looped over epochs); None: an endless stream.
    n_stories: int | None = Field(None, ge=1)
    # The validation stream: the first val_documents stories that hash into the validation split.
    val_documents: int = Field(2000, ge=1)
    # Size of the byte-level BPE trained on generator output (cached; shared by all seeds/difficulties).
    vocab_size: int = Field(4096, ge=300)


class SimpleStoriesConfig(HubDatasetConfig):
    """SimpleStories/SimpleStories (column story) with the SimpleStories WordPiece tokenizer (lowercase)."""

    name: Literal["simplestories"] = "simplestories"
    hub_id: str = "SimpleStories/SimpleStories"
    column: str = "story"
    # 4019: the tokenizer SimpleStories' own training configs (and the V2 models) use; 4096: the V1 one.
    tokenizer_vocab: Literal[4019, 4096] = 4019


class TinyStoriesConfig(HubDatasetConfig):
    """roneneldan/TinyStories (column text) with tinymodel's 10k-token TinyStories vocabulary of GPT-Neo's BPE."""

    name: Literal["tinystories"] = "tinystories"
    hub_id: str = "roneneldan/TinyStories"
    column: str = "text"
    # Local files for the tinymodel tokenizer, instead of the hub / download: a GPT-2 (= GPT-Neo) BPE
    # tokenizer.json, and tinymodel's id maps (a folder holding ts_tok_ids_to_neo.pt or
    # tinymodel_ts_tok_ids_to_neo.pt, or the path of either map file).
    base_tokenizer: str | None = None
    id_maps: str | None = None


class FineWebConfig(HubDatasetConfig):
    """HuggingFaceFW/fineweb, config sample-10BT (column text), with the GPT-2 tokenizer (50257)."""

    name: Literal["fineweb"] = "fineweb"
    hub_id: str = "HuggingFaceFW/fineweb"
    hub_config: str | None = "sample-10BT"
    column: str = "text"


class TextFilesConfig(TextDatasetConfig):
    """Your own files (txt, jsonl, parquet, csv; paths, globs or folders); a 4096 BPE is trained if no tokenizer."""

    name: Literal["text"] = "text"
    column: str = "text"
    text_split: TextSplit = "auto"
    # The BPE trained (and cached by the files' content hash) when no `tokenizer` is given.
    vocab_size: int = Field(4096, ge=300)
    tokenizer_train_chars: int = Field(50_000_000, ge=1, description="train-split characters to train it on")

    @model_validator(mode="after")
    def _needs_files(self) -> "TextFilesConfig":
        if not self.data_files:
            raise ValueError("the text dataset reads your own files: give data_files (e.g. --data-files "
                             "'corpus/*.txt')")
        return self


@hookimpl
def register_datasets(register):
    register(SyntheticDatasetConfig, "qtoy_plugins.data.synthetic.dataset:SyntheticDataset")
    register(SimpleStoriesConfig, "qtoy_plugins.data.hub_datasets:SimpleStoriesDataset")
    register(TinyStoriesConfig, "qtoy_plugins.data.hub_datasets:TinyStoriesDataset")
    register(FineWebConfig, "qtoy_plugins.data.hub_datasets:FineWebDataset")
    register(TextFilesConfig, "qtoy_plugins.data.hub_datasets:TextFilesDataset")
