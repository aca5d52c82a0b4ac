"""Distance to the optimum (qtoy_core.analysis.optimum.excess_loss) on the synthetic corpus, against
the generator's own entropy figures; and `qtoy eval`'s report of it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qtoy_core.analysis.optimum import excess_loss
from qtoy_core.data import StreamingTextDataset, build_dataset


class Uniform(torch.nn.Module):
    """Logits all zero: the loss of every token is exactly log(vocab)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, mask=None):
        return torch.zeros(*tokens.shape, self.vocab)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTOY_CACHE", str(tmp_path_factory.getbasetemp() / "qtoy-cache"))
        ds = build_dataset({"name": "synthetic", "val_documents": 40})
        ds.tokenizer()
    return ds


def test_excess_loss_against_the_generators_entropy(synthetic):
    V = synthetic.tokenizer().vocab_size
    stream = StreamingTextDataset(synthetic, split="validation", n_ctx=128, batch_size=8, track_documents=True)
    out = excess_loss(Uniform(V), stream, synthetic.batch_ground_truth, labels=synthetic.LABELS)
    stats = synthetic.entropy_stats(n_docs=40, split="validation")  # the generator's figures, same documents
    # A uniform model's loss is log V on every token: excess = log V - entropy, per label and overall.
    assert out["loss"] == pytest.approx(math.log(V), abs=1e-5)
    for label, e in out["by_label"].items():
        assert e["excess"] == pytest.approx(math.log(V) - e["entropy"], abs=1e-5)
    # The entropy side is the generator's: the stream predicts all but one token per window of the same
    # 40 stories, so its per-token entropy and label shares match entropy_stats to within a few percent.
    assert out["entropy"] == pytest.approx(stats["nats_per_token"], rel=0.05)
    assert out["by_label"]["fixed"]["entropy"] == 0.0 and stats["nats_per_token_by_label"]["fixed"] == 0.0
    for label in ("copyable", "free"):
        assert out["by_label"][label]["entropy"] == pytest.approx(stats["nats_per_token_by_label"][label], rel=0.1)
        assert out["by_label"][label]["fraction"] == pytest.approx(stats["label_fractions"][label], rel=0.1)
    # Every story's nats are counted once: summed over the stream they are the stories' total entropy,
    # less the nats of tokens that start a window (never predicted).
    total = out["entropy"] * out["tokens"]
    assert total <= stats["nats"] + 1e-6 and total > 0.9 * stats["nats"]


def test_qtoy_eval_reports_excess_loss_on_synthetic(tmp_path, synthetic):
    from click.testing import CliRunner

    from qtoy_cli.main import cli

    run = tmp_path / "run"
    args = ["train", "--d-model", "16", "--n-head", "2", "--n-ctx", "32", "--batch-size", "4", "--precision", "fp32",
            "--no-compile", "--quiet", "--max-iters", "2", "--eval-iters", "1", "--out", str(run),
            "--set", "data.dataset.val_documents=8"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["eval", str(run), "--json", "--eval-iters", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    o = report["optimum"]
    assert set(o["by_label"]) == {"fixed", "copyable", "free"}
    assert o["excess"] == pytest.approx(o["loss"] - o["entropy"])
    assert sum(e["fraction"] for e in o["by_label"].values()) == pytest.approx(1.0)
    result = CliRunner().invoke(cli, ["eval", str(run), "--eval-iters", "2"])
    assert "excess over the generator's entropy" in result.output and "copyable" in result.output
