import torch
import torch.nn.functional as F
from torch import Tensor

from qtoy_core import ProjectedAttention, append_to_cache, same_document


class SoftmaxAttention(ProjectedAttention):
    """Standard causal softmax attention through F.scaled_dot_product_attention. With document
    masking the mask is block-diagonal causal (a query sees the earlier keys of its document)."""

    supports_doc_mask = True

    def mix(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: dict | None,
            doc_ids: Tensor | None = None, **_) -> Tensor:
        if state is not None:
            k, v = append_to_cache(state, k=k, v=v)
            if doc_ids is not None:  # the cached keys' documents, kept like the keys
                (doc_ids,) = append_to_cache(state, doc=doc_ids[:, None, :, None])
                doc_ids = doc_ids[:, 0, :, 0]
        t_q, t_k = q.shape[2], k.shape[2]
        if self.wants_pattern():
            scores = self.hook_scores(q @ k.transpose(-1, -2) / self.d_head ** 0.5)
            scores = scores.masked_fill(~self._mask(t_q, t_k, key_mask, q.device, doc_ids), float("-inf"))
            return self.hook_pattern(scores.softmax(-1)) @ v
        if key_mask is None and doc_ids is None and t_q == t_k:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(t_q, t_k, key_mask, q.device, doc_ids))

    @staticmethod
    def _mask(t_q: int, t_k: int, key_mask: Tensor | None, device, doc_ids: Tensor | None = None) -> Tensor:
        """(batch or 1, 1, t_q, t_k) bool: causal with queries at the last t_q positions, within the
        query's document when `doc_ids` (batch, t_k) is given (a token always sees itself, so no row
        is empty); a padded key is hidden, except from itself so no row is empty."""
        causal = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)
        if doc_ids is not None:
            causal = causal & same_document(doc_ids, t_q)  # (batch, t_q, t_k)
        causal = causal if causal.dim() == 3 else causal[None]
        if key_mask is None:
            return causal[:, None]
        own = torch.eye(t_q, t_k, dtype=torch.bool, device=device).roll(t_k - t_q, dims=1) if t_q < t_k else \
            torch.eye(t_q, t_k, dtype=torch.bool, device=device)
        return (causal[:, None] & (key_mask[:, None, None, :] | own))
