"""`run_with_cache`: one forward pass that records the activations at the model's HookPoints.

Hook point names (``{i}`` is the layer; shapes for tokens of shape (batch, time)):

  hook_embed                      (batch, time, d_model)   token embeddings W_E[tokens]
  hook_pos_embed                  (time, d_model)          learned positional embedding (only if one is added)
  blocks.{i}.hook_resid_pre       (batch, time, d_model)   residual stream entering block i
  blocks.{i}.attn.hook_q/_k/_v    (batch, n_head, time, d_head)  queries/keys after the positional rotation
  blocks.{i}.attn.hook_scores     (batch, n_head, time, time)    scaled q.k (quadratic: before the square;
                                                                 bilinear: the product of the two forms)
  blocks.{i}.attn.hook_pattern    (batch, n_head, time, time)    the causal pattern (quadratic: scores**2,
                                                                 zero above the diagonal; softmax: probabilities)
  blocks.{i}.attn.hook_z          (batch, n_head, time, d_head)  pattern @ v, per head
  blocks.{i}.attn.hook_result     (batch, time, n_head, d_model) per-head output z_h @ W_O[h] (computed from
                                                                 hook_z and the weight views; sums to hook_attn_out
                                                                 minus the out_proj bias)
  blocks.{i}.hook_attn_out        (batch, time, d_model)   attention output written to the residual
  blocks.{i}.hook_resid_mid       (batch, time, d_model)   residual after attention
  blocks.{i}.mlp.hook_left/_right (batch, time, d_mlp)     bilinear MLP branches W_l x, W_r x
  blocks.{i}.mlp.hook_hidden      (batch, time, d_mlp)     MLP hidden (bilinear: left * right)
  blocks.{i}.hook_mlp_out         (batch, time, d_model)   MLP output (transformer models only)
  blocks.{i}.hook_resid_post      (batch, time, d_model)   residual leaving block i

Attention computes the explicit (time, time) pattern only when hook_scores or hook_pattern is
recorded (`ProjectedAttention.wants_pattern`); leave them out with ``names_filter`` for long inputs.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..interfaces import HookPoint

__all__ = ["hook_names", "run_with_cache", "RESULT_HOOK"]

RESULT_HOOK = "hook_result"
_Z = re.compile(r"^(.*)\.hook_z$")


def _filter(names_filter: Any) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if callable(names_filter):
        return names_filter
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    allowed = set(names_filter)
    return lambda name: name in allowed


def _result_owners(model: nn.Module) -> dict[str, nn.Module]:
    """attention module path -> module, for attentions whose views give W_O (so hook_result exists)."""
    out = {}
    for name, module in model.named_modules():
        views = getattr(module, "weight_views", None)
        if callable(views) and isinstance(getattr(module, "hook_z", None), HookPoint) and "W_O" in views():
            out[name] = module
    return out


def hook_names(model: nn.Module) -> list[str]:
    """Every name `run_with_cache` can record for this model (HookPoints plus per-head results)."""
    owners = _result_owners(model)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            names.append(name)
            m = _Z.match(name)
            if m and m.group(1) in owners:
                names.append(f"{m.group(1)}.{RESULT_HOOK}")
    return names


def run_with_cache(model: nn.Module, tokens: Tensor, names_filter: Any = None, *, attention_mask: Tensor | None = None,
                   device: str | torch.device | None = None, grad: bool = False,
                   **forward_kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``model(tokens)`` and return ``(logits, cache)``, cache: hook name -> activation.

    ``names_filter``: None (all), a name, a collection of names, or a predicate on names. Recorded
    tensors are detached (moved to ``device`` if given); the pass runs without autograd unless
    ``grad``. Hooks are removed afterwards, also when the forward raises.
    """
    keep = _filter(names_filter)
    owners = _result_owners(model)
    results = {f"{path}.{RESULT_HOOK}": path for path in owners if keep(f"{path}.{RESULT_HOOK}")}
    z_needed = {f"{path}.hook_z" for path in results.values()}
    cache: dict[str, Tensor] = {}
    handles = []

    def save(name: str):
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            t = output.detach()
            cache[name] = t.to(device) if device is not None else t

        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, HookPoint) and (keep(name) or name in z_needed):
                handles.append(module.register_forward_hook(save(name)))
        with torch.set_grad_enabled(grad):
            logits = model(tokens, attention_mask, **forward_kwargs) if attention_mask is not None else \
                model(tokens, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for rname, path in results.items():
        z = cache.get(f"{path}.hook_z")
        if z is None:
            continue
        W_O = owners[path].weight_views()["W_O"].to(z.device, z.dtype)  # (n_head, d_head, d_model)
        cache[rname] = torch.einsum("bhtd,hdm->bthm", z, W_O)
    for name in z_needed:
        if not keep(name):
            cache.pop(name, None)
    return logits, {name: cache[name] for name in hook_names(model) if name in cache}
