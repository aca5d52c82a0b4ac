"""Parameter grouping shared by optimizers, and `build_optimizer` through the registry."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .components import OptimizerConfig, parse_component
from .registry_access import component_implementation

# Parameters that are not hidden matrices even though they are 2-D: token and position embeddings
# and the unembedding map vocabulary <-> residual stream rather than stream -> stream.
NON_HIDDEN_PREFIXES = ("embed.", "unembed.", "positional.")


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside the blocks (attention and MLP matrices): what Muon orthogonalises."""
    return param.ndim == 2 and not name.startswith(NON_HIDDEN_PREFIXES)


# Devices with a fused (single-kernel) AdamW in torch: one pass over each parameter instead of a
# chain of foreach ops. On the 2-core CPU it made the default training step ~3% faster
# (benchmarks/README.md); numerically it is the same update up to float rounding.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def use_fused_adamw(setting: bool | None, params: Iterable[torch.Tensor]) -> bool:
    """Whether to build AdamW with ``fused=True``: as set, or (None) when every parameter is a
    floating tensor on a device with a fused kernel."""
    if setting is not None:
        return setting
    params = list(params)
    return bool(params) and all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict(state_dict)``, keeping the implementation switches (``fused``,
    ``foreach``) the optimizer was built with: torch restores them from the checkpoint's groups, so
    a run saved unfused would resume unfused, and a fused checkpoint would override ``fused: false``."""
    switches = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, kept in zip(optimizer.param_groups, switches):
        group.update(kept)


def unique_named_parameters(named: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters, each once (tied weights appear under their first name)."""
    seen, out = set(), []
    for name, p in named:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def build_optimizer(model: nn.Module, config: OptimizerConfig | str | dict) -> torch.optim.Optimizer:
    config = parse_component("optimizer", config)
    factory = component_implementation(config)
    return factory(unique_named_parameters(model.named_parameters()), config)
