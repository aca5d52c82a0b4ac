import torch
from torch import Tensor, nn

from qtoy_core.interfaces import Positional


class LearnedPositional(Positional):
    """A learned vector per absolute position (W_pos: n_ctx x d_model) added to the residual stream."""

    def __init__(self, model, config):
        super().__init__()
        self.max_positions = model.n_ctx
        self.W_pos = nn.Parameter(torch.randn(model.n_ctx, model.d_model) * 0.02)

    def embed(self, positions: Tensor) -> Tensor:
        return self.W_pos[positions]
