"""Muon on hidden matrices, AdamW on everything else, as one optimizer object.

torch.optim.Muon (Newton-Schulz quintic, 5 steps, Nesterov) only takes 2-D parameters, so it is
paired with torch.optim.AdamW. `MuonWithAdamW` exposes the union of both param_groups, so learning
rate schedulers, gradient clipping and checkpoints treat it like any optimizer.
"""

import torch

from qtoy_core import is_hidden_matrix, use_fused_adamw


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW | None):
        self.muon, self.adamw = muon, adamw
        inner = [o for o in (muon, adamw) if o is not None]
        # Optimizer.__init__ sets up hooks and bookkeeping; the real groups are the inner ones.
        super().__init__([p for o in inner for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in inner for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        if self.adamw is not None:
            self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = [g for o in (self.muon, self.adamw) if o is not None for g in o.param_groups]


def build_muon(named_parameters, config) -> MuonWithAdamW:
    hidden = [(n, p) for n, p in named_parameters if is_hidden_matrix(n, p)]
    others = [(n, p) for n, p in named_parameters if not is_hidden_matrix(n, p)]
    if not hidden:
        raise ValueError("muon found no hidden 2-D matrices to optimise; use optimizer 'adam' for this model")
    muon = torch.optim.Muon(
        [{"name": "muon", "params": [p for _, p in hidden], "param_names": [n for n, _ in hidden]}],
        lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum, nesterov=config.nesterov,
        ns_coefficients=config.ns_coefficients, ns_steps=config.ns_steps, eps=config.eps,
        adjust_lr_fn="original",  # update scaled by max(1, rows/cols)^0.5
    )
    adamw = None
    if others:
        decay = [(n, p) for n, p in others if p.ndim >= 2]
        no_decay = [(n, p) for n, p in others if p.ndim < 2]
        groups = [{"name": f"adamw_{label}", "params": [p for _, p in g], "param_names": [n for n, _ in g],
                   "weight_decay": wd}
                  for label, g, wd in (("decay", decay, config.adamw_weight_decay), ("no_decay", no_decay, 0.0)) if g]
        adamw = torch.optim.AdamW(groups, lr=config.adamw_lr, betas=config.adamw_betas, eps=config.adamw_eps,
                                  fused=use_fused_adamw(config.fused, (p for _, p in others)))
    return MuonWithAdamW(muon, adamw)
