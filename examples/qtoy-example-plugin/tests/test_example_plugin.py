"""The example plugin's components: registered, correct, exact as tensor networks, trainable."""

import json

import pytest
import torch

from qtoy_core import (
    NotPolynomialError,
    RunConfig,
    Trainer,
    build_dataset,
    build_model,
    contract_logits,
    make_model_config,
    to_tensor_network,
)


def _randomise(model, seed=0, std=0.3):
    """Fresh models write nothing to the residual stream (out_proj starts at zero): give every
    weight a value so the tests see the components at work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def test_components_are_registered_with_the_package_as_provider(registry):
    for kind, name in [("attention", "cubic"), ("mlp", "trilinear"), ("dataset", "sums"), ("callback", "loss_trace")]:
        comp = registry.get(kind, name)
        assert comp.provider.distribution == "qtoy-example-plugin"
        assert comp.description
    assert registry.get("attention", "cubic").config_class().is_polynomial


def _reference_cubic(attn, positional, x, window=None):
    """The definition, written out with explicit loops over queries and keys."""
    b, t, _ = x.shape
    pos = torch.arange(t)

    def heads(proj, rotate):
        h = proj(x).view(b, t, attn.n_head, attn.d_head).transpose(1, 2)
        return positional.rotate(h, pos) if rotate else h

    q, k, v = heads(attn.q_proj, True), heads(attn.k_proj, True), heads(attn.v_proj, False)
    z = torch.zeros_like(v)
    for i in range(t):
        for j in range(i + 1):
            if window is not None and j <= i - window:
                continue
            s = (q[:, :, i] * k[:, :, j]).sum(-1) / attn.d_head
            z[:, :, i] += (s ** 3)[..., None] * v[:, :, j]
    return attn.out_proj(z.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("window", [None, 2])
def test_cubic_attention_matches_its_definition(registry, window):
    torch.manual_seed(0)
    model = _randomise(build_model("attention_only_1L", attn={"name": "cubic", "window": window}, d_model=16,
                                   n_head=2, vocab_size=32, n_ctx=8)).double()
    attn = model.blocks[0].attn
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    out = attn(x, positional=model.positional, positions=torch.arange(6))
    torch.testing.assert_close(out, _reference_cubic(attn, model.positional, x, window))


def test_the_cube_keeps_the_sign(registry):
    """Unlike quadratic attention, a cubic pattern has negative entries (and the mask leaves zeros)."""
    torch.manual_seed(0)
    model = _randomise(build_model("attention_only_1L", attn="cubic", d_model=16, n_head=2, vocab_size=32,
                                   n_ctx=8))
    seen = {}
    model.blocks[0].attn.hook_pattern.register_forward_hook(lambda m, i, o: seen.update(pattern=o))
    model(torch.randint(0, 32, (2, 8)))
    pattern = seen["pattern"]
    assert (pattern < 0).any() and (pattern > 0).any()
    assert torch.isfinite(pattern).all()
    assert (pattern.triu(1) == 0).all()  # causal: nothing above the diagonal


@pytest.mark.parametrize("mode, window", [("kv", None), ("recurrent", None), ("recurrent", 2)])
def test_cached_generation_matches_the_full_forward(registry, mode, window):
    """"recurrent" keeps the running state of QKProductAttention (d_head^3 = 512 features here); a
    window has no running-sum form, so it keeps keys and values as "kv" does."""
    torch.manual_seed(0)
    model = _randomise(build_model("transformer_1L", attn={"name": "cubic", "window": window}, mlp="trilinear",
                                   d_model=16, n_head=2, vocab_size=32, n_ctx=8)).double().eval()
    tokens = torch.randint(0, 32, (2, 6))
    full = model(tokens)
    cache = model.new_cache(mode)
    parts = [model(tokens[:, :3], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)
    assert ("rnn" in cache.layers[0]) == (mode == "recurrent" and window is None)


def test_window_longer_than_the_context_is_refused(registry):
    with pytest.raises(ValueError, match="window 9 is longer than n_ctx 8"):
        make_model_config("attention_only_1L", attn={"name": "cubic", "window": 9}, n_ctx=8)


@pytest.mark.parametrize("positional", ["rope", "none"])
def test_tensor_network_is_exact(registry, positional):
    torch.manual_seed(0)
    model = _randomise(build_model("transformer_1L", attn={"name": "cubic", "window": 2}, mlp="trilinear",
                                   pos=positional, norm="none", d_model=8, n_head=2, d_mlp=8, vocab_size=16,
                                   n_ctx=4), std=0.5).double()
    assert model.config.is_polynomial
    tn = to_tensor_network(model, n_ctx=3)
    tokens = torch.randint(0, 16, (2, 3))
    torch.testing.assert_close(contract_logits(tn, tokens), model(tokens).detach())


def test_non_polynomial_norm_is_refused_by_the_tensor_network(registry):
    model = build_model("attention_only_1L", attn="cubic", norm="rmsnorm", d_model=8, n_head=2, vocab_size=16,
                        n_ctx=4)
    with pytest.raises(NotPolynomialError):
        to_tensor_network(model, n_ctx=2)


def test_model_with_the_plugin_components_learns(registry):
    torch.manual_seed(0)
    model = build_model("transformer_1L", attn="cubic", mlp="trilinear", d_model=16, n_head=2, vocab_size=32,
                        n_ctx=16)
    tokens = torch.randint(0, 32, (4, 13))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model.loss(tokens)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sums_dataset(registry):
    dataset = build_dataset({"name": "sums", "n_documents": 200})
    docs = list(dataset.documents("train"))
    val = list(dataset.documents("validation"))
    assert docs and val and not set(docs) & set(val)
    assert len(docs) + len(val) == 200
    a, b, c = (int(n) for n in docs[0].splitlines()[0].replace("+", " ").replace("=", " ").split())
    assert a + b == c
    tok = dataset.tokenizer()
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode(docs[0])) == docs[0]
    assert list(build_dataset({"name": "sums", "n_documents": 200}).documents("train")) == docs  # deterministic


def test_training_run_with_every_plugin_component(registry, tmp_path):
    config = RunConfig.model_validate({
        "model": {"model_type": "transformer_1L", "attention": "cubic", "mlp": "trilinear", "d_model": 32,
                  "n_head": 2, "n_ctx": 32},
        "data": {"dataset": {"name": "sums", "n_documents": 300}},
        "callbacks": [{"name": "loss_trace", "every": 2}],
        "train": {"max_iters": 4, "batch_size": 4, "eval_interval": 4, "eval_iters": 1, "warmup": 1,
                  "precision": "fp32", "compile": False, "device": "cpu"},
    })
    summary = Trainer(config, tmp_path / "run").fit()
    assert summary["steps"] == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "loss_trace.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [2, 4]
    assert records[-1]["summary"] and records[-1]["steps"] == 4
    document = json.loads((tmp_path / "run" / "config.json").read_text())
    assert document["plugins"]["attention"]["distribution"] == "qtoy-example-plugin"
