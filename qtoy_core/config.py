"""`ModelConfig`: the complete, validated description of a `ToyTransformer`.

It validates fully before any tensor exists: sizes, the model type, every component (looked up in
the registry, so plugin components validate exactly like built-ins) and each component's own
compatibility check (`ComponentConfig.check_model`, e.g. RoPE wants an even d_head).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationInfo, field_validator, model_validator

from .components import AttentionConfig, MLPConfig, NormConfig, PositionalConfig, parse_component

MODEL_TYPE_PATTERN = re.compile(r"^(attention_only|transformer)_([1-9][0-9]*)L$")
# Top-level keys of a run folder's / save_pretrained's config.json; ModelConfig reads its "model".
DOCUMENT_KEYS = {"model", "data", "train", "plugins", "qtoy_version", "callbacks", "optimizer", "format"}
# Short spellings accepted by build_model and the CLI.
COMPONENT_ALIASES = {"attn": "attention", "pos": "positional"}


def parse_model_type(model_type: str) -> tuple[int, bool]:
    """`"transformer_2L"` -> (2, True); `"attention_only_1L"` -> (1, False)."""
    match = MODEL_TYPE_PATTERN.match(model_type)
    if not match:
        raise ValueError(
            f"model_type {model_type!r} does not parse: write attention_only_<N>L or transformer_<N>L "
            f"with N >= 1 layers (e.g. attention_only_1L, transformer_2L)"
        )
    return int(match.group(2)), match.group(1) == "transformer"


def model_type_for(n_layers: int, has_mlp: bool) -> str:
    return f"{'transformer' if has_mlp else 'attention_only'}_{n_layers}L"


def reconcile_model_type(model: dict[str, Any]) -> None:
    """The one rule tying `model_type` to `mlp`, applied in place to a model section before it
    validates (by ModelConfig, make_model_config and the CLI's run assembly alike): given only the
    model type, transformers get the bilinear MLP and attention-only models none; given only an MLP
    other than "none", the type is transformer_1L; given both, they must agree (ValueError saying
    which to change). A value that does not parse is left for its own validator to report."""
    mlp = model.get("mlp")
    if isinstance(mlp, str):
        mlp_name = mlp
    elif isinstance(mlp, dict):
        mlp_name = mlp.get("name") if isinstance(mlp.get("name"), str) else None
    else:
        mlp_name = getattr(mlp, "name", None) if mlp is not None else None
    model_type = model.get("model_type")
    if model_type is None:
        if mlp_name is not None:
            model["model_type"] = model_type_for(1, mlp_name != "none")
        return
    try:
        n_layers, has_mlp = parse_model_type(model_type)
    except (ValueError, TypeError):
        return  # the model_type validator says what is wrong
    if mlp is None:
        model["mlp"] = "bilinear" if has_mlp else "none"
    elif mlp_name is not None and has_mlp == (mlp_name == "none"):
        raise ValueError(
            f"model_type {model_type!r} contradicts mlp {mlp_name!r} "
            f"({'this type needs an MLP' if has_mlp else 'this type has no MLP'}): use model_type {model_type_for(n_layers, not has_mlp)!r} (--model-type), or "
            f"{'an MLP such as bilinear' if has_mlp else 'mlp none'} (--mlp), or give only one of the two: "
            f"the other follows")


class ModelConfig(BaseModel):
    """Everything needed to build a `ToyTransformer`; round-trips through JSON exactly."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_type: str = "attention_only_1L"
    vocab_size: int = Field(4096, gt=0)
    d_model: int = Field(256, gt=0)
    n_head: int = Field(4, gt=0)
    d_head: int | None = Field(None, gt=0, description="per-head width; default d_model // n_head")
    n_ctx: int = Field(256, gt=0)
    d_mlp: int | None = Field(None, gt=0, description="MLP hidden width; default 4 * d_model")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    attention: SerializeAsAny[AttentionConfig] = Field(default_factory=lambda: parse_component("attention", "quadratic"))
    mlp: SerializeAsAny[MLPConfig] = Field(default_factory=lambda: parse_component("mlp", "none"))
    positional: SerializeAsAny[PositionalConfig] = Field(default_factory=lambda: parse_component("positional", "rope"))
    norm: SerializeAsAny[NormConfig] = Field(default_factory=lambda: parse_component("norm", "none"))
    # Document masking (packed rows): attention never crosses a document boundary and positions
    # restart at every document (qtoy_core.documents). The model finds the documents from the
    # separator token (the tokenizer's separator_id, and bos_id where it has one; the trainer
    # records them) or takes doc_ids= in its forward.
    doc_mask: bool = False
    doc_separator_id: int | None = Field(None, ge=0, description="token ending a document (doc_mask)")
    doc_bos_id: int | None = Field(None, ge=0, description="token opening a document, when there is one (doc_mask)")

    @model_validator(mode="before")
    @classmethod
    def _read_document(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # A run folder's config.json nests the model config under "model": accept it as is, so
        # `ModelConfig(**json.load(open(run / "config.json")))` works on runs too.
        if isinstance(data.get("model"), dict) and set(data) <= DOCUMENT_KEYS:
            data = data["model"]
        data = dict(data)
        reconcile_model_type(data)
        return data

    @field_validator("model_type")
    @classmethod
    def _check_model_type(cls, value: str) -> str:
        parse_model_type(value)
        return value

    @field_validator("attention", "mlp", "positional", "norm", mode="before")
    @classmethod
    def _component(cls, value: Any, info: ValidationInfo) -> Any:
        """A name, a dict with "name" and options, or a config: the registry gives the config class
        of the component kind named by the field."""
        return parse_component(info.field_name, value)

    @model_validator(mode="after")
    def _resolve_and_check(self) -> "ModelConfig":
        if self.d_head is None:
            if self.d_model % self.n_head:
                raise ValueError(
                    f"d_model {self.d_model} is not divisible by n_head {self.n_head}: choose sizes "
                    f"that divide, or give d_head explicitly"
                )
            self.d_head = self.d_model // self.n_head
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        for component in (self.attention, self.mlp, self.positional, self.norm):
            component.check_model(self)
        for name in ("doc_separator_id", "doc_bos_id"):
            value = getattr(self, name)
            if value is not None and value >= self.vocab_size:
                raise ValueError(f"{name} {value} is not a token of the vocabulary (vocab_size {self.vocab_size}): "
                                 f"give the tokenizer's id, or leave it unset for `qtoy train` to record")
        return self

    @property
    def n_layers(self) -> int:
        return parse_model_type(self.model_type)[0]

    @property
    def has_mlp(self) -> bool:
        return parse_model_type(self.model_type)[1]

    @property
    def is_polynomial(self) -> bool:
        """True when every component is polynomial: the model is an exact polynomial of its input."""
        return all(c.is_polynomial for c in (self.attention, self.mlp, self.positional, self.norm))

    def components(self) -> dict[str, Any]:
        return {"attention": self.attention, "mlp": self.mlp, "positional": self.positional, "norm": self.norm}


def make_model_config(model_type: str | ModelConfig | dict | None = None, **options: Any) -> ModelConfig:
    """`make_model_config("transformer_2L", attn="quadratic", mlp="bilinear", d_model=256)`.

    `attn` and `pos` are accepted for `attention` and `positional`. Naming an MLP other than "none"
    without a model type selects `transformer_1L` (`reconcile_model_type`).
    """
    if isinstance(model_type, ModelConfig):
        if options:
            return ModelConfig.model_validate({**model_type.model_dump(), **_canonical(options)})
        return model_type
    data = dict(model_type) if isinstance(model_type, dict) else {}
    if isinstance(model_type, str):
        data["model_type"] = model_type
    data.update(_canonical(options))
    return ModelConfig.model_validate(data)


def _canonical(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        key = COMPONENT_ALIASES.get(key, key)
        if key in out:
            from .overrides import OverrideError  # a QtoyError (the CLI prints it) and a ValueError

            raise OverrideError(f"option {key!r} given twice (through an alias): give it once")
        out[key] = value
    return out
