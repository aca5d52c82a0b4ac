from torch import Tensor, nn

from qtoy_core.interfaces import MLP, HookPoint


class BilinearMLP(MLP):
    """out_proj((w_left x) * (w_right x)): every output is a quadratic form of the input, so the
    MLP is read exactly through its interaction matrices (see qtoy_core.analysis)."""

    def __init__(self, model, config):
        super().__init__()
        self.w_left = nn.Linear(model.d_model, model.d_mlp, bias=config.bias)
        self.w_right = nn.Linear(model.d_model, model.d_mlp, bias=config.bias)
        self.out_proj = nn.Linear(model.d_mlp, model.d_model, bias=config.bias)
        self.hook_left, self.hook_right, self.hook_hidden = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.hook_left(self.w_left(x)) * self.hook_right(self.w_right(x))
        return self.out_proj(self.hook_hidden(hidden))
