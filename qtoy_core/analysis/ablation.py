"""Ablations as one call: knock out a head, an attention layer, an MLP, one MLP hidden unit or the
residual stream at a position, and see what changes.

    from qtoy_core.analysis.ablation import Head, MLPLayer, ablate, ablation_scan
    logits = ablate(model, tokens, Head(1, 3))                                   # zero ablation
    logits = ablate(model, tokens, [Head(1, 3), MLPLayer(0)], "mean", reference=ref_tokens)
    scan = ablation_scan(model, batches)        # every head and MLP, ranked by the loss increase
    scan.entries[0].label, scan.entries[0].delta

Targets and the hook point each one edits (through `qtoy_core.analysis.hooks`, so any component
with these hook points works):

  Head(layer, head)                blocks.{l}.attn.hook_z[:, :, head]   the head's z, so its output z_h W_O[h]
                                                                        (the out_proj bias is no head's and stays)
  AttnLayer(layer)                 blocks.{l}.hook_attn_out             the whole attention output, bias included
  MLPLayer(layer)                  blocks.{l}.hook_mlp_out
  Neuron(layer, index)             blocks.{l}.mlp.hook_hidden[..., index]  one hidden unit (bilinear: left*right)
  ResidPosition(layer, pos, where) blocks.{l}.hook_resid_{where}[:, pos]   where: "pre" (default), "mid", "post"

Methods: "zero" sets the activation to 0; "mean" to its mean over the reference batch at each
position (the reference must be at least as long as the input; a position-fixed target uses that
position's mean); "resample" to its value on a reference sequence drawn at random (seeded) for each
input row, at the same positions (causal-scrubbing style; pass a reference batch other than the
input so that no row can draw itself).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from qtoy_registry import QtoyError

from .cache import ActivationCache, hook_names

__all__ = ["AblationEffect", "AblationError", "AblationScan", "AttnLayer", "Head", "MLPLayer", "Neuron",
           "ResidPosition", "ablate", "ablation_hooks", "ablation_scan", "next_token_loss", "METHODS"]

METHODS = ("zero", "mean", "resample")


class AblationError(QtoyError, ValueError):
    """An ablation that cannot be done as asked (unknown method, target the model lacks, bad reference)."""


# -- targets ------------------------------------------------------------------------------------
# Each target names its hook point, the part of that activation it covers (`selection`, an index
# into the activation with the batch axis first) and a label.
@dataclass(frozen=True)
class Head:
    layer: int
    head: int
    hook_name = property(lambda self: f"blocks.{self.layer}.attn.hook_z")
    selection = property(lambda self: (slice(None), slice(None), self.head))  # (batch, pos, head, d_head)
    label = property(lambda self: f"L{self.layer}H{self.head}")


@dataclass(frozen=True)
class AttnLayer:
    layer: int
    hook_name = property(lambda self: f"blocks.{self.layer}.hook_attn_out")
    selection = property(lambda self: ())
    label = property(lambda self: f"L{self.layer}.attn")


@dataclass(frozen=True)
class MLPLayer:
    layer: int
    hook_name = property(lambda self: f"blocks.{self.layer}.hook_mlp_out")
    selection = property(lambda self: ())
    label = property(lambda self: f"L{self.layer}.mlp")


@dataclass(frozen=True)
class Neuron:
    layer: int
    index: int
    hook_name = property(lambda self: f"blocks.{self.layer}.mlp.hook_hidden")
    selection = property(lambda self: (slice(None), slice(None), self.index))
    label = property(lambda self: f"L{self.layer}.mlp[{self.index}]")


@dataclass(frozen=True)
class ResidPosition:
    layer: int
    pos: int
    where: str = "pre"
    hook_name = property(lambda self: f"blocks.{self.layer}.hook_resid_{self.where}")
    selection = property(lambda self: (slice(None), self.pos))
    label = property(lambda self: f"L{self.layer}.resid_{self.where}[{self.pos}]")


Target = Any  # one of the dataclasses above (anything with hook_name, selection and label)


def _targets(targets: Target | Sequence[Target]) -> list[Target]:
    out = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    for t in out:
        if not all(hasattr(t, a) for a in ("hook_name", "selection", "label")):
            raise AblationError(f"{t!r} is not an ablation target: use Head(layer, head), AttnLayer(layer), "
                                f"MLPLayer(layer), Neuron(layer, index) or ResidPosition(layer, pos)")
        if isinstance(t, ResidPosition) and t.where not in ("pre", "mid", "post"):
            raise AblationError(f"ResidPosition.where must be 'pre', 'mid' or 'post', not {t.where!r}")
    return out


def _check_exists(model: nn.Module, targets: list[Target]) -> None:
    names = set(hook_names(model))
    for t in targets:
        if t.hook_name not in names:
            raise AblationError(f"{t.label}: this model has no hook point {t.hook_name} (layers: "
                                f"{len(model.blocks)}; heads are ablated at attn.hook_z, neurons at mlp.hook_hidden). "
                                f"Check the layer index, and that the component records that hook point.")
        if isinstance(t, MLPLayer) and not getattr(model.blocks[t.layer], "has_mlp", True):
            raise AblationError(f"{t.label}: block {t.layer} has no MLP (an attention-only model): ablate its "
                                f"attention (AttnLayer, Head) instead")


# -- hooks -----------------------------------------------------------------------------------------
def _reference_cache(model: nn.Module, reference: Any, names: set[str]) -> ActivationCache:
    if isinstance(reference, ActivationCache):
        missing = names - set(reference)
        if missing:
            raise AblationError(f"the reference cache lacks {sorted(missing)}: record them (run_with_cache with "
                                f"those names) or pass reference tokens")
        return reference
    if not isinstance(reference, Tensor) or reference.dim() != 2:
        raise AblationError("mean and resample ablation need reference=: a (batch, pos) token tensor or an "
                            "ActivationCache of such a batch")
    return model.run_with_cache(reference, names_filter=names)[1]


def ablation_hooks(model: nn.Module, targets: Target | Sequence[Target], method: str = "zero",
                   reference: Any = None, *, seed: int = 0) -> list[tuple[str, Callable]]:
    """The ``fwd_hooks`` list that performs the ablation (for ``model.hooks`` / ``run_with_hooks``)."""
    if method not in METHODS:
        raise AblationError(f"unknown ablation method {method!r}: use one of {', '.join(METHODS)}")
    targets = _targets(targets)
    _check_exists(model, targets)
    ref = _reference_cache(model, reference, {t.hook_name for t in targets}) if method != "zero" else None
    generator = torch.Generator().manual_seed(seed)
    hooks = []
    for t in targets:
        hooks.append((t.hook_name, _make_hook(t, method, ref[t.hook_name] if ref is not None else None, generator)))
    return hooks


def _make_hook(target: Target, method: str, ref: Tensor | None, generator: torch.Generator) -> Callable:
    index = target.selection

    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        if method == "zero":
            act[index] = 0.0
            return act
        t = act.shape[1]
        if ref.shape[1] < t:
            raise AblationError(f"{target.label}: the reference batch has {ref.shape[1]} positions, the input {t}: "
                                f"{method} ablation takes each position's value from the reference, so pass a "
                                f"reference at least as long as the input")
        r = ref[:, :t].to(act.device, act.dtype)
        if method == "mean":
            act[index] = r.mean(0, keepdim=True).expand_as(act)[index]
        else:  # resample: row i takes a random reference row's activation at the same positions
            rows = torch.randint(0, r.shape[0], (act.shape[0],), generator=generator).to(r.device)
            act[index] = r[rows][index]
        return act

    return hook


def ablate(model: nn.Module, tokens: Tensor, targets: Target | Sequence[Target], method: str = "zero",
           reference: Any = None, *, seed: int = 0) -> Tensor:
    """Logits (batch, pos, vocab) of ``model(tokens)`` with ``targets`` ablated by ``method``."""
    hooks = ablation_hooks(model, targets, method, reference, seed=seed)
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks)


# -- the scan --------------------------------------------------------------------------------------
def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1] (the default metric)."""
    from ..model import cross_entropy

    return cross_entropy(logits[:, :-1], tokens[:, 1:])


@dataclass
class AblationEffect:
    label: str
    target: Target
    value: float    # the metric with the target ablated
    delta: float    # value - baseline


@dataclass
class AblationScan:
    """Every target's effect, ranked: by ``delta`` descending (largest increase of the metric first,
    the natural order for a loss), or by |delta| with ``rank_by="abs"``."""

    metric: str
    method: str
    baseline: float
    entries: list[AblationEffect] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "method": self.method, "baseline": self.baseline,
                "entries": [{"label": e.label, "target": type(e.target).__name__, **asdict(e.target),
                             "value": e.value, "delta": e.delta} for e in self.entries]}

    def __getitem__(self, label: str) -> AblationEffect:
        for e in self.entries:
            if e.label == label:
                return e
        raise KeyError(label)


def default_targets(model: nn.Module, tokens: Tensor) -> list[Target]:
    """Every head (from the hook_z shapes) and every MLP of the model."""
    names = set(hook_names(model))
    z_names = [f"blocks.{i}.attn.hook_z" for i in range(len(model.blocks))]
    _, cache = model.run_with_cache(tokens[:1, :2], names_filter=[n for n in z_names if n in names])
    out: list[Target] = []
    for i, block in enumerate(model.blocks):
        if z_names[i] in cache:
            out += [Head(i, h) for h in range(cache[z_names[i]].shape[2])]
        if getattr(block, "has_mlp", False):
            out.append(MLPLayer(i))
    return out


def ablation_scan(model: nn.Module, batches: Tensor | Iterable[Tensor], metric: Callable | None = None,
                  method: str = "zero", reference: Any = None, targets: Sequence[Target] | None = None, *,
                  rank_by: str = "delta", seed: int = 0) -> AblationScan:
    """Ablate each target (default: every head and every MLP) in turn and rank them by the change of
    ``metric(logits, tokens)`` (default: `next_token_loss`), averaged over ``batches`` (a (batch,
    pos) tensor or an iterable of them). ``reference`` for mean/resample: tokens or a cache
    (default: the batches themselves, concatenated)."""
    batches = [batches] if isinstance(batches, Tensor) else list(batches)
    if not batches or any(not isinstance(b, Tensor) or b.dim() != 2 for b in batches):
        raise AblationError("ablation_scan needs batches: a (batch, pos) token tensor or a list of them")
    if rank_by not in ("delta", "abs"):
        raise AblationError(f"rank_by must be 'delta' or 'abs', not {rank_by!r}")
    metric_fn = metric or next_token_loss
    targets = list(targets) if targets is not None else default_targets(model, batches[0])
    if method != "zero" and reference is None:
        length = min(b.shape[1] for b in batches)
        reference = torch.cat([b[:, :length] for b in batches])

    def value(hooks: list) -> float:
        total = 0.0
        with torch.no_grad():
            for b in batches:
                total += float(metric_fn(model.run_with_hooks(b, fwd_hooks=hooks), b))
        return total / len(batches)

    baseline = value([])
    entries = []
    for t in targets:
        v = value(ablation_hooks(model, t, method, reference, seed=seed))
        entries.append(AblationEffect(t.label, t, v, v - baseline))
    entries.sort(key=(lambda e: -e.delta) if rank_by == "delta" else (lambda e: -abs(e.delta)))
    name = getattr(metric_fn, "__name__", "metric")
    return AblationScan(name, method, baseline, entries)
