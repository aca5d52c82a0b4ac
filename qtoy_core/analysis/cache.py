"""`run_with_cache` and `ActivationCache`: one forward pass that records the model's HookPoints,
in TransformerLens's names and layouts.

Hook point names (``{i}`` is the layer; shapes for tokens of shape (batch, pos)), in the order a
forward pass records them (the cache keeps that order):

  hook_embed                        (batch, pos, d_model)          token embeddings W_E[tokens]
  hook_pos_embed                    (pos, d_model)                 learned positional embedding (only if one is added;
                                                                   TL's has a batch axis)
  blocks.{i}.hook_resid_pre         (batch, pos, d_model)          residual stream entering block i
  blocks.{i}.ln1.hook_scale         (batch, pos, 1)                RMSNorm only: sqrt(mean(x^2) + eps)
  blocks.{i}.ln1.hook_normalized    (batch, pos, d_model)          RMSNorm only: x / scale, before the gain
  blocks.{i}.attn.hook_q / hook_k   (batch, pos, head, d_head)     queries / keys before the positional rotation
  blocks.{i}.attn.hook_rot_q / _k   (batch, pos, head, d_head)     after it (equal to hook_q / hook_k without RoPE)
  blocks.{i}.attn.hook_q2 / ...     (batch, pos, head, d_head)     bilinear attention's second pair: hook_q2,
                                                                   hook_rot_q2, hook_k2, hook_rot_k2
  blocks.{i}.attn.hook_v            (batch, pos, head, d_head)
  blocks.{i}.attn.hook_scores       (batch, head, query_pos, key_pos)  scaled q.k (TL: hook_attn_scores; see below)
  blocks.{i}.attn.hook_pattern      (batch, head, query_pos, key_pos)  the causal pattern z is made of
  blocks.{i}.attn.hook_z            (batch, pos, head, d_head)     pattern @ v, per head
  blocks.{i}.attn.hook_result       (batch, pos, head, d_model)    per-head output z_h @ W_O[h]; sums over heads,
                                                                   plus the out_proj bias, to hook_attn_out
  blocks.{i}.hook_attn_out          (batch, pos, d_model)          attention output written to the residual
  blocks.{i}.hook_resid_mid         (batch, pos, d_model)          residual after attention
  blocks.{i}.mlp.hook_pre           (batch, pos, d_mlp)            gelu MLP: W_in x (TL: mlp.hook_pre)
  blocks.{i}.mlp.hook_left/_right   (batch, pos, d_mlp)            bilinear MLP branches W_l x, W_r x
  blocks.{i}.mlp.hook_hidden        (batch, pos, d_mlp)            MLP hidden (bilinear: left * right; TL: hook_post)
  blocks.{i}.hook_mlp_out           (batch, pos, d_model)          MLP output (transformer models only)
  blocks.{i}.hook_resid_post        (batch, pos, d_model)          residual leaving block i
  ln_final.hook_scale / _normalized                                RMSNorm only, as above

Scores and pattern: quadratic attention's hook_scores is ``q.k / d_head`` (TL's softmax scores are
``q.k / sqrt(d_head)``) and its pattern ``scores**2`` with zeros above the diagonal, not a
probability row; bilinear attention's scores are the product ``(q1.k1/d)(q2.k2/d)`` and its pattern
that product, causal (signed); softmax attention records TL's scores and probabilities. Attention
computes the explicit (pos, pos) pattern only when hook_scores or hook_pattern is recorded or
hooked (`ProjectedAttention.wants_pattern`); leave them out with ``names_filter`` for long inputs.
Likewise hook_result (an extra (batch, pos, head, d_model) tensor) and the RMSNorm hooks are only
computed when asked for, so a plain forward runs the fast kernels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from qtoy_registry import QtoyError

from ..interfaces import HookPoint

__all__ = ["ActivationCache", "CacheKeyError", "act_name", "hook_names", "run_with_cache", "RESULT_HOOK"]

RESULT_HOOK = "hook_result"


class CacheKeyError(QtoyError, KeyError):
    """A cache key or shorthand that names no recorded activation."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


# -- names ----------------------------------------------------------------------------------------
# TransformerLens's get_act_name shorthands, with qtoy's names where they differ.
_ATTN = {"q", "k", "v", "z", "rot_q", "rot_k", "q2", "k2", "rot_q2", "rot_k2", "result", "pattern", "scores"}
_MLP = {"pre", "hidden", "left", "right"}
_ALIASES = {"attn": "pattern", "attn_scores": "scores", "attn_logits": "scores", "key": "k", "query": "q",
            "value": "v", "post": "hidden", "mlp_post": "hidden", "mlp_pre": "pre", "mid": "hidden"}
_LAYER_TYPES = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}
_NORM = {"scale", "normalized"}


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """A shorthand -> a full hook name, as TransformerLens's ``utils.get_act_name``.

    ``act_name("pattern", 0)`` -> ``blocks.0.attn.hook_pattern``; ``act_name("resid_pre", 1)`` ->
    ``blocks.1.hook_resid_pre``; ``act_name("k6")`` -> ``blocks.6.attn.hook_k``;
    ``act_name("scale", 2, "ln1")`` -> ``blocks.2.ln1.hook_scale``; ``act_name("scale")`` ->
    ``ln_final.hook_scale``. qtoy aliases: ``post``/``mlp_post`` -> ``mlp.hook_hidden`` (qtoy's MLP
    hidden), ``attn_scores`` -> ``attn.hook_scores``. A full name is returned unchanged.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    m = re.fullmatch(r"([a-z_]+?)(\d+)([a-z_]\w*)?", name)
    if m is not None and layer is None:
        name, layer, layer_type = m.group(1), int(m.group(2)), m.group(3) or layer_type
    name = _ALIASES.get(name, name)
    if name in _ATTN:
        layer_type = "attn"
    elif name in _MLP:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPES:
        layer_type = _LAYER_TYPES[layer_type]
    full = f"blocks.{layer}." if layer is not None else ""
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in _NORM and layer is None:
        full = f"ln_final.{full}"
    return full


def hook_names(model: nn.Module) -> list[str]:
    """Every name `run_with_cache` and `run_with_hooks` accept for this model, in module order.

    (A forward records them in execution order, which differs where a component registers a hook
    point after others it runs later than, e.g. bilinear attention's hook_q2.)"""
    return [name for name, module in model.named_modules() if isinstance(module, HookPoint)]


def _filter(names_filter: Any) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if callable(names_filter):
        return names_filter
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    allowed = set(names_filter)
    return lambda name: name in allowed


def run_with_cache(model: nn.Module, tokens: Tensor, names_filter: Any = None, *, attention_mask: Tensor | None = None,
                   device: str | torch.device | None = None, grad: bool = False, remove_batch_dim: bool = False,
                   **forward_kwargs: Any) -> tuple[Tensor, "ActivationCache"]:
    """Run ``model(tokens)`` and return ``(logits, cache)``: an `ActivationCache` of hook name ->
    activation, in the order the forward recorded them.

    ``names_filter``: None (all), a name, a collection of names, or a predicate on names. Recorded
    tensors are detached (moved to ``device`` if given); the pass runs without autograd unless
    ``grad``. ``remove_batch_dim``: drop the batch axis (batch size 1 only), as TL. Hooks are
    removed afterwards, also when the forward raises. Hooks already on the model (``model.hooks``)
    run first, so the cache holds their edits.
    """
    keep = _filter(names_filter)
    cache: dict[str, Tensor] = {}
    handles = []

    def save(name: str):
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            t = output.detach()
            cache[name] = t.to(device) if device is not None else t

        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, HookPoint) and keep(name):
                handles.append(module.register_forward_hook(save(name)))
        with torch.set_grad_enabled(grad):
            logits = model(tokens, attention_mask, **forward_kwargs) if attention_mask is not None else \
                model(tokens, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    out = ActivationCache(cache, model)
    if remove_batch_dim:
        out.remove_batch_dim()
    return logits, out


# -- the cache --------------------------------------------------------------------------------------
def _pos(t: Tensor, pos_slice: Any, dim: int) -> Tensor:
    """Apply a position selection (None: all; int: that position, axis dropped; slice; list/tensor)."""
    if pos_slice is None:
        return t
    if isinstance(pos_slice, int):
        return t.select(dim, pos_slice)
    if isinstance(pos_slice, slice):
        index = [slice(None)] * t.dim()
        index[dim] = pos_slice
        return t[tuple(index)]
    idx = torch.as_tensor(pos_slice, device=t.device, dtype=torch.long)
    return t.index_select(dim % t.dim(), idx)


class ActivationCache(Mapping):
    """Recorded activations, as TransformerLens's ``ActivationCache``: a read-only mapping of full
    hook name -> tensor (so ``cache[name]``, ``list(cache)``, ``cache.items()`` work as on a dict),
    plus TL's shorthand keys and residual-stream helpers.

    ``cache["pattern", 0]`` == ``cache["blocks.0.attn.hook_pattern"]``; ``cache["resid_pre", 1]``,
    ``cache["q", 1]``, ``cache["k6"]``, ``cache["scale"]`` (ln_final), negative layers count from the
    end. Residual helpers return stacks of shape (components, batch, pos, d_model) (batch and pos
    as selected); with ``return_labels`` also the list of labels, TL's ("embed", "0_attn_out", "L0H1").
    """

    def __init__(self, cache_dict: dict[str, Tensor], model: nn.Module, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # mapping --------------------------------------------------------------------------------------
    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key if key in self.cache_dict else act_name(key)
        if isinstance(key, tuple) and key and isinstance(key[0], str):
            layer = key[1] if len(key) > 1 else None
            if isinstance(layer, int) and layer < 0:
                layer += self._n_layers()
            return act_name(key[0], layer, key[2] if len(key) > 2 else None)
        raise CacheKeyError(f"cache keys are hook names or (shorthand, layer[, layer type]) tuples, not {key!r}")

    def __getitem__(self, key: Any) -> Tensor:
        name = self._key(key)
        if name not in self.cache_dict:
            import difflib

            close = difflib.get_close_matches(name, list(self.cache_dict), n=4, cutoff=0.6)
            hint = f" Close recorded names: {', '.join(close)}." if close else ""
            raise CacheKeyError(
                f"{key!r} (-> {name!r}) is not in this cache ({len(self.cache_dict)} activations recorded).{hint} "
                f"Record it by leaving it in run_with_cache's names_filter; the names a model has are "
                f"qtoy_core.analysis.hook_names(model).")
        return self.cache_dict[name]

    def __contains__(self, key: Any) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except CacheKeyError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def to(self, device: str | torch.device, move_model: bool = False) -> "ActivationCache":
        """Move every tensor (and the model too with ``move_model``) to ``device``; returns self."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        if move_model:
            self.model.to(device)
        return self

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a batch-of-one cache in place (TL's); returns self."""
        if not self.has_batch_dim:
            return self
        batched = [k for k in self.cache_dict if k != "hook_pos_embed"]
        sizes = {self.cache_dict[k].shape[0] for k in batched}
        if sizes - {1}:
            raise QtoyError(f"remove_batch_dim needs a cache of batch size 1; this one has batch size "
                            f"{max(sizes)}: slice the tokens (tokens[:1]) before run_with_cache")
        for k in batched:
            self.cache_dict[k] = self.cache_dict[k][0]
        self.has_batch_dim = False
        return self

    # model structure ------------------------------------------------------------------------------
    def _n_layers(self) -> int:
        return len(self.model.blocks)

    def _layer(self, layer: int | None) -> int:
        n = self._n_layers()
        if layer is None or layer == -1:
            return n
        if layer < 0:
            layer += n
        if not 0 <= layer <= n:
            raise QtoyError(f"layer {layer} is out of range: the model has {n} layers (0..{n}, {n} = the end)")
        return layer

    def _has_mlp(self, layer: int) -> bool:
        return f"blocks.{layer}.hook_mlp_out" in self.cache_dict or bool(getattr(self.model.blocks[layer], "has_mlp", False))

    def _with_batch(self, t: Tensor, like: Tensor) -> Tensor:
        return t.expand_as(like) if t.shape != like.shape else t

    # TL helpers -----------------------------------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Any = None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream at the start of each layer before ``layer`` (None / -1: all, plus the
        final residual), as TL: (components, batch, pos, d_model). ``incl_mid`` adds each
        resid_mid; ``mlp_input`` adds layer ``layer``'s resid_mid (what its MLP reads). Labels
        "0_pre", "0_mid", ..., "final_post". ``apply_ln``: scaled as the final norm (frozen scale)."""
        n, layer = self._n_layers(), self._layer(layer)
        parts, labels = [], []
        for i in range(layer + 1 if layer < n else n):
            if i < layer:
                parts.append(self[f"blocks.{i}.hook_resid_pre"]); labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self[f"blocks.{i}.hook_resid_mid"]); labels.append(f"{i}_mid")
        if layer == n:
            parts.append(self[f"blocks.{n - 1}.hook_resid_post"]); labels.append("final_post")
        stack = _pos(torch.stack(parts), pos_slice, -2)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: Any = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream entering ``layer`` (None / -1: the final residual) split into what
        wrote it, as TL: embed, pos_embed (when added), then each layer's attn_out and mlp_out
        (``mode`` "attn" / "mlp" keeps one kind). ``mlp_input``: also layer ``layer``'s attn_out.
        In eval mode (no dropout) the components sum exactly to the residual they decompose."""
        if mode not in ("all", "attn", "mlp"):
            raise QtoyError(f"decompose_resid mode must be 'all', 'attn' or 'mlp', not {mode!r}")
        layer = self._layer(layer)
        like = self["hook_embed"]
        parts, labels = [], []
        if incl_embeds:
            parts.append(like); labels.append("embed")
            if "hook_pos_embed" in self.cache_dict:
                parts.append(self._with_batch(self["hook_pos_embed"], like)); labels.append("pos_embed")
        for i in range(layer + (1 if mlp_input and layer < self._n_layers() else 0)):
            if mode in ("all", "attn"):
                parts.append(self[f"blocks.{i}.hook_attn_out"]); labels.append(f"{i}_attn_out")
            if mode in ("all", "mlp") and i < layer and self._has_mlp(i):
                parts.append(self[f"blocks.{i}.hook_mlp_out"]); labels.append(f"{i}_mlp_out")
        stack = _pos(torch.stack(parts), pos_slice, -2)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Any = None, apply_ln: bool = False):
        """Each head's output z_h @ W_O[h] for the layers before ``layer`` (-1 / None: all), as TL:
        (layers * heads, batch, pos, d_model), labels "L{l}H{h}". Needs ``hook_result`` recorded.
        The out_proj biases are not in any head; ``incl_remainder`` adds the rest of the residual
        (labelled "remainder") so that the stack sums to it."""
        layer = self._layer(layer)
        parts, labels = [], []
        for i in range(layer):
            result = self[f"blocks.{i}.attn.{RESULT_HOOK}"]  # (batch, pos, head, d_model)
            for h in range(result.shape[-2]):
                parts.append(result[..., h, :]); labels.append(f"L{i}H{h}")
        if not parts:
            raise QtoyError("stack_head_results(layer=0) has no heads to stack: pass a layer >= 1 (or -1 for all)")
        stack = torch.stack(parts)
        if incl_remainder:
            resid = self[f"blocks.{layer}.hook_resid_pre"] if layer < self._n_layers() else \
                self[f"blocks.{layer - 1}.hook_resid_post"]
            stack = torch.cat([stack, (resid - stack.sum(0))[None]]); labels.append("remainder")
        stack = _pos(stack, pos_slice, -2)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False, apply_ln: bool = False,
                                     pos_slice: Any = None, return_labels: bool = False):
        """The finest exact split TL offers: embed, pos_embed, every head's result, each layer's
        attention bias (when there is one, "{l}_attn_bias"), every MLP output, for the layers before
        ``layer``. Sums exactly to the residual `decompose_resid` decomposes (no dropout)."""
        layer = self._layer(layer)
        like = self["hook_embed"]
        parts, labels = [like], ["embed"]
        if "hook_pos_embed" in self.cache_dict:
            parts.append(self._with_batch(self["hook_pos_embed"], like)); labels.append("pos_embed")
        for i in range(layer + (1 if mlp_input and layer < self._n_layers() else 0)):
            result = self[f"blocks.{i}.attn.{RESULT_HOOK}"]
            for h in range(result.shape[-2]):
                parts.append(result[..., h, :]); labels.append(f"L{i}H{h}")
            rest = self[f"blocks.{i}.hook_attn_out"] - result.sum(-2)  # the out_proj bias, broadcast
            if rest.abs().max() > 0:
                parts.append(rest); labels.append(f"{i}_attn_bias")
            if i < layer and self._has_mlp(i):
                parts.append(self[f"blocks.{i}.hook_mlp_out"]); labels.append(f"{i}_mlp_out")
        stack = _pos(torch.stack(parts), pos_slice, -2)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _norm(self, layer: int, mlp_input: bool) -> tuple[str, nn.Module]:
        if layer >= self._n_layers():
            return "ln_final", self.model.ln_final
        name = f"blocks.{layer}.{'ln2' if mlp_input else 'ln1'}"
        return name, self.model.get_submodule(name)

    def apply_ln_to_stack(self, residual_stack: Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: Any = None, batch_slice: Any = None, has_batch_dim: bool = True) -> Tensor:
        """Divide each component by the norm's scale frozen at this input, as TL (the gain is not
        applied: TL folds it into the next weights; `logit_attrs` folds it into W_U). The norm is the
        one read at ``layer`` (None / -1 / n_layers: ln_final; else ln1, or ln2 with ``mlp_input``).

        No norm (an ``nn.Identity``): the stack is returned unchanged. A norm with a ``hook_scale``
        HookPoint (RMSNorm): divided by that recorded (batch, pos, 1) scale, so a sum of scaled
        components is exactly the normalised residual before the gain. Any other norm: an error."""
        name, norm = self._norm(self._layer(layer), mlp_input)
        if isinstance(norm, nn.Identity):
            return residual_stack
        if not isinstance(getattr(norm, "hook_scale", None), HookPoint):
            raise QtoyError(f"{name} ({type(norm).__name__}) records no hook_scale, so its scale cannot be frozen: "
                            f"apply_ln_to_stack works for no norm and for norms with a hook_scale HookPoint (RMSNorm)")
        scale = self[f"{name}.hook_scale"]
        if self.has_batch_dim and batch_slice is not None:
            scale = scale[batch_slice]
        scale = _pos(scale, pos_slice, -2)
        return residual_stack / scale

    def logit_attrs(self, residual_stack: Tensor, tokens: int | Tensor, incorrect_tokens: int | Tensor | None = None,
                    pos_slice: Any = None, batch_slice: Any = None, has_batch_dim: bool = True) -> Tensor:
        """Each component's direct contribution to the logit of ``tokens`` (minus that of
        ``incorrect_tokens``), as TL: the components are scaled by ln_final's frozen scale and read
        along W_U[token] * ln_final's gain (TL's folded ``tokens_to_residual_directions``). Shape:
        the stack's without d_model. ``tokens``: an int or a tensor broadcasting against the
        stack's (batch, pos) or (batch,) axes. With no norm, or a frozen RMSNorm scale, the attributions
        of `decompose_resid()` sum exactly to the logit (difference)."""
        directions = self._directions(tokens)
        if incorrect_tokens is not None:
            directions = directions - self._directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice)
        return (scaled * directions).sum(-1)

    def _directions(self, tokens: int | Tensor) -> Tensor:
        W_U = self.model.unembed.weight.detach()  # (vocab, d_model)
        gain = getattr(self.model.ln_final, "weight", None)
        if gain is not None:
            W_U = W_U * gain.detach()
        tokens = torch.as_tensor(tokens, device=W_U.device, dtype=torch.long)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= W_U.shape[0]):
            raise QtoyError(f"token ids must be in 0..{W_U.shape[0] - 1} (the model's vocabulary), got "
                            f"{tokens.min().item()}..{tokens.max().item()}")
        return W_U[tokens]
