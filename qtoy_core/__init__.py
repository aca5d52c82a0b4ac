"""qtoy: polynomial toy transformers you can train, swap and read.

This is the public API: plugin packages import only from here. Names that need torch are loaded
on first use, so `import qtoy_core` (and `qtoy --help`, `qtoy list`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qtoy_registry import (
    DuplicateComponentError,
    PluginError,
    PluginWarning,
    QtoyError,
    UnknownComponentError,
    get_registry,
    hookimpl,
    reset_registry,
)

from .components import (
    AttentionConfig,
    CallbackConfig,
    ComponentConfig,
    DatasetConfig,
    MLPConfig,
    NormConfig,
    OptimizerConfig,
    PositionalConfig,
    parse_component,
)
from .config import ModelConfig, make_model_config, parse_model_type

# name -> module holding it; imported lazily (these modules import torch).
_LAZY = {
    "ToyTransformer": ".model",
    "GenerationCache": ".model",
    "cross_entropy": ".model",
    "Attention": ".interfaces",
    "ProjectedAttention": ".interfaces",
    "MLP": ".interfaces",
    "Positional": ".interfaces",
    "Callback": ".interfaces",
    "HookPoint": ".interfaces",
    "build_optimizer": ".optim",
    "is_hidden_matrix": ".optim",
    "CheckpointError": ".checkpoint",
    "MissingPluginError": ".checkpoint",
}

__all__ = [
    "AttentionConfig", "Callback", "CallbackConfig", "CheckpointError", "ComponentConfig", "DatasetConfig",
    "DuplicateComponentError", "GenerationCache", "HookPoint", "MLP", "MLPConfig", "MissingPluginError",
    "ModelConfig", "NormConfig", "OptimizerConfig", "PluginError", "PluginWarning", "Positional",
    "PositionalConfig", "ProjectedAttention", "QtoyError", "ToyTransformer", "UnknownComponentError",
    "Attention", "build_model", "build_optimizer", "cross_entropy", "get_registry", "hookimpl",
    "is_hidden_matrix", "make_model_config", "parse_component", "parse_model_type", "reset_registry",
]


def build_model(model_type: str | ModelConfig | dict | None = None, **options: Any) -> "ToyTransformer":
    """One line from a description to a model.

    `build_model("transformer_2L", attn="quadratic", mlp="bilinear", d_model=256)` or
    `build_model(ModelConfig(...))`. The config validates completely before any tensor is made.
    """
    from .model import ToyTransformer

    return ToyTransformer(make_model_config(model_type, **options))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qtoy_core' has no attribute {name!r}")


if TYPE_CHECKING:
    from .checkpoint import CheckpointError, MissingPluginError
    from .interfaces import MLP, Attention, Callback, HookPoint, Positional, ProjectedAttention
    from .model import GenerationCache, ToyTransformer, cross_entropy
    from .optim import build_optimizer, is_hidden_matrix
