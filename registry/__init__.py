"""qtoy's plugin registry (installed as `qtoy_registry`): hook specifications, entry-point loading
with per-plugin isolation, and the table of registered components. No torch import here."""

from .errors import (
    DuplicateComponentError,
    PluginError,
    PluginWarning,
    QtoyError,
    UnknownComponentError,
)
from .hookspecs import ENTRY_POINT_GROUP, KIND_HOOKS, hookimpl, hookspec
from .registry import Component, PluginInfo, Provider, Registry, get_registry, reset_registry

__all__ = [
    "Component", "DuplicateComponentError", "ENTRY_POINT_GROUP", "KIND_HOOKS", "PluginError",
    "PluginInfo", "PluginWarning", "Provider", "QtoyError", "Registry", "UnknownComponentError",
    "get_registry", "hookimpl", "hookspec", "reset_registry",
]
