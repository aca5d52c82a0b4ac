import torch

from qtoy_core import use_fused_adamw


def build_adam(named_parameters, config) -> torch.optim.AdamW:
    """AdamW with two named groups: "decay" (matrices) and "no_decay" (biases, gains)."""
    decay = [(n, p) for n, p in named_parameters if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named_parameters if p.ndim < 2]
    groups = [
        {"name": "decay", "params": [p for _, p in decay], "param_names": [n for n, _ in decay],
         "weight_decay": config.weight_decay},
        {"name": "no_decay", "params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay],
         "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                             fused=use_fused_adamw(config.fused, (p for _, p in named_parameters)))
