import torch
from torch import Tensor

from qtoy_core import Positional


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RoPE(Positional):
    """Rotary position embedding, rotate-half convention: the pair (i, i + d/2) of each query and
    key rotates by angle position * base^(-2i/d). Scores then depend on positions only through
    their offset."""

    def __init__(self, model, config):
        super().__init__()
        d = model.d_head
        inv_freq = 1.0 / (config.base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        # Not persistent: derived from the config, so checkpoints hold weights only.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    supports_doc_mask = True  # positions (batch, time) that restart at every document rotate per row

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin, each (time, d_head) (or (batch, time, d_head) for per-row positions), in float32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = self.angles(positions)
        if cos.dim() == 3:  # per-row positions: broadcast over the heads of x (batch, heads, time, d_head)
            cos, sin = cos[:, None], sin[:, None]
        return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)

    # -- optional capability: exact tensor network (qtoy_core.analysis.tensor_network) -------------
    def tensor_network(self, tn, x, *, op):
        """op "rotate": each head of the flat query/key stream times the position's rotation matrix
        (read off `rotate` itself, so the float32 angles match the forward exactly); "embed": x."""
        if op != "rotate":
            return x
        from qtoy_core import rotation_matrices

        d_head = 2 * self.inv_freq.shape[0]
        if x.dim % d_head:
            raise ValueError(f"rope: a stream of width {x.dim} does not split into heads of {d_head}")
        rots = rotation_matrices(self, range(tn.n_ctx), d_head)
        mats = [torch.block_diag(*[r] * (x.dim // d_head)) for r in rots]  # one object per position
        # tn.position(t): t's position in its document (t itself without document masking)
        return x.map(lambda w, t: tn.linear(w, mats[tn.position(t)], label=w.label))
