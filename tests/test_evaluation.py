"""Validation loss is one token-weighted mean, in `evaluate`, in the Trainer and in `qtoy eval`."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qtoy_core import build_model
from qtoy_core.evaluation import evaluate
from qtoy_core.training.config import assemble_run_config
from qtoy_core.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from fixed_stream import N_CTX, VOCAB, fixed_batches, tiny_run_config  # noqa: E402


def _padded_batches(seed=0):
    """Two (tokens, mask) batches of 2 rows, right-padded to N_CTX + 1: few real tokens, then many."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in [(3, 2), (N_CTX + 1, N_CTX - 3)]:
        tokens = torch.randint(0, VOCAB, (2, N_CTX + 1), generator=g)
        mask = torch.zeros(2, N_CTX + 1, dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
            tokens[row, length:] = 0  # padding id
        out.append((tokens, mask))
    return out


@torch.no_grad()
def _per_token_losses(model, batches):
    """Independently: each row's real prefix alone through the model, the loss of every real target."""
    losses = []
    for tokens, mask in batches:
        for row, real in zip(tokens, mask):
            seq = row[: int(real.sum())]
            logits = model(seq[None, :-1])[0]
            losses.append(F.cross_entropy(logits.float(), seq[1:], reduction="none"))
    return torch.cat(losses)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("transformer_1L", d_model=32, n_head=2, n_ctx=N_CTX, vocab_size=VOCAB)
    with torch.no_grad():  # a fresh model's blocks write nothing: give the loss a shape to weigh
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def test_evaluate_weights_every_real_token_once(model):
    batches = _padded_batches()
    per_token = _per_token_losses(model, batches)
    result = evaluate(model, batches, n=2)
    assert result.batches == 2 and result.tokens == per_token.numel() == (2 + 1) + (N_CTX + N_CTX - 4)
    assert result.loss == pytest.approx(per_token.mean().item(), rel=1e-5)
    batch_means = [evaluate(model, [b], n=1).loss for b in batches]
    mean_of_means = sum(batch_means) / 2
    assert abs(mean_of_means - result.loss) > 1e-3  # what averaging batches would have said instead


def test_evaluate_takes_the_first_n_batches_and_keeps_the_mode(model):
    drawn = []

    def stream():
        for batch in fixed_batches(5):
            drawn.append(batch)
            yield batch

    model.train()
    result = evaluate(model, stream(), n=2)
    assert model.training and len(drawn) == 2  # no batch drawn beyond the n-th
    assert result.tokens == 2 * drawn[0][:, 1:].numel()
    assert result.loss == pytest.approx(evaluate(model, drawn, n=None).loss, rel=1e-6)
    assert evaluate(model, [], n=3).batches == 0


def test_the_trainer_reports_the_token_weighted_validation_loss(tmp_path):
    config = assemble_run_config(tiny_run_config(max_iters=2, eval_interval=2, eval_iters=2, warmup=1))
    val = _padded_batches(seed=1)
    trainer = Trainer(config, tmp_path / "run", train_batches=fixed_batches(10), val_batches=val)
    summary = trainer.fit()
    expected = _per_token_losses(trainer.model.eval(), val).mean().item()
    assert summary["val_loss"] == pytest.approx(expected, rel=1e-5)
