"""Trilinear MLP: out_proj((W_a x) * (W_b x) * (W_c x)), the cubic sibling of the bilinear MLP."""

from __future__ import annotations

from torch import Tensor, nn

from qtoy_core import MLP, HookPoint


class TrilinearMLP(MLP):
    """Built as `TrilinearMLP(model_config, mlp_config)`; forward(x) keeps x's shape. Owns `out_proj`
    (the model zero-initialises it, so a new block starts as the identity)."""

    def __init__(self, model, config):
        super().__init__()
        self.w_a = nn.Linear(model.d_model, model.d_mlp, bias=config.bias)
        self.w_b = nn.Linear(model.d_model, model.d_mlp, bias=config.bias)
        self.w_c = nn.Linear(model.d_model, model.d_mlp, bias=config.bias)
        self.out_proj = nn.Linear(model.d_mlp, model.d_model, bias=config.bias)
        self.hook_a, self.hook_b, self.hook_c, self.hook_hidden = HookPoint(), HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.hook_a(self.w_a(x)) * self.hook_b(self.w_b(x)) * self.hook_c(self.w_c(x))
        return self.out_proj(self.hook_hidden(hidden))

    # -- optional capability: the exact tensor network (qtoy_core.TNBuilder) ----------------------
    def tensor_network(self, tn, x):
        """Three copies of the input, projected; their elementwise product is one shared index."""
        branches = [tn.project(x, proj, label=label) for proj, label in
                    ((self.w_a, "a"), (self.w_b, "b"), (self.w_c, "c"))]

        def at(t):
            hidden = tn.mul(*(branch(t) for branch in branches), label="hidden")
            return tn.linear(hidden, self.out_proj.weight, self.out_proj.bias, label="mlp_out")

        return tn.stream(at, self.out_proj.out_features, "mlp_out")
