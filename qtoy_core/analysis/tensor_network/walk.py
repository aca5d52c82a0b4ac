"""The model walk: one network for a whole polynomial model, component by component.

`to_tensor_network(model, n_ctx)` turns a model whose every component is polynomial (quadratic or
bilinear attention, bilinear MLP, RoPE / learned / no positions, no norm; or any plugin component
with the capability, `capability`) into one ``quimb.tensor.TensorNetwork`` with an open index
``tok_in_{t}`` (size vocab) per input position and an open index ``logit_{t}`` (size vocab) per
output position. It calls each component's ``tensor_network`` method with a `TNBuilder` and never
looks at component names; `check_polynomial` names every component without the method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

from qtoy_registry import get_registry

from .builder import OUTPUT_PREFIX, TNBuilder
from .capability import CAPABILITY, NotPolynomialError

if TYPE_CHECKING:
    import quimb.tensor as qtn

__all__ = ["check_polynomial", "to_tensor_network"]


def _modules(model: Any) -> list[tuple[str, str, Any]]:
    """(path, kind, module) of every component the network needs, in forward order."""
    out = [("positional", "positional", model.positional)]
    for i, block in enumerate(model.blocks):
        out += [(f"blocks.{i}.ln1", "norm", block.ln1), (f"blocks.{i}.attn", "attention", block.attn)]
        if block.has_mlp:
            out += [(f"blocks.{i}.ln2", "norm", block.ln2), (f"blocks.{i}.mlp", "mlp", block.mlp)]
    out.append(("ln_final", "norm", model.ln_final))
    return out


def _alternatives(kind: str) -> str:
    """The registered components of `kind` that have the capability, as "'a' or 'b'"."""
    names = []
    try:
        for comp in get_registry().components(kind):
            try:
                if comp.config_class.model_construct().is_polynomial and callable(getattr(comp.load(), CAPABILITY, None)):
                    names.append(comp.name)
            except Exception:  # a broken plugin must not hide the real error
                continue
    except Exception:
        pass
    return " or ".join(repr(n) for n in names) if names else "a polynomial one"


def check_polynomial(model: Any) -> None:
    """Raise `NotPolynomialError` naming every component without an exact tensor-network form."""
    config = model.config
    names = {kind: comp.name for kind, comp in config.components().items()}
    bad: dict[tuple[str, str], list[str]] = {}
    for path, kind, module in _modules(model):
        if not callable(getattr(module, CAPABILITY, None)):
            bad.setdefault((kind, names.get(kind, type(module).__name__)), []).append(path)
    if not bad:
        return
    lines = []
    for (kind, name), paths in bad.items():
        comp_cfg = config.components().get(kind)
        why = ("its config says it is polynomial, but its module has no tensor_network() method"
               if comp_cfg is not None and comp_cfg.is_polynomial
               else "it is not an exact polynomial map, so no finite tensor network reproduces it")
        lines.append(f"{kind} {name!r} ({', '.join(paths)}) is not polynomial: {why}; use {kind} "
                     f"{_alternatives(kind)}, or give the component a tensor_network() method "
                     f"(see qtoy_core.analysis.tensor_network.TensorNetwork{_PROTOCOL[kind]})")
    raise NotPolynomialError("\n".join(lines))


_PROTOCOL = {"attention": "Attention", "mlp": "MLP", "positional": "Positional", "norm": "Norm"}


def _np_dtype(model: Any, dtype: Any) -> np.dtype:
    if dtype is None:
        p = next(iter(model.parameters()), None)
        dtype = p.dtype if p is not None else torch.float64
    if isinstance(dtype, torch.dtype):
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return np.dtype("float64" if dtype == torch.float64 else "float32")
    return np.dtype(dtype)


def to_tensor_network(model: Any, n_ctx: int | None = None, *, dtype: Any = None,
                      outputs: Iterable[int] | None = None, doc_ids: Any = None) -> "qtn.TensorNetwork":
    """The exact tensor network of a polynomial model for sequences of up to ``n_ctx`` tokens.

    Open indices: ``tok_in_{t}`` (vocab, one per input position, shared by every embedding copy)
    and ``logit_{t}`` (vocab) for each output position in ``outputs`` (default all ``0..n_ctx-1``).
    ``dtype`` defaults to the model's (float64 or float32). The network reads the weights as they
    are now (later training does not change it); dropout is ignored (eval behaviour).
    Raises `NotPolynomialError` naming any component without a tensor-network form.

    ``doc_ids`` (n_ctx,) ints, nondecreasing: the documents of the positions (document masking):
    each query's key sum runs only over keys of its document and positions restart at every
    document, as in the model's forward with those ``doc_ids``. Which positions start a document
    is part of the network (it does not follow the input tokens), so a ``doc_mask`` model's network
    without ``doc_ids`` is the one for inputs that are one document (no separator inside).
    """
    check_polynomial(model)
    config = model.config
    n_ctx = config.n_ctx if n_ctx is None else int(n_ctx)
    limit = getattr(model.positional, "max_positions", None)
    if limit is not None and n_ctx > limit:
        raise ValueError(f"n_ctx {n_ctx} is more than the {limit} positions the {config.positional.name} "
                         f"positional encoding covers")
    outputs = list(range(n_ctx)) if outputs is None else sorted(set(int(t) for t in outputs))
    if any(not 0 <= t < n_ctx for t in outputs):
        raise ValueError(f"outputs must lie in 0..{n_ctx - 1}, got {outputs}")
    if doc_ids is not None and not config.doc_mask:
        from ...documents import check_doc_mask_support

        check_doc_mask_support(model)  # asked for explicitly: the components must support it
    tn = TNBuilder(n_ctx, _np_dtype(model, dtype), doc_ids=doc_ids)
    embed = model.embed.weight
    with tn.scope("embed"):
        x = tn.stream(lambda t: tn.embedding(t, embed), config.d_model, "resid")
    with tn.scope("positional"):
        x = model.positional.tensor_network(tn, x, op="embed")
    for i, block in enumerate(model.blocks):
        with tn.scope(f"blocks.{i}.ln1"):
            h = block.ln1.tensor_network(tn, x)
        with tn.scope(f"blocks.{i}.attn"):
            a = block.attn.tensor_network(tn, h, positional=model.positional)
        with tn.scope(f"blocks.{i}"):
            x = tn.add_streams(x, a, label="resid_mid")
        if block.has_mlp:
            with tn.scope(f"blocks.{i}.ln2"):
                h = block.ln2.tensor_network(tn, x)
            with tn.scope(f"blocks.{i}.mlp"):
                m = block.mlp.tensor_network(tn, h)
            with tn.scope(f"blocks.{i}"):
                x = tn.add_streams(x, m, label="resid_post")
    with tn.scope("ln_final"):
        x = model.ln_final.tensor_network(tn, x)
    unembed = model.unembed.weight
    for t in outputs:
        with tn.output_position(t), tn.scope("unembed"):
            tn.output(x(t), unembed, f"{OUTPUT_PREFIX}{t}")
    return tn.network()
