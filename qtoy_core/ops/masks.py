"""Causal masking for polynomial attention patterns (no softmax: masked entries are zeros)."""

import torch
from torch import Tensor


def causal_pattern(pattern: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Zero the entries of a (..., t_q, t_k) pattern a query may not see.

    Queries sit at the last t_q of the t_k positions (a cached prefix precedes them); `key_mask`
    (batch, t_k), False/0 for padding keys, zeroes those columns too.
    """
    t_q, t_k = pattern.shape[-2:]
    causal = torch.ones(t_q, t_k, dtype=torch.bool, device=pattern.device).tril(t_k - t_q)
    pattern = pattern.masked_fill(~causal, 0.0)
    if key_mask is not None:
        pattern = pattern * key_mask[:, None, None, :].to(pattern.dtype)
    return pattern
