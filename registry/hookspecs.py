"""The plugin contract: one `register_<kind>s(register)` hook per component kind.

A plugin module implements any of these with `@hookimpl` and calls `register(ConfigClass,
implementation, description=...)` once per component. Built-in components use exactly the same
hooks and the same `qtoy` entry-point group as third-party packages.

`implementation` is the thing the config builds (an `nn.Module` class, an optimizer factory, a
dataset factory, a callback class), or a lazy reference string ``"package.module:attr"`` so that
listing components never has to import torch.
"""

import pluggy

PROJECT_NAME = "qtoy"
ENTRY_POINT_GROUP = "qtoy"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# kind -> hook name. The order is the order `qtoy list` shows kinds in.
KIND_HOOKS = {
    "attention": "register_attentions",
    "mlp": "register_mlps",
    "positional": "register_positionals",
    "norm": "register_norms",
    "optimizer": "register_optimizers",
    "dataset": "register_datasets",
    "callback": "register_callbacks",
}


@hookspec
def register_attentions(register):
    """Register attention mechanisms: ``register(ConfigClass, ModuleClass, description=...)``.

    The module is built as ``ModuleClass(model_config, attention_config, layer)`` and follows
    ``qtoy_core.interfaces.Attention``.
    """


@hookspec
def register_mlps(register):
    """Register MLPs: built as ``ModuleClass(model_config, mlp_config)`` (``qtoy_core.interfaces.MLP``)."""


@hookspec
def register_positionals(register):
    """Register positional encodings: built as ``ModuleClass(model_config, positional_config)``
    (``qtoy_core.interfaces.Positional``)."""


@hookspec
def register_norms(register):
    """Register normalisation layers: built as ``ModuleClass(model_config, norm_config)``."""


@hookspec
def register_optimizers(register):
    """Register optimizers: ``factory(named_parameters, optimizer_config) -> torch.optim.Optimizer``."""


@hookspec
def register_datasets(register):
    """Register datasets: ``factory(dataset_config) -> qtoy_core.data.TextDataset``."""


@hookspec
def register_callbacks(register):
    """Register training callbacks: built as ``CallbackClass(callback_config)``
    (``qtoy_core.interfaces.Callback``)."""
