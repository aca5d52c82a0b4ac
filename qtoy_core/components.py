"""Config base classes for each component kind (pydantic only: importing this never loads torch).

A component is a pair: a config class deriving from one of these, with `name: Literal["..."]` and
`extra="forbid"`, and the thing it builds (see `qtoy_core.interfaces`). Configs check their own
compatibility with the model through `check_model`, so the model config validates completely,
without any if/elif over component names, before a tensor is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from qtoy_registry import QtoyError, get_registry

if TYPE_CHECKING:
    from .config import ModelConfig


class ComponentConfig(BaseModel):
    """Base of every component config. Subclasses declare `name: Literal["<name>"] = "<name>"`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: ClassVar[str] = ""  # set per kind below

    name: str

    def check_model(self, model: "ModelConfig") -> None:
        """Raise ValueError with a clear message when this component cannot work in `model`."""

    @property
    def is_polynomial(self) -> bool:
        """True when the component is an exact polynomial map (analysable as a tensor network)."""
        return False


class AttentionConfig(ComponentConfig):
    kind: ClassVar[str] = "attention"


class MLPConfig(ComponentConfig):
    kind: ClassVar[str] = "mlp"


class PositionalConfig(ComponentConfig):
    kind: ClassVar[str] = "positional"


class NormConfig(ComponentConfig):
    kind: ClassVar[str] = "norm"


class OptimizerConfig(ComponentConfig):
    kind: ClassVar[str] = "optimizer"
    lr: float = 1e-3
    weight_decay: float = 0.0


class DatasetConfig(ComponentConfig):
    kind: ClassVar[str] = "dataset"


class CallbackConfig(ComponentConfig):
    kind: ClassVar[str] = "callback"


KIND_BASES: dict[str, type[ComponentConfig]] = {
    cls.kind: cls
    for cls in (AttentionConfig, MLPConfig, PositionalConfig, NormConfig, OptimizerConfig,
                DatasetConfig, CallbackConfig)
}


def parse_component(kind: str, value: Any) -> ComponentConfig:
    """A bare name ("quadratic"), a dict with "name" and options, or a config instance -> config.

    The registry supplies the config class, so plugin components validate exactly like built-ins.
    """
    if isinstance(value, ComponentConfig):
        if value.kind != kind:
            raise ValueError(f"expected a {kind} config, got a {value.kind} config ({value.name!r})")
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ValueError(f"a {kind} is given as a name (e.g. \"{_example(kind)}\") or a dict with a "
                         f"\"name\" key and options, not {type(value).__name__}")
    if "name" not in value:
        raise ValueError(f"the {kind} dict needs a \"name\" key (e.g. {{\"name\": \"{_example(kind)}\"}})")
    if not isinstance(value["name"], str):
        raise ValueError(f"the {kind} name must be a string (e.g. \"{_example(kind)}\"), not {value['name']!r}")
    try:
        component = get_registry().get(kind, value["name"])
    except QtoyError as exc:  # re-raised as ValueError so pydantic reports it with its location
        raise ValueError(str(exc)) from None
    config_class = component.config_class
    if not issubclass(config_class, KIND_BASES[kind]):
        raise ValueError(f"plugin {component.provider} registered {config_class.__name__} as a {kind}, "
                         f"but it does not derive from qtoy_core.{KIND_BASES[kind].__name__}")
    return config_class.model_validate(value)


def _example(kind: str) -> str:
    names = get_registry().names(kind)
    return names[0] if names else "name"
