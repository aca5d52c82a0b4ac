"""What each buildable component must provide (torch side; configs live in `components.py`).

Components are plain `nn.Module`s with documented constructor and forward signatures. The model
never branches on a component's name: it calls these methods and nothing else.

Stable submodule names (hooks and checkpoints rely on them), for a model with layers i:
  embed                      nn.Embedding (vocab, d_model): W_E
  positional                 the positional encoding (learned: positional.W_pos)
  blocks.{i}.ln1             norm before attention
  blocks.{i}.attn            attention; its residual write is blocks.{i}.attn.out_proj
  blocks.{i}.ln2             norm before the MLP   (transformer types only)
  blocks.{i}.mlp             MLP; its residual write is blocks.{i}.mlp.out_proj
  ln_final                   final norm
  unembed                    nn.Linear (d_model -> vocab): W_U, tied to embed.weight by default
Hook points (`HookPoint` modules) inside blocks: blocks.{i}.hook_resid_pre, hook_attn_out,
hook_resid_mid, hook_mlp_out, hook_resid_post; in attention: attn.hook_q, hook_k (before the
positional rotation), hook_rot_q, hook_rot_k (after it), hook_v, hook_scores, hook_pattern, hook_z,
hook_result (bilinear attention adds hook_q2, hook_k2, hook_rot_q2, hook_rot_k2); in the MLPs:
mlp.hook_hidden (bilinear also hook_left, hook_right; gelu also hook_pre); RMSNorm: hook_scale,
hook_normalized. Layouts are TransformerLens's (see `qtoy_core.analysis.cache`).
"""

from __future__ import annotations

import abc

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import ModelConfig


class HookPoint(nn.Identity):
    """An identity that names an activation, so `run_with_cache` and forward hooks can read it.

    A forward hook on it (``register_forward_hook``, or `ToyTransformer.run_with_hooks`) sees the
    activation in TransformerLens's layout and may return a replacement in that same layout.
    ``heads_first=True`` is for tensors its owner computes as (batch, head, pos, d_head), the layout
    the attention kernels want: hooks then see (batch, pos, head, d_head) and a replacement is turned
    back. The owner passes such tensors through `run(x)`, which returns x untouched (no transpose,
    no copy) when nothing hooks the point, so the fast kernels see exactly what they saw before.
    ``name`` is the point's full name in the model (set by `ToyTransformer`), as in TL.
    """

    def __init__(self, heads_first: bool = False):
        super().__init__()
        self.heads_first = heads_first
        self.name: str | None = None

    def is_hooked(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def run(self, x: Tensor) -> Tensor:
        """x in the owner's layout -> x after the hooks, in the owner's layout."""
        if not self.is_hooked():
            return x
        if not self.heads_first:
            return self(x)
        return self(x.transpose(1, 2)).transpose(1, 2)

    def layer(self) -> int:
        """The block index in the point's name (``blocks.3.attn.hook_z`` -> 3), as TL's ``hook.layer()``."""
        parts = (self.name or "").split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ValueError(f"hook point {self.name!r} is not inside a block, so it has no layer")
        return int(parts[1])


class Positional(nn.Module):
    """Positional encoding. Built as `Cls(model_config, positional_config)`.

    `embed` returns a term added to the residual stream (learned embeddings) or None; `rotate`
    transforms queries and keys (RoPE) and is the identity otherwise.
    """

    #: Capability: with document masking (`ModelConfig.doc_mask`) positions restart at every
    #: document, so `embed` and `rotate` get ``positions`` (batch, time), each token's position in
    #: its own document, instead of (time,). A positional that handles both sets this True; a model
    #: with document masking refuses one that does not (it could not place the documents alone).
    supports_doc_mask: bool = False

    def embed(self, positions: Tensor) -> Tensor | None:
        return None

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (batch, heads, time, d_head); positions: (time,) absolute positions, or (batch, time)
        with document masking (see `supports_doc_mask`)."""
        return x


class Attention(nn.Module):
    """Causal attention. Built as `Cls(model_config, attention_config, layer)`.

    forward(x, *, positional, positions, attention_mask=None, state=None) -> (batch, time, d_model)
      x: (batch, time, d_model); positions: (time,) absolute positions of x's tokens;
      attention_mask: (batch, keys) 1 for real tokens, 0 for padding (keys include cached ones);
      state: a dict the module owns during cached generation (None when not generating).
    Must own `out_proj` (the linear map writing to the residual stream; zero-initialised).
    Optional capability: `tensor_network(...)` (see qtoy_core.analysis).

    Capability `supports_doc_mask` (default False): forward also takes ``doc_ids`` (batch, time)
    int, each token's document (numbered on across cached calls; nondecreasing along a row), and
    a query then sees only keys of its own document, cached ones included (the model passes it only
    when document masking is on, and refuses an attention without the capability then).
    """

    out_proj: nn.Linear
    supports_doc_mask: bool = False


class MLP(nn.Module):
    """Position-wise MLP. Built as `Cls(model_config, mlp_config)`; forward(x) -> same shape.
    Must own `out_proj` (zero-initialised), or set it to None when it writes nothing."""

    out_proj: nn.Linear | None


class Callback:
    """A training callback. Built as `Cls(callback_config)`; override any of these."""

    def on_train_start(self, trainer: Any) -> None: ...
    def on_before_optimizer_step(self, trainer: Any) -> None:
        """Gradients are computed (and clipped) and not yet applied: the place to read them."""

    def on_step_end(self, trainer: Any, metrics: dict) -> None: ...
    def on_eval_end(self, trainer: Any, metrics: dict) -> None: ...
    def on_checkpoint(self, trainer: Any, path: Any) -> None: ...
    def on_samples(self, trainer: Any, samples: list[dict]) -> None:
        """After an evaluation: the generations from the run's fixed prompts (also in samples.jsonl),
        each {"step", "tokens", "prompt", "text"}."""

    def on_log(self, trainer: Any, record: dict, source: str) -> None:
        """A record written to one of the run folder's logs through `Trainer.log_record` (source: the
        file's name, e.g. "dynamics.jsonl"): how a callback's own metrics reach experiment trackers."""

    def on_train_end(self, trainer: Any, summary: dict) -> None: ...

    @staticmethod
    def plot_panels(run: Any) -> list:
        """Panels this callback adds to `qtoy plot RUN` (read from what it wrote into the run folder
        ``run``, a Path): a list of functions ``draw(ax)`` on a matplotlib Axes, one per row, x = step.
        Called on the class (no instance, no config) after training; [] draws nothing."""
        return []


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(batch, time, heads * d_head) -> (batch, heads, time, d_head)."""
    b, t, _ = x.shape
    return x.view(b, t, n_head, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(batch, heads, time, d_head) -> (batch, time, heads * d_head)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def key_padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(batch, keys) 0/1 -> bool, or None when there is no padding."""
    if attention_mask is None:
        return None
    return attention_mask.to(torch.bool)


class ProjectedAttention(Attention, metaclass=abc.ABCMeta):
    """Shared plumbing for multi-head attentions with per-head q, k, v projections.

    Owns q_proj, k_proj, v_proj (d_model -> n_head * d_head), out_proj (back to d_model) and the
    hook points; subclasses implement `mix(q, k, v, key_mask, state)` -> z (batch, heads, time, d_head).
    With `supports_doc_mask` set, mix also gets ``doc_ids=`` (batch, time) for the new tokens (a
    cached mix keeps the cached keys' documents in its state, as it keeps their keys).

    Hook points: a projection ``<c>_proj`` passed through `heads` is recorded at ``hook_<c>`` before
    the positional rotation and at ``hook_rot_<c>`` after it, when the module has those HookPoints
    (q and k have both, v only ``hook_v``; a subclass with more projections adds its own, e.g.
    bilinear attention's ``hook_q2``/``hook_rot_q2``). ``hook_result`` holds the per-head outputs
    z_h @ W_O[h] (batch, pos, head, d_model); when it is hooked the output is computed as their sum
    (plus the out_proj bias), so an edit there changes what the layer writes.
    """

    def __init__(self, model: "ModelConfig", config: Any, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.d_head = model.n_head, model.d_head
        inner = model.n_head * model.d_head
        bias = getattr(config, "bias", False)
        self.q_proj = nn.Linear(model.d_model, inner, bias=bias)
        self.k_proj = nn.Linear(model.d_model, inner, bias=bias)
        self.v_proj = nn.Linear(model.d_model, inner, bias=bias)
        self.out_proj = nn.Linear(inner, model.d_model, bias=bias)
        # Registered in execution order (q, rot_q, k, rot_k, v, ..., z, result) so that module order
        # and the order a forward records them agree.
        self.hook_q, self.hook_rot_q = HookPoint(heads_first=True), HookPoint(heads_first=True)
        self.hook_k, self.hook_rot_k = HookPoint(heads_first=True), HookPoint(heads_first=True)
        self.hook_v = HookPoint(heads_first=True)
        self.hook_scores, self.hook_pattern = HookPoint(), HookPoint()
        self.hook_z, self.hook_result = HookPoint(heads_first=True), HookPoint()

    def heads(self, proj: nn.Linear, x: Tensor, positional: Positional | None, positions: Tensor) -> Tensor:
        """Project x and split heads; rotate when `positional` is given (queries and keys). The heads
        pass the projection's hook points: ``hook_<c>`` before the rotation, ``hook_rot_<c>`` after."""
        stem = next((n.removesuffix("_proj") for n, m in self._modules.items() if m is proj), None)
        pre = getattr(self, f"hook_{stem}", None) if stem else None
        rot = getattr(self, f"hook_rot_{stem}", None) if stem else None
        h = split_heads(proj(x), self.n_head)
        if isinstance(pre, HookPoint):
            h = pre.run(h)
        if positional is None:
            return h
        h = positional.rotate(h, positions)
        return rot.run(h) if isinstance(rot, HookPoint) else h

    def forward(self, x: Tensor, *, positional: Positional, positions: Tensor,
                attention_mask: Tensor | None = None, state: dict | None = None,
                doc_ids: Tensor | None = None) -> Tensor:
        q = self.heads(self.q_proj, x, positional, positions)
        k = self.heads(self.k_proj, x, positional, positions)
        v = self.heads(self.v_proj, x, None, positions)
        # doc_ids reaches mix only with document masking on: a mix that declares the capability
        # (`supports_doc_mask`) takes it as a keyword
        docs = {} if doc_ids is None else {"doc_ids": doc_ids}
        z = self.mix(q, k, v, key_padding_mask(attention_mask), state, x=x, positional=positional,
                     positions=positions, **docs)
        z = self.hook_z.run(z)
        if not self.hook_result.is_hooked():
            return self.out_proj(merge_heads(z))
        # Per-head results, (batch, pos, head, d_model); the layer writes their (possibly edited) sum.
        W_O = self.out_proj.weight.view(-1, self.n_head, self.d_head)  # (d_model, head, d_head)
        result = self.hook_result(torch.einsum("bhtd,mhd->bthm", z, W_O))
        out = result.sum(2)
        return out + self.out_proj.bias if self.out_proj.bias is not None else out

    @abc.abstractmethod
    def mix(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: dict | None,
            **inputs: Any) -> Tensor:
        """Combine per-head queries, keys and values into z (batch, heads, time, d_head)."""

    def wants_pattern(self) -> bool:
        """True when a hook reads scores or pattern, so the explicit (T, T) form must be computed."""
        return bool(self.hook_scores._forward_hooks or self.hook_pattern._forward_hooks)

    def weight_views(self) -> dict[str, Any]:
        """Per-head weights in TransformerLens orientation, for `qtoy_core.analysis` (detached views).

        ``W_Q``, ``W_K``, ``W_V``: (n_head, d_model, d_head) with q_h = x @ W_Q[h]; ``W_O``:
        (n_head, d_head, d_model) with out = sum_h z_h @ W_O[h]; ``b_Q``/``b_K``/``b_V`` (n_head,
        d_head) and ``b_O`` (d_model) when the projections have biases. ``qk``: the scaled forms
        ``scale * (x_q W_q)(x_k W_k)^T`` as (query view, key view, scale) triples whose product is
        the causal, unnormalised pattern when ``pattern`` is "product" (from ``qk_factors()``; a
        repeated triple is a square, as in quadratic attention); otherwise ``pattern`` is "other"
        and the one form listed is the pre-normalisation score (e.g. softmax attention).
        """
        def split(proj: nn.Linear) -> Tensor:  # (n_head * d_head, d_model) rows -> (n_head, d_model, d_head)
            return proj.weight.detach().view(self.n_head, self.d_head, -1).transpose(1, 2)

        names = {id(m): "W_" + n.removesuffix("_proj").upper() for n, m in self.named_children()
                 if isinstance(m, nn.Linear) and m is not self.out_proj}
        views: dict[str, Any] = {f"W_{c}": split(getattr(self, f"{c.lower()}_proj")) for c in "QKV"}
        views["W_O"] = self.out_proj.weight.detach().view(-1, self.n_head, self.d_head).permute(1, 2, 0)
        for c in "QKV":
            bias = getattr(self, f"{c.lower()}_proj").bias
            if bias is not None:
                views[f"b_{c}"] = bias.detach().view(self.n_head, self.d_head)
        if self.out_proj.bias is not None:
            views["b_O"] = self.out_proj.bias.detach()
        factors = getattr(self, "qk_factors", None)
        if callable(factors):
            views["qk"] = [(names[id(q)], names[id(k)], float(s)) for q, k, s in factors()]
            views["pattern"] = "product"
        else:
            views["qk"] = [("W_Q", "W_K", self.d_head ** -0.5)]
            views["pattern"] = "other"
        return views


def append_to_cache(state: dict, **tensors: Tensor) -> list[Tensor]:
    """Concatenate new keys/values onto those cached in `state` (along time) and return them all."""
    out = []
    for name, t in tensors.items():
        if name in state:
            t = torch.cat((state[name], t), dim=2)
        state[name] = t
        out.append(t)
    return out
