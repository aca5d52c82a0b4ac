"""timm-style smoke test: every registered component of every model kind builds, runs forward and
backward, and learns a fixed batch. A new plugin is tested here automatically."""

import pytest
import torch

from qtoy_core import build_model, build_optimizer
from qtoy_registry import get_registry

# Learning rates that memorise a fixed batch quickly (plugin optimizers run with their defaults).
FAST_OPTIONS = {"adam": {"lr": 1e-2}, "muon": {"lr": 0.05, "adamw_lr": 1e-2}}
BASE = {"attention": "quadratic", "mlp": "bilinear", "positional": "rope", "norm": "none"}


def _cases():
    registry = get_registry()
    for kind in ("attention", "mlp", "positional", "norm"):
        for name in registry.names(kind):
            yield kind, name


def _fit(model, optimizer_name="adam", steps=30, **opt):
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (4, 17))
    optimizer = build_optimizer(model, {"name": optimizer_name, **opt})
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.loss(tokens)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind, name", list(_cases()))
def test_component_builds_runs_and_learns(kind, name):
    options = {**BASE, kind: name}
    model_type = "attention_only_1L" if options["mlp"] == "none" else "transformer_1L"
    torch.manual_seed(0)
    model = build_model(model_type, d_model=32, n_head=2, vocab_size=64, n_ctx=32, **options)
    logits = model(torch.randint(0, 64, (2, 9)))
    assert logits.shape == (2, 9, 64) and torch.isfinite(logits).all()
    losses = _fit(model, lr=1e-2)
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < losses[0] - 0.5, f"{kind} {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", get_registry().names("optimizer"))
def test_every_optimizer_trains(name):
    torch.manual_seed(0)
    model = build_model("transformer_1L", d_model=32, n_head=2, vocab_size=64, n_ctx=32)
    losses = _fit(model, name, **FAST_OPTIONS.get(name, {}))
    assert losses[-1] < losses[0] - 0.5, f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
