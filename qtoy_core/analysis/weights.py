"""Weight views of a `ToyTransformer`, per layer and head, in TransformerLens orientation.

Every component says what its weights mean through an optional ``weight_views()`` method returning
a dict (the built-ins: `ProjectedAttention.weight_views` for every projected attention, the bilinear
attention's second QK pair, the bilinear MLP's ``W_l``/``W_r``/``W_out``). A plugin component offers
its own views the same way; nothing here looks at a component's name. A module without the method
contributes its own parameters whose names start with ``W_`` (e.g. the learned positional's
``W_pos``).

Orientation (row vectors, as in TransformerLens): ``W_E`` (vocab, d_model), ``W_U`` (d_model, vocab),
``W_pos`` (n_ctx, d_model), attention ``W_Q``/``W_K``/``W_V`` (n_head, d_model, d_head) with
``q_h = x @ W_Q[h]`` and ``W_O`` (n_head, d_head, d_model); bilinear MLP ``W_l``/``W_r`` (d_mlp,
d_model) and ``W_out`` (d_model, d_mlp) with ``mlp(x) = W_out ((W_l x) * (W_r x))``.

Norms: `model_weights` folds a norm's elementwise gain (``norm.weight``) into the weights that read
its output (ln1 into every QK view and ``W_V``, ln2 into ``W_l``/``W_r``, ln_final into ``W_U``), so
circuits read the raw residual stream; the normalisation itself (division by the RMS) is not linear
and is ignored, which `ModelWeights.notes` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LayerWeights", "ModelWeights", "component_views", "model_weights", "relative_rotations",
           "rotates"]


def component_views(module: nn.Module | None) -> dict[str, Any]:
    """The module's ``weight_views()``, or its own ``W_*`` parameters (detached) without one."""
    if module is None:
        return {}
    views = getattr(module, "weight_views", None)
    if callable(views):
        return dict(views())
    return {name: p.detach() for name, p in module.named_parameters(recurse=False) if name.startswith("W_")}


@dataclass
class LayerWeights:
    """One block's views: ``attn`` and ``mlp`` as the components gave them (norm gains folded)."""

    layer: int
    attn: dict[str, Any]
    mlp: dict[str, Any]
    attn_type: str = ""
    mlp_type: str = ""

    @property
    def n_head(self) -> int:
        return self.attn["W_Q"].shape[0]

    @property
    def d_head(self) -> int:
        return self.attn["W_Q"].shape[-1]

    @property
    def qk(self) -> list[tuple[str, str, float]]:
        """(query view, key view, scale) triples; see `ProjectedAttention.weight_views`."""
        return list(self.attn.get("qk", []))

    @property
    def qk_pairs(self) -> list[tuple[str, str, float]]:
        """The distinct QK pairs (quadratic attention lists its one pair twice: the square)."""
        out = []
        for f in self.qk:
            if f not in out:
                out.append(f)
        return out

    @property
    def score_is_squared(self) -> bool:
        """True when the pattern is the square of one QK form (quadratic attention)."""
        return self.attn.get("pattern") == "product" and len(self.qk) == 2 and self.qk[0] == self.qk[1]

    @property
    def has_circuits(self) -> bool:
        return all(k in self.attn for k in ("W_Q", "W_K", "W_V", "W_O"))

    @property
    def is_bilinear_mlp(self) -> bool:
        return all(k in self.mlp for k in ("W_l", "W_r", "W_out"))


@dataclass
class ModelWeights:
    """All views of one model, float32 (or the requested dtype), norm gains folded."""

    W_E: Tensor
    W_U: Tensor
    W_pos: Tensor | None
    layers: list[LayerWeights]
    positional: nn.Module | None = None
    n_ctx: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return self.W_E.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1]


def _gain(norm: nn.Module | None, d_model: int) -> Tensor | None:
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor) and weight.ndim == 1 and weight.shape[0] == d_model:
        return weight.detach()
    return None


def _is_identity(norm: nn.Module | None) -> bool:
    return norm is None or (isinstance(norm, nn.Identity) and not any(True for _ in norm.parameters()))


@torch.no_grad()
def model_weights(model: nn.Module, *, fold_norms: bool = True, dtype: torch.dtype = torch.float32) -> ModelWeights:
    """Views of every weight of ``model`` (see the module docstring). A `ModelWeights` passes through."""
    if isinstance(model, ModelWeights):
        return model
    notes: list[str] = []
    cast = lambda t: t.detach().to(dtype)  # noqa: E731
    W_E = cast(model.embed.weight)
    d_model = W_E.shape[1]
    W_U = cast(model.unembed.weight).T
    norms_seen = set()

    def fold(norm: nn.Module | None, where: str) -> Tensor | None:
        if _is_identity(norm):
            return None
        norms_seen.add(type(norm).__name__)
        g = _gain(norm, d_model) if fold_norms else None
        return None if g is None else g.to(dtype)

    g = fold(getattr(model, "ln_final", None), "ln_final")
    if g is not None:
        W_U = g[:, None] * W_U
    pos_views = component_views(getattr(model, "positional", None))
    W_pos = pos_views.get("W_pos")
    W_pos = cast(W_pos) if isinstance(W_pos, Tensor) else None
    layers = []
    biases = set()
    for i, block in enumerate(model.blocks):
        attn_mod = getattr(block, "attn", None)
        attn = {k: (cast(v) if isinstance(v, Tensor) else v) for k, v in component_views(attn_mod).items()}
        g = fold(getattr(block, "ln1", None), f"blocks.{i}.ln1")
        if g is not None and attn:
            readers = {q for q, _, _ in attn.get("qk", [])} | {k for _, k, _ in attn.get("qk", [])} | {"W_V"}
            for name in readers:
                if name in attn:
                    attn[name] = g[None, :, None] * attn[name]
        for name in attn.get("qk", []):
            for view in name[:2]:
                if view not in attn:
                    raise KeyError(f"blocks.{i}.attn ({type(attn_mod).__name__}).weight_views() lists QK view "
                                   f"{view!r} in 'qk' but does not provide it")
        mlp_mod = getattr(block, "mlp", None) if getattr(block, "has_mlp", True) else None
        mlp = {k: (cast(v) if isinstance(v, Tensor) else v) for k, v in component_views(mlp_mod).items()}
        g = fold(getattr(block, "ln2", None), f"blocks.{i}.ln2") if mlp_mod is not None else None
        if g is not None:
            for name in ("W_l", "W_r"):
                if name in mlp:
                    mlp[name] = mlp[name] * g[None, :]
        biases |= {f"attn.{k}" for k in attn if k.startswith("b_")} | {f"mlp.{k}" for k in mlp if k.startswith("b_")}
        layers.append(LayerWeights(i, attn, mlp, type(attn_mod).__name__ if attn_mod is not None else "",
                                   type(mlp_mod).__name__ if mlp_mod is not None else ""))
        if mlp_mod is not None and not mlp:
            notes.append(f"blocks.{i}.mlp ({type(mlp_mod).__name__}) offers no weight_views(): no MLP decomposition")
        if attn_mod is not None and not attn:
            notes.append(f"blocks.{i}.attn ({type(attn_mod).__name__}) offers no weight_views(): no circuits for it")
    if norms_seen:
        notes.append(f"norms ({', '.join(sorted(norms_seen))}): circuits fold their gains"
                     f"{'' if fold_norms else ' (not folded: fold_norms=False)'} and ignore the division by the "
                     f"RMS, which is not linear")
    if biases:
        notes.append(f"biases ({', '.join(sorted(biases))}) are left out of the circuits (weights only)")
    return ModelWeights(W_E, W_U, W_pos, layers, positional=getattr(model, "positional", None),
                        n_ctx=int(getattr(getattr(model, "config", None), "n_ctx", 0) or 0), notes=notes)


@torch.no_grad()
def relative_rotations(positional: nn.Module | None, offsets, d_head: int,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """(len(offsets), d_head, d_head): ``K(o) = R_o^T R_0``, the matrix between a query at position
    ``o`` and a key at position 0 in row form: ``score = (x_q W_Q) K(o) (x_k W_K)^T``.

    ``R_t`` is read off ``positional.rotate`` (the map the model applies to one head's queries and
    keys at position ``t``), so it matches the forward exactly; for RoPE the score depends on the
    offset only, and ``K(o)`` is the relative rotation. The identity without a rotating positional.
    """
    offsets = torch.as_tensor(list(offsets), dtype=torch.long)
    eye = torch.eye(d_head, dtype=dtype)
    if positional is None:
        return eye.expand(len(offsets), d_head, d_head).clone()
    positions = torch.cat([torch.zeros(1, dtype=torch.long), offsets])
    basis = eye[None, :, None, :].expand(1, d_head, len(positions), d_head).contiguous()
    rows = positional.rotate(basis, positions)[0].to(dtype)  # [a, t, :] = R_t e_a, i.e. rows[:, t] = R_t^T
    rt = rows.transpose(0, 1)  # (T, d, d): R_t^T
    return rt[1:] @ rt[0].T


def rotates(positional: nn.Module | None, n_ctx: int, d_head: int) -> bool:
    """Whether ``positional.rotate`` changes queries/keys at any position below ``n_ctx``."""
    if positional is None or n_ctx <= 1:
        return False
    probe = sorted({1, 2, 3, n_ctx // 2, n_ctx - 1} & set(range(1, n_ctx)))
    k = relative_rotations(positional, probe, d_head)
    return not torch.allclose(k, torch.eye(d_head).expand_as(k))
