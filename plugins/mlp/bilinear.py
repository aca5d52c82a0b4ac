from torch import Tensor, nn

from qtoy_core import MLP, HookPoint


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

    # -- optional capability: exact tensor network (qtoy_core.analysis.tensor_network) -------------
    def tensor_network(self, tn, x):
        """out_proj((w_left x) * (w_right x)): two copies of x, the product a shared index."""
        left = tn.project(x, self.w_left, label="left")
        right = tn.project(x, self.w_right, label="right")

        def at(t):
            hidden = tn.mul(left(t), right(t), label="hidden")
            return tn.linear(hidden, self.out_proj.weight, self.out_proj.bias, label="mlp_out")

        return tn.stream(at, self.out_proj.out_features, "mlp_out")

    # -- optional capability: weight views (qtoy_core.analysis.circuits) ---------------------------
    def weight_views(self):
        """W_l, W_r (d_mlp, d_model) and W_out (d_model, d_mlp) (plus b_l, b_r, b_out with biases):
        out = W_out ((W_l x) * (W_r x)), so u . out = x^T (sum_h (u . W_out[:, h]) W_l[h]^T W_r[h]) x."""
        views = {"W_l": self.w_left.weight.detach(), "W_r": self.w_right.weight.detach(),
                 "W_out": self.out_proj.weight.detach()}
        for name, lin in (("b_l", self.w_left), ("b_r", self.w_right), ("b_out", self.out_proj)):
            if lin.bias is not None:
                views[name] = lin.bias.detach()
        return views
