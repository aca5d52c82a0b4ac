from torch import Tensor, nn
from torch.nn import functional as F

from qtoy_core import MLP, HookPoint


class GeluMLP(MLP):
    def __init__(self, model, config):
        super().__init__()
        self.w_in = nn.Linear(model.d_model, model.d_mlp, bias=config.bias)
        self.out_proj = nn.Linear(model.d_mlp, model.d_model, bias=config.bias)
        self.hook_pre, self.hook_hidden = HookPoint(), HookPoint()  # TL: mlp.hook_pre, mlp.hook_post

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.hook_hidden(F.gelu(self.hook_pre(self.w_in(x)))))
