import torch
from torch import Tensor, nn

from qtoy_core import Positional


class LearnedPositional(Positional):
    """A learned vector per absolute position (W_pos: n_ctx x d_model) added to the residual stream.
    With document masking the positions restart at every document (positions (batch, time))."""

    supports_doc_mask = True

    def __init__(self, model, config):
        super().__init__()
        self.max_positions = model.n_ctx
        self.W_pos = nn.Parameter(torch.randn(model.n_ctx, model.d_model) * 0.02)

    def embed(self, positions: Tensor) -> Tensor:
        return self.W_pos[positions]

    # -- optional capability: exact tensor network (qtoy_core.analysis.tensor_network) -------------
    def tensor_network(self, tn, x, *, op):
        """op "embed": adds W_pos[t] at position t; "rotate": x unchanged."""
        if op != "embed":
            return x
        rows = list(self.W_pos.detach())  # one object per position, shared by every copy
        return x.map(lambda w, t: tn.add_constant(w, rows[tn.position(t)], label="resid"))
