"""Muon: orthogonalised updates on hidden matrices, AdamW on the rest, inside one optimizer."""

import torch

from qtoy_core import build_model, build_optimizer, is_hidden_matrix
from qtoy_core.optim import load_optimizer_state


def test_orthogonalisation_puts_singular_values_in_a_narrow_band():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(64, 128))
    grad = torch.randn(64, 128) * torch.logspace(-1, 1, 128)  # columns scaled over two decades
    # lr 1 with the "original" adjustment (max(1, rows/cols)^0.5 = 1 here): the update is -orth(grad)
    opt = torch.optim.Muon([weight], lr=1.0, weight_decay=0.0, adjust_lr_fn="original")
    weight.grad = grad
    opt.step()
    s_update = torch.linalg.svdvals(-weight.detach())
    s_grad = torch.linalg.svdvals(grad)
    assert s_grad.max() / s_grad.min() > 10
    # the quintic's coefficients trade exactness for speed: singular values land near 1, not at 1
    assert s_update.min() > 0.5 and s_update.max() < 1.3, s_update


def test_grouping_sends_exactly_the_hidden_matrices_to_muon():
    model = build_model("transformer_2L", d_model=32, n_head=2, vocab_size=64, pos="learned", norm="rmsnorm",
                        mlp={"name": "bilinear", "bias": True})
    opt = build_optimizer(model, "muon")
    groups = {g["name"]: set(g["param_names"]) for g in opt.param_groups}
    hidden = {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")}
    assert groups["muon"] == hidden
    others = groups["adamw_decay"] | groups["adamw_no_decay"]
    assert others == set(dict(model.named_parameters())) - hidden
    assert "embed.weight" in others and "positional.W_pos" in others
    assert all(is_hidden_matrix(n, dict(model.named_parameters())[n]) for n in hidden)
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)


def test_muon_state_round_trips_and_schedulers_drive_both_parts():
    model = build_model("transformer_1L", d_model=32, n_head=2, vocab_size=64)
    opt = build_optimizer(model, {"name": "muon", "lr": 0.02, "adamw_lr": 0.004})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    tokens = torch.randint(0, 64, (2, 9))
    model.loss(tokens).backward()
    opt.step()
    sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["muon"] == 0.01 and abs(lrs["adamw_decay"] - 0.002) < 1e-12
    assert opt.muon.param_groups[0]["lr"] == 0.01  # the inner optimizer sees the schedule
    state = opt.state_dict()
    fresh = build_optimizer(model, "muon")
    fresh.load_state_dict(state)
    key = next(iter(fresh.muon.state))
    torch.testing.assert_close(fresh.muon.state[key]["momentum_buffer"], opt.muon.state[key]["momentum_buffer"])


def _adam_steps(model, config, steps=3):
    opt = build_optimizer(model, config)
    torch.manual_seed(1)
    for _ in range(steps):
        model.loss(torch.randint(0, 64, (2, 9))).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_adamw_is_fused_on_cpu_by_default_and_matches_the_unfused_update():
    torch.manual_seed(0)
    base = build_model("transformer_1L", d_model=32, n_head=2, vocab_size=64)
    fused_model, plain_model = (build_model("transformer_1L", d_model=32, n_head=2, vocab_size=64) for _ in range(2))
    fused_model.load_state_dict(base.state_dict())
    plain_model.load_state_dict(base.state_dict())
    fused = _adam_steps(fused_model, "adam")
    plain = _adam_steps(plain_model, {"name": "adam", "fused": False})
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    assert all(not torch.equal(a, b) for a, b in zip(fused_model.parameters(), base.parameters()))  # it trained
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    muon = build_optimizer(base, "muon")
    assert muon.adamw.defaults["fused"] is True
    assert build_optimizer(base, {"name": "muon", "fused": False}).adamw.defaults["fused"] is False


def test_resuming_keeps_the_fused_switch_the_optimizer_was_built_with():
    """torch's load_state_dict would copy `fused` from the checkpoint's groups: a run saved unfused
    would resume unfused, and a fused checkpoint would override `fused: false`."""
    model = build_model("transformer_1L", d_model=32, n_head=2, vocab_size=64)
    for saved_cfg, resumed_cfg, fused in (({"name": "adam", "fused": False}, "adam", True),
                                         ("adam", {"name": "adam", "fused": False}, False),
                                         ({"name": "muon", "fused": False}, "muon", True)):
        saved = _adam_steps(model, saved_cfg, steps=1)
        resumed = build_optimizer(model, resumed_cfg)
        load_optimizer_state(resumed, saved.state_dict())
        assert all(bool(g["fused"]) is fused for g in resumed.param_groups if "fused" in g)
        assert any("fused" in g for g in resumed.param_groups)
        key = next(iter(saved.state)) if not hasattr(saved, "adamw") else next(iter(saved.adamw.state))
        state = resumed.state if not hasattr(resumed, "adamw") else resumed.adamw.state
        torch.testing.assert_close(state[key]["exp_avg"], (saved.state if not hasattr(saved, "adamw")
                                                            else saved.adamw.state)[key]["exp_avg"])
        model.zero_grad()
        model.loss(torch.randint(0, 64, (2, 9))).backward()
        resumed.step()  # and it still steps
