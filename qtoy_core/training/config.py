"""`RunConfig` = model + data + optimizer + callbacks + training options, validated as one document.

Precedence when assembling one (see `assemble_run_config`): model-type preset < config file <
flags/overrides. The run's config.json is this document plus the providers of every component.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from qtoy_registry import QtoyError

from ..components import CallbackConfig, OptimizerConfig, parse_component
from ..config import ModelConfig, reconcile_model_type
from ..data.config import DataConfig
from ..overrides import apply_overrides


class ConfigFileError(QtoyError):
    pass


SEED_RANGE = dict(ge=-(2**63), le=2**63 - 1)  # what torch.manual_seed and the data stream's hash accept


class TrainConfig(BaseModel):
    """How to train: batch, schedule, evaluation, precision, checkpoints."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    batch_size: int = Field(16, gt=0, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    learning_rate: float | None = Field(None, gt=0, description="peak learning rate; default: the optimizer's")
    min_lr_frac: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak (cosine)")
    warmup: int = Field(50, ge=0, description="linear warmup steps")
    max_iters: int | None = Field(None, gt=0, description="optimizer steps (default 600 unless max_tokens)")
    max_tokens: int | None = Field(None, gt=0, description="stop after this many training tokens")
    eval_interval: int = Field(100, gt=0)
    eval_iters: int = Field(10, gt=0, description="validation batches per evaluation")
    log_interval: int = Field(10, gt=0)
    sample_prompts: list[str] | None = Field(
        None, description="prompts continued at every evaluation (samples.jsonl); default: the dataset's own; [] for none")
    sample_tokens: int = Field(24, ge=1, le=4096, description="tokens generated per sample")
    sample_temperature: float = Field(0.0, ge=0, description="0: greedy, so a resumed run prints the same samples")
    checkpoint_interval: int | None = Field(None, gt=0, description="default: every evaluation")
    checkpoint_schedule: Literal["interval", "log"] = Field(
        "interval", description="log: also keep weights-only snapshots at steps 1, 2, 4, ... and then every "
                                "snapshot_interval steps, under checkpoints/snapshots/ (for training dynamics)")
    snapshot_interval: int | None = Field(None, gt=0, description="log schedule: steps between snapshots after "
                                                                  "the powers of two (default: checkpoint_interval)")
    checkpoint_minutes: float | None = Field(10.0, gt=0, description="also save a full checkpoint when this many "
                                                                     "minutes passed since the last; null: steps only")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool | None = Field(None, description="torch.compile; default: when it pays for the run length")
    device: str = "auto"
    seed: int = Field(0, **SEED_RANGE)
    max_bad_steps: int = Field(10, gt=0, description="stop after this many non-finite steps in a row")

    @model_validator(mode="after")
    def _default_length(self) -> "TrainConfig":
        if self.max_iters is None and self.max_tokens is None:
            self.max_iters = 600
        return self

    def total_steps(self, tokens_per_step: int) -> int:
        if self.max_iters is not None:
            return self.max_iters
        return max(1, -(-self.max_tokens // tokens_per_step))


class RunConfig(BaseModel):
    """Everything a training run needs; config.json of a run folder is this plus plugin providers."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: SerializeAsAny[OptimizerConfig] = Field(default_factory=lambda: parse_component("optimizer", "adam"))
    callbacks: list[SerializeAsAny[CallbackConfig]] = Field(default_factory=list)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _drop_document_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):  # a run folder's config.json also carries these
            data = {k: v for k, v in data.items() if k not in ("format", "qtoy_version", "plugins")}
        return data

    @model_validator(mode="after")
    def _doc_mask_needs_packed_rows(self) -> "RunConfig":
        if self.model.doc_mask and self.data.mode != "packed":
            raise ValueError(
                f"model.doc_mask masks attention at the document boundaries inside packed rows, but data.mode is "
                f"{self.data.mode!r}: its rows hold one document each (padding marks the rest), so there is no "
                f"boundary to mask. Drop --doc-mask, or train on packed rows (data.mode packed, the default).")
        return self

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer(cls, value: Any) -> OptimizerConfig:
        return parse_component("optimizer", value)

    @field_validator("callbacks", mode="before")
    @classmethod
    def _callbacks(cls, value: Any) -> list[CallbackConfig]:
        if value is None:
            return []
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"callbacks are a list of names or dicts (e.g. [\"dynamics\"]), not {type(value).__name__}")
        return [parse_component("callback", v) for v in value]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML, TOML or JSON file -> dict (chosen by extension)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"Config file {path} does not exist: check the path given to --config.") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"Config file {path} is not UTF-8 text: give a YAML, TOML or JSON file.") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigFileError(f"Config file {path} has extension {suffix!r}: use .yaml, .yml, .toml or .json.")
    except ConfigFileError:
        raise
    except Exception as exc:
        raise ConfigFileError(f"Config file {path} does not parse as {suffix[1:].upper()}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"Config file {path} must hold a mapping (sections model, data, optimizer, train), "
                              f"not a {type(data).__name__}.")
    return data


# Flat option names (CLI flags) -> their place in the run document.
FLAT_KEYS = {
    **{k: ("model", k) for k in ("model_type", "d_model", "n_head", "d_head", "n_ctx", "d_mlp", "vocab_size",
                                 "dropout", "tie_embeddings", "attention", "mlp", "positional", "norm",
                                 "doc_mask")},
    **{k: ("train", k) for k in TrainConfig.model_fields},
    "dataset": ("data", "dataset"),
    "mode": ("data", "mode"),
    "prepared": ("data", "prepared"),
    "shard_order": ("data", "shard_order"),
    "optimizer": ("optimizer",),
}


DATASET_FLAGS = ("data_files", "tokenizer")  # flat flags that are options of the dataset


def assemble_run_config(file_data: dict | None = None, flags: dict[str, Any] | None = None,
                        assignments: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Combine config file < flags < --set assignments into a validated RunConfig.

    `flags` use flat names (d_model, batch_size, attention, dataset, ...). The model type follows
    the MLP when it is not given: an MLP other than 'none' selects transformer_<N>L.
    """
    if file_data is not None and not isinstance(file_data, dict):
        raise ConfigFileError(f"A run config is a mapping with the sections model, data, optimizer, callbacks, "
                              f"train; got {str(file_data)[:60]!r}.")
    try:
        doc: dict[str, Any] = json.loads(json.dumps(file_data or {}, default=str))
    except (TypeError, ValueError) as exc:
        raise ConfigFileError(f"The config holds something that is not plain data ({exc}): use strings, numbers, "
                              f"booleans, lists and mappings with string keys.") from None
    for key, value in (flags or {}).items():
        if value is None or key in DATASET_FLAGS:  # these go into the dataset's options, below
            continue
        place = FLAT_KEYS.get(key)
        if place is None:
            raise ConfigFileError(f"unknown option {key!r}")
        node = doc
        for part in place[:-1]:
            node = _section(node, part)
        node[place[-1]] = value
    for key in DATASET_FLAGS:
        value = (flags or {}).get(key)
        if value:
            data = _section(doc, "data")
            ds = data.get("dataset", "synthetic")
            if not isinstance(ds, (str, dict)):
                raise ConfigFileError(f"data.dataset must be a dataset name or a mapping with a name, not {ds!r}.")
            ds = {"name": ds} if isinstance(ds, str) else dict(ds)
            ds[key] = value
            data["dataset"] = ds
    doc = apply_overrides(doc, [_qualify(a) for a in assignments])
    model = doc.setdefault("model", {})
    if isinstance(model, dict):  # anything else: RunConfig's validation names the problem
        try:
            reconcile_model_type(model)  # a contradiction of two flags is a config error, said once
        except ValueError as exc:
            raise ConfigFileError(str(exc)) from None
    return RunConfig.model_validate(doc)


def _section(doc: dict[str, Any], name: str) -> dict[str, Any]:
    node = doc.setdefault(name, {})
    if not isinstance(node, dict):
        raise ConfigFileError(f"The config's {name!r} must be a mapping of options, not {node!r}.")
    return node


def _qualify(assignment: str) -> str:
    """`--set d_model=64` means model.d_model; `--set train.x=1` and `--set attention.impl=..` also work."""
    key = assignment.partition("=")[0].strip()
    head = key.split(".")[0]
    if head in ("model", "data", "train", "optimizer", "callbacks"):
        return assignment
    place = FLAT_KEYS.get(head)
    if place is None:
        raise ConfigFileError(f"--set {assignment!r}: unknown option {head!r}. Options live in the sections "
                              f"model, data, optimizer, train (e.g. --set train.warmup=10 or --set d_model=128).")
    return ".".join(place[:-1] + (key,)) + assignment[len(key):]
