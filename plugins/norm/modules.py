from torch import Tensor, nn

from qtoy_core import HookPoint


class NoNorm(nn.Identity):
    def __init__(self, model, config):
        super().__init__()

    def tensor_network(self, tn, x):
        """The identity (qtoy_core.analysis.tensor_network); RMSNorm has no such form."""
        return x


class RMSNorm(nn.RMSNorm):
    """x / scale * weight with scale = sqrt(mean(x^2) + eps). Hook points as TransformerLens's
    RMSNorm: ``hook_scale`` (batch, pos, 1) the divisor, ``hook_normalized`` (batch, pos, d_model)
    x / scale before the gain. The explicit form runs only when one of them is hooked; otherwise
    torch's fused RMSNorm does the same maths."""

    def __init__(self, model, config):
        super().__init__(model.d_model, eps=config.eps)
        self.hook_scale, self.hook_normalized = HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        if not (self.hook_scale.is_hooked() or self.hook_normalized.is_hooked()):
            return super().forward(x)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.weight
