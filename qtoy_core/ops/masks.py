"""Causal masking for polynomial attention patterns (no softmax: masked entries are zeros)."""

import torch
from torch import Tensor


def causal_pattern(pattern: Tensor, key_mask: Tensor | None = None, doc_ids: Tensor | None = None) -> Tensor:
    """Zero the entries of a (..., t_q, t_k) pattern a query may not see.

    Queries sit at the last t_q of the t_k positions (a cached prefix precedes them); `key_mask`
    (batch, t_k), False/0 for padding keys, zeroes those columns too. `doc_ids` (batch, t_k) int,
    the document of every key (the queries' are the last t_q entries): a query sees only the keys
    of its own document (`same_document`).
    """
    t_q, t_k = pattern.shape[-2:]
    causal = torch.ones(t_q, t_k, dtype=torch.bool, device=pattern.device).tril(t_k - t_q)
    pattern = pattern.masked_fill(~causal, 0.0)
    if key_mask is not None:
        pattern = pattern * key_mask[:, None, None, :].to(pattern.dtype)
    if doc_ids is not None:
        pattern = pattern.masked_fill(~same_document(doc_ids, t_q)[:, None], 0.0)
    return pattern


def same_document(doc_ids: Tensor, t_q: int | None = None) -> Tensor:
    """(batch, t_q, t_k) bool: key j and query i (at the last t_q of the t_k positions) belong to
    the same document, from `doc_ids` (batch, t_k). No causal part: combine with the causal mask."""
    t_k = doc_ids.shape[-1]
    t_q = t_k if t_q is None else t_q
    return doc_ids[:, t_k - t_q:, None] == doc_ids[:, None, :]


def document_ids(tokens: Tensor, separator_id: int, bos_id: int | None = None) -> Tensor:
    """(batch, time) int64: the index of each token's document within its row, 0 for the document
    open at the row's first token, counting up at every document start.

    Packed rows are ``[bos] doc sep [bos] doc sep ...`` (`qtoy_core.data.stream`, ``bos`` only
    where the tokenizer has one): a document starts at the token after a separator, so each
    document keeps its own trailing separator. When bos and the separator are one token (a tokenizer
    without eos) a document ends ``... bos`` and the next begins ``bos ...``: the start is then the
    second of two consecutive separators (an empty document, ``bos bos``, is indistinguishable from
    a boundary there).
    """
    after_sep = tokens[:, :-1] == separator_id
    if bos_id is not None and bos_id == separator_id:
        after_sep = after_sep & (tokens[:, 1:] == bos_id)
    starts = torch.nn.functional.pad(after_sep.to(torch.int64), (1, 0))
    return starts.cumsum(1)
