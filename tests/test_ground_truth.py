"""Ground truth: train small models on planted toy tasks and check that the weight-based analysis
finds what was planted (a bigram in the direct path, a copying head, an induction circuit).

Each model trains for a few hundred fp32 Adam steps on an in-memory stream (seeded, one thread), a
few seconds each."""

import math

import pytest
import torch

from qtoy_core import build_model, build_optimizer
from qtoy_core.analysis import (
    composition_baseline,
    direct_path,
    direct_path_top,
    induction_heads,
    ov_circuit,
    qk_kernel,
    rank_head_pairs,
    spectrum,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train faster (and reproducibly) on one thread, and the CPUs are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def train(model, batch, steps: int, lr: float):
    """Plain Adam loop (no weight decay, clipped): ``batch(step)`` -> tokens (batch, time + 1)."""
    opt = build_optimizer(model, {"name": "adam", "lr": lr, "weight_decay": 0.0})
    model.train()
    for step in range(steps):
        loss = model.loss(batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def unit_init(model):
    """O(1) activations: quadratic attention's (q.k / d)^2 is ~1e-11 at the default std 0.02 and
    would take thousands of steps to wake up. Embeddings N(0, 1), matrices N(0, 1/fan_in); the
    residual writers stay zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("embed.", "positional.")):
                p.normal_(0.0, 1.0)
            elif p.ndim == 2 and "out_proj" not in name and not name.startswith("unembed."):
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


def test_planted_bigram_is_the_top_of_its_direct_path_row():
    torch.manual_seed(0)
    V, a, b = 32, 3, 17
    g = torch.Generator().manual_seed(0)

    def batch(step):
        x = torch.randint(0, V, (32, 17), generator=g)
        for _ in range(2):  # every a is followed by b (twice: a b can itself create a new a)
            x[:, 1:][x[:, :-1] == a] = b
        return x

    model = build_model("attention_only_1L", vocab_size=V, d_model=32, n_head=2, n_ctx=16, positional="none",
                        tie_embeddings=False)
    train(model, batch, 150, 1e-2)
    row = direct_path(model).get_row(a)
    assert int(row.argmax()) == b
    others = row[torch.arange(V) != b]
    # by a clear margin (logits); attention (which also sees the current token) carries part of it
    assert float(row[b]) > float(others.max()) + 1.0
    top = direct_path_top(model, 1)
    assert (top.pairs[0].row, top.pairs[0].col) == (a, b) and top.exact


def test_copying_head_in_a_one_layer_model():
    """Random tokens whose second half repeats the first: the head attending L-1 back copies."""
    torch.manual_seed(0)
    V, L = 32, 8
    g = torch.Generator().manual_seed(0)

    def batch(step):
        x = torch.randint(0, V, (32, L), generator=g)
        return torch.cat([x, x], 1)

    model = build_model("attention_only_1L", vocab_size=V, d_model=32, n_head=2, n_ctx=2 * L, positional="rope",
                        tie_embeddings=False)
    unit_init(model)
    train(model, batch, 300, 1e-2)
    tokens = batch(0)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[:, :-1], "blocks.0.attn.hook_pattern")
        second_half = torch.nn.functional.cross_entropy(logits[:, L:].flatten(0, 1), tokens[:, L + 1:].flatten())
    assert float(second_half) < 0.5 * math.log(V)  # it did learn to copy
    # the responsible head: the most pattern mass at offset L - 1 in the second half
    pattern = cache["blocks.0.attn.hook_pattern"]  # (batch, heads, T, T)
    q = torch.arange(L - 1, 2 * L - 1)
    at_offset = pattern[:, :, q, q - (L - 1)].sum(-1)
    share = (at_offset / pattern[:, :, q].sum((-1, -2)).clamp_min(1e-12)).mean(0)
    head = int(share.argmax())
    scores = [s.copying_score for s in spectrum(ov_circuit(model, 0))]
    assert scores[head] > 0.5, scores
    # the same head read from the weights alone: its RoPE kernel peaks at offset L - 1
    pairs = [(i, j) for i in range(V) for j in range(V)]
    kernel = qk_kernel(model, 0, head, pairs).square().mean(0)  # quadratic attention: the squared form
    assert int(kernel[: 2 * L].argmax()) == L - 1
    # an untrained head with random W_O does not copy
    fresh = build_model("attention_only_1L", vocab_size=V, d_model=32, n_head=2, n_ctx=2 * L)
    with torch.no_grad():
        fresh.blocks[0].attn.out_proj.weight.normal_(0.0, 0.02)
    assert max(abs(s.copying_score) for s in spectrum(ov_circuit(fresh, 0))) < 0.5


def periodic_batch(V, T, generator, periods=(3, 9)):
    """Rows repeating a random block of distinct tokens with a random period: the next token is the
    one after the previous occurrence of the current token (induction); no fixed offset works."""

    def batch(step):
        rows = []
        for _ in range(32):
            p = int(torch.randint(*periods, (1,), generator=generator))
            block = torch.randperm(V, generator=generator)[:p]
            rows.append(block.repeat(T // p + 2)[: T + 1])
        return torch.stack(rows)

    return batch


def test_induction_circuit_shows_as_k_composition():
    torch.manual_seed(0)
    V, T = 32, 24
    batch = periodic_batch(V, T, torch.Generator().manual_seed(0))
    model = build_model("attention_only_2L", vocab_size=V, d_model=32, n_head=2, n_ctx=T, positional="rope",
                        attn="softmax", tie_embeddings=False)
    unit_init(model)
    baseline = composition_baseline(32, 16)["k"]
    train(model, batch, 300, 3e-2)
    tokens = batch(0)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[:, :-1], "blocks.0.attn.hook_pattern")
        late = torch.nn.functional.cross_entropy(logits[:, 10:].flatten(0, 1), tokens[:, 11:].flatten())
    assert float(late) < 0.5  # induction: late tokens are predicted
    top = induction_heads(model, top=1)[0]
    assert top.kind == "k" and top.layer_from == 0 and top.layer_to == 1
    assert top.score > 1.5 * baseline, (top.score, baseline)
    assert top.copying_score_to > 0.5  # the induction head copies what it attends to
    # the earlier head of the pair is a previous-token head
    pattern = cache["blocks.0.attn.hook_pattern"][:, top.head_from]  # (batch, T, T)
    t = torch.arange(1, T)
    assert float(pattern[:, t, t - 1].mean()) > 0.5
    # K-composition is what stands out: the best Q- and V-composition pairs are lower
    assert top.score > rank_head_pairs(model, "q", top=1)[0].score
    assert top.score > rank_head_pairs(model, "v", top=1)[0].score


def test_quadratic_attention_with_learned_positions_composes_through_queries():
    """The same task with quadratic attention and learned positions: the model solves it, and the
    analysis shows Q-composition rather than the K-composition of the classic induction circuit (an
    earlier head can write *where* the previous occurrence was, which the later head's query reads
    against the positional keys). Checked here so a change in what the analysis reports is seen."""
    torch.manual_seed(0)
    V, T = 32, 24
    batch = periodic_batch(V, T, torch.Generator().manual_seed(0))
    model = build_model("attention_only_2L", vocab_size=V, d_model=32, n_head=2, n_ctx=T, positional="learned",
                        attn="quadratic", tie_embeddings=False)
    unit_init(model)
    train(model, batch, 300, 1e-2)
    tokens = batch(0)
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        late = torch.nn.functional.cross_entropy(logits[:, 10:].flatten(0, 1), tokens[:, 11:].flatten())
    assert float(late) < 0.5
    q, k = rank_head_pairs(model, "q", top=1)[0], rank_head_pairs(model, "k", top=1)[0]
    assert q.score > 1.4 * q.baseline and q.score > k.score, (q, k)
