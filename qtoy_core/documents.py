"""Document masking for packed rows: which document each token belongs to, where documents start,
and what a model with ``doc_mask`` requires of its components.

Packed rows hold several documents (``[bos] doc sep [bos] doc sep ...``). With
`ModelConfig.doc_mask`, attention never crosses a document boundary and positions restart at every
document, so each document in a row is computed exactly as if it were run alone. The model derives
each row's document ids once per forward (`ToyTransformer.forward`) from the separator token its
config records (or takes them as ``doc_ids=``), and hands them to every attention; the positional
gets each token's position within its document.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qtoy_registry import QtoyError

from .ops.masks import document_ids

__all__ = ["DocMaskError", "check_doc_mask_support", "documents_for", "document_positions"]


class DocMaskError(QtoyError, ValueError):
    """Document masking cannot apply as asked (a component without the capability, no separator
    to find documents with, ids of the wrong shape, rows without document boundaries)."""


def check_doc_mask_support(model: Any) -> None:
    """Refuse a model whose attention or positional would ignore document masking."""
    parts = [("positional", model.positional, model.config.positional.name)]
    parts += [("attention", block.attn, model.config.attention.name) for block in model.blocks]
    for kind, module, name in parts:
        if not getattr(module, "supports_doc_mask", False):
            what = ("take doc_ids (a query sees only keys of its own document)" if kind == "attention" else
                    "take positions (batch, time) that restart at every document")
            raise DocMaskError(
                f"Document masking is on (doc_mask) but the {kind} {name!r} ({type(module).__name__}) does not "
                f"support it: it would silently attend across documents or mis-place them. Turn document masking "
                f"off (drop --doc-mask / doc_mask), or choose a {kind} that supports it; a plugin {kind} declares "
                f"the capability with `supports_doc_mask = True` once its forward can {what} (docs/plugins.md).")


def documents_for(model: Any, tokens: Tensor, cache: Any, doc_ids: Tensor | None) -> Tensor | None:
    """(batch, time) int64 document ids of ``tokens``, numbered on from the cache's, or None when
    no document masking applies. Given ``doc_ids`` win (checked); otherwise a ``doc_mask`` model
    derives them from its separator token (`qtoy_core.ops.masks.document_ids`)."""
    config = model.config
    if doc_ids is not None:
        if not config.doc_mask:
            check_doc_mask_support(model)  # asked for explicitly: the same refusal
        return _checked(doc_ids, tokens)
    if not config.doc_mask:
        return None
    if config.doc_separator_id is None:
        raise DocMaskError(
            "This model masks documents (doc_mask) but its config records no separator token to find them "
            "(doc_separator_id): pass doc_ids= (batch, time) to the forward, or set doc_separator_id (and "
            "doc_bos_id) to the tokenizer's separator_id (and bos_id); `qtoy train --doc-mask` records them.")
    docs = document_ids(tokens, config.doc_separator_id, config.doc_bos_id)
    last = getattr(cache, "last_token", None)
    if last is not None:  # continue the cached row: its document, and a start right after a separator
        starts = last == config.doc_separator_id
        if config.doc_bos_id is not None and config.doc_bos_id == config.doc_separator_id:
            starts = starts & (tokens[:, 0] == config.doc_bos_id)
        docs = docs + (cache.doc_last + starts.to(torch.int64))[:, None]
    return docs


def _checked(doc_ids: Any, tokens: Tensor) -> Tensor:
    doc_ids = torch.as_tensor(doc_ids, device=tokens.device)
    if doc_ids.shape != tokens.shape or doc_ids.is_floating_point() or doc_ids.dtype == torch.bool:
        raise DocMaskError(f"doc_ids must be an integer tensor shaped like the tokens {tuple(tokens.shape)} (each "
                           f"token's document), got {doc_ids.dtype} {tuple(doc_ids.shape)}.")
    doc_ids = doc_ids.to(torch.int64)
    if doc_ids.shape[1] > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        raise DocMaskError("doc_ids must be nondecreasing along each row (every document one run of positions, "
                           "numbered in order), as qtoy_core.document_ids(tokens, separator_id) gives.")
    return doc_ids


def document_positions(docs: Tensor, offset: int, cache: Any) -> Tensor:
    """(batch, time): each token's position within its document (0 at the document's first token),
    continuing the cache's open document when the first token belongs to it; updates the cache."""
    b, t = docs.shape
    idx = torch.arange(offset, offset + t, device=docs.device).expand(b, t)
    prev = getattr(cache, "doc_last", None)
    first = torch.ones(b, 1, dtype=torch.bool, device=docs.device) if prev is None else (docs[:, :1] != prev[:, None])
    is_start = torch.cat([first, docs[:, 1:] != docs[:, :-1]], 1)
    carried = getattr(cache, "doc_start", None)
    carried = torch.full((b,), offset, device=docs.device) if carried is None else carried
    marks = torch.where(is_start, idx, -1)
    marks[:, 0] = torch.where(is_start[:, 0], idx[:, 0], carried)
    start = marks.cummax(1).values
    if cache is not None and t:
        cache.doc_last, cache.doc_start = docs[:, -1], start[:, -1]
    return idx - start
