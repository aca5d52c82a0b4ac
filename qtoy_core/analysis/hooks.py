"""Interventions: run the model with functions attached to its hook points, as TransformerLens's
``run_with_hooks`` / ``hooks()`` / ``add_hook`` / ``reset_hooks``.

    def zero_head_2(z, hook):            # z: (batch, pos, head, d_head), TL's layout
        z[:, :, 2] = 0.0
        return z                         # or return a new tensor of the same shape; None keeps it
    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_2)])
    with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_pattern"), fn)]):
        logits, cache = model.run_with_cache(tokens)      # the cache holds the edited activations

A hook function is called as ``fn(activation, hook=hook_point)`` (``hook.name``, ``hook.layer()``)
with the activation in the layout the cache shows (see `qtoy_core.analysis.cache`); its return
value, if not None, replaces the activation and must have the same shape. Editing ``hook_result``
changes the attention output (it is then computed as the sum of the per-head results), editing
``hook_q``/``hook_k`` changes what is rotated, ``hook_rot_q``/``hook_rot_k`` what is scored.
Hooks are removed when the call (or the ``with`` block) ends, also when the forward raises.
Only forward hooks exist (TL's ``bwd_hooks`` are not supported).
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import Tensor, nn

from qtoy_registry import QtoyError

from ..interfaces import HookPoint

__all__ = ["HookFn", "HookShapeError", "UnknownHookError", "add_hook", "hooks", "reset_hooks", "resolve_hook_points",
           "run_with_hooks"]

HookFn = Callable[..., Union[Tensor, None]]
NameOrPredicate = Union[str, Callable[[str], bool]]

# handles of hooks added with reset_hooks_end=False / add_hook, kept per model so reset_hooks removes them
_KEPT = "_qtoy_kept_hook_handles"


class UnknownHookError(QtoyError, ValueError):
    """A hook name that is not a hook point of the model."""


class HookShapeError(QtoyError, ValueError):
    """A hook function returned a tensor of another shape than the activation it replaces."""


def _points(model: nn.Module) -> dict[str, HookPoint]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


def resolve_hook_points(model: nn.Module, name_or_predicate: NameOrPredicate) -> list[tuple[str, HookPoint]]:
    """The hook points a name selects (a full name such as "blocks.0.attn.hook_z", or TL's compact
    shorthand such as "z0"), or all those a predicate on names accepts. An unknown name is one
    `UnknownHookError` listing the close names."""
    points = _points(model)
    if callable(name_or_predicate):
        return [(n, p) for n, p in points.items() if name_or_predicate(n)]
    if not isinstance(name_or_predicate, str):
        raise UnknownHookError(f"a hook is given as (name or predicate, function); got {name_or_predicate!r} "
                               f"({type(name_or_predicate).__name__}) in place of the name")
    from .cache import act_name

    name = name_or_predicate if name_or_predicate in points else act_name(name_or_predicate)
    if name not in points:
        close = difflib.get_close_matches(name, list(points), n=5, cutoff=0.5)
        hint = f"Close names: {', '.join(close)}." if close else \
            f"This model's hook points: {', '.join(list(points)[:12])}{', ...' if len(points) > 12 else ''}."
        raise UnknownHookError(
            f"{name_or_predicate!r} is not a hook point of this model. {hint} "
            f"qtoy_core.analysis.hook_names(model) lists them all (qtoy's names are TransformerLens's; "
            f"see docs/analysis.md for the few that differ, e.g. hook_scores, mlp.hook_hidden).")
    return [(name, points[name])]


def _wrap(fn: HookFn, point: HookPoint, name: str):
    if point.name is None:
        point.name = name

    def forward_hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        new = fn(output, hook=module)
        if new is None:
            return None
        if not isinstance(new, Tensor) or new.shape != output.shape:
            shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise HookShapeError(
                f"the hook function {getattr(fn, '__name__', fn)!r} on {name} returned {shape} for an activation "
                f"of shape {tuple(output.shape)}: return a tensor of the same shape (in the cache's layout, "
                f"e.g. (batch, pos, head, d_head) for hook_z), or None to keep the activation")
        return new

    return forward_hook


def _add(model: nn.Module, fwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]]) -> list[Any]:
    fwd_hooks = list(fwd_hooks)
    plan = []
    for item in fwd_hooks:  # resolve every name before adding any hook, so a typo adds nothing
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
            raise UnknownHookError(f"fwd_hooks takes (name or predicate, function) pairs; got {item!r}")
        plan += [(name, point, item[1]) for name, point in resolve_hook_points(model, item[0])]
    return [point.register_forward_hook(_wrap(fn, point, name)) for name, point, fn in plan]


def add_hook(model: nn.Module, name: NameOrPredicate, hook: HookFn) -> None:
    """Attach ``hook`` until `reset_hooks` (TL's ``model.add_hook(name, hook)``, forward only)."""
    model.__dict__.setdefault(_KEPT, []).extend(_add(model, [(name, hook)]))


def reset_hooks(model: nn.Module) -> None:
    """Remove every hook `add_hook` or ``reset_hooks_end=False`` left on the model."""
    for handle in model.__dict__.pop(_KEPT, []):
        handle.remove()


@contextlib.contextmanager
def hooks(model: nn.Module, fwd_hooks: Sequence[tuple[NameOrPredicate, HookFn]] = (),
          reset_hooks_end: bool = True) -> Iterator[nn.Module]:
    """``with hooks(model, fwd_hooks=[...]):`` the hooks are attached inside the block and removed
    at its end, also on an exception (unless ``reset_hooks_end=False``: then `reset_hooks` removes
    them). Yields the model."""
    handles = _add(model, fwd_hooks)
    try:
        yield model
    finally:
        if reset_hooks_end:
            for handle in handles:
                handle.remove()
        else:
            model.__dict__.setdefault(_KEPT, []).extend(handles)


def run_with_hooks(model: nn.Module, tokens: Tensor, fwd_hooks: Sequence[tuple[NameOrPredicate, HookFn]] = (),
                   reset_hooks_end: bool = True, *, attention_mask: Tensor | None = None, grad: bool = True,
                   **forward_kwargs: Any) -> Tensor:
    """``model(tokens)`` with ``fwd_hooks`` attached: the logits (batch, pos, vocab). Autograd is on
    unless ``grad=False`` (TL runs with whatever grad mode is set; so does qtoy by default)."""
    with hooks(model, fwd_hooks, reset_hooks_end=reset_hooks_end):
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if attention_mask is not None:
                return model(tokens, attention_mask, **forward_kwargs)
            return model(tokens, **forward_kwargs)
