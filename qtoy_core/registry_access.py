"""Building torch objects from component configs through the registry (one place, no name checks)."""

from __future__ import annotations

from typing import Any

from qtoy_registry import get_registry

from .components import ComponentConfig


def component_implementation(config: ComponentConfig) -> Any:
    """The registered implementation (class or factory) behind a component config."""
    return get_registry().get(config.kind, config.name).load()


def build_component(config: ComponentConfig, *args: Any) -> Any:
    """`Implementation(*args, config)`: modules receive (model_config, component_config, ...)."""
    impl = component_implementation(config)
    if args:
        model_config, *rest = args
        return impl(model_config, config, *rest)
    return impl(config)
