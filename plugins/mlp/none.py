import torch
from torch import Tensor

from qtoy_core import MLP


class NoMLP(MLP):
    """Writes nothing. Attention-only model types never build it; it exists so 'none' is a name."""

    out_proj = None

    def __init__(self, model, config):
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def tensor_network(self, tn, x):
        """The zero vector at every position (qtoy_core.analysis.tensor_network)."""
        zeros = torch.zeros(x.dim)
        return tn.stream(lambda t: tn.constant(zeros, label="mlp_out"), x.dim, "mlp_out")
