"""The synthetic dataset: cached deterministic tokenizer, ground-truth labels and entropy, the preview CLI."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from qtoy_core.data import StreamingTextDataset, build_dataset
from qtoy_plugins.data.synthetic.dataset import LABEL_CODES, SyntheticDataset

RANK = {"fixed": 0, "copyable": 1, "free": 2}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "qtoy-cache"  # the folder conftest points QTOY_CACHE at


@pytest.fixture(scope="module")
def synthetic(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTOY_CACHE", str(cache))
        ds = build_dataset("synthetic")
        ds.tokenizer()  # trained once per test process, then cached
    return ds


def test_tokenizer_is_cached_and_deterministic(synthetic, cache, tmp_path, monkeypatch):
    files = list((cache / "tokenizers").glob("synthetic-*.json"))
    assert len(files) == 1
    monkeypatch.setenv("QTOY_CACHE", str(cache))
    import qtoy_plugins.data.synthetic.dataset as synthetic_module

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer was trained again")

    monkeypatch.setattr(synthetic_module, "train_bpe", no_training)  # a cache hit never trains
    again = build_dataset("synthetic").tokenizer()
    assert again.fingerprint() == synthetic.tokenizer().fingerprint()
    monkeypatch.undo()
    monkeypatch.setenv("QTOY_CACHE", str(tmp_path))
    build_dataset({"name": "synthetic", "seed": 5, "difficulty": 0.1}).tokenizer()  # trained again from scratch
    assert (tmp_path / "tokenizers" / files[0].name).read_bytes() == files[0].read_bytes()  # the same bytes


def test_dataset_basics(synthetic):
    assert isinstance(synthetic, SyntheticDataset)
    tok = synthetic.tokenizer()
    assert tok.vocab_size == 4096 and tok.eos_id is not None and tok.unk_id is None
    story = synthetic.story(0)
    assert tok.decode(tok.encode(story.text)) == story.text
    first = next(synthetic.records("train"))
    assert first[1] == synthetic.generator.text(first[0])
    info = synthetic.describe()
    assert info["generator_version"] and info["tokenizer"]["fingerprint"] == tok.fingerprint()
    json.dumps(info)


def test_token_labels_align_with_generator_spans(synthetic):
    tok = synthetic.tokenizer()
    for index in range(5):
        story = synthetic.story(index)
        truth = synthetic.ground_truth(story)
        ids, offsets, _ = tok.encode_with_offsets(story.text)
        assert truth["ids"] == ids == tok.encode(story.text)
        assert len(truth["labels"]) == len(ids) and set(truth["labels"]) <= set(RANK)
        for (start, end), label in zip(offsets, truth["labels"]):
            overlapping = [s.label for s in story.spans if s.start < end and s.end > start]
            assert label == max(overlapping, key=RANK.get)
        assert math.isclose(sum(truth["nats"]), story.entropy_nats, rel_tol=1e-9, abs_tol=1e-9)
        # the nats sit on free or copyable tokens, never on a token with only fixed text
        assert all(n == 0 or lab != "fixed" for n, lab in zip(truth["nats"], truth["labels"]))
        assert synthetic.token_labels(index) == truth["labels"]
    text = next(synthetic.documents("train"))
    assert synthetic.token_labels(text) == synthetic.ground_truth(text)["labels"]  # a recently generated text


def test_entropy_per_token_is_positive_and_finite(synthetic):
    stats = synthetic.entropy_stats(n_docs=40)
    h = synthetic.entropy_per_token(n_docs=40)
    assert h == stats["nats_per_token"] and 0 < h < math.log(4096) and math.isfinite(h)
    assert math.isclose(stats["bits_per_token"], h / math.log(2))
    assert math.isclose(sum(stats["label_fractions"].values()), 1.0)
    assert stats["nats_per_token_by_label"]["fixed"] == 0 and stats["nats_per_token_by_label"]["free"] > 0


def test_batch_ground_truth(synthetic):
    stream = StreamingTextDataset(synthetic, split="train", n_ctx=64, batch_size=4, shuffle_buffer=4,
                                  track_documents=True)
    batch = next(iter(stream))
    codes, nats = synthetic.batch_ground_truth(batch)
    assert codes.shape == batch.tokens.shape and (codes >= 0).all()  # packed: no padding
    tok = synthetic.tokenizer()
    assert (codes[batch.tokens == tok.eos_id] == LABEL_CODES["fixed"]).all()
    key = int(batch.doc_ids[0, 5])
    truth = synthetic.ground_truth(key)
    pos = int(batch.doc_pos[0, 5])
    assert batch.tokens[0, 5] == truth["ids"][pos] and codes[0, 5] == LABEL_CODES[truth["labels"][pos]]
    assert nats.dtype == torch.float64 and (nats >= 0).all()


def test_validation_stream_is_finite_and_disjoint(synthetic):
    ds = build_dataset({"name": "synthetic", "val_documents": 6, "difficulty": 0.2})
    val = StreamingTextDataset(ds, split="validation", n_ctx=32, batch_size=8, track_documents=True)
    keys = {k for b in val for k in b.doc_ids.flatten().tolist() if k >= 0}
    assert len(keys) == 6 and keys == {k for b in val for k in b.doc_ids.flatten().tolist() if k >= 0}
    assert all(ds.split_of(ds.generator.text(k)) == "validation" for k in keys)


def test_no_validation_split_is_an_error_not_an_endless_search(synthetic):
    from qtoy_core.data import EmptySplitError

    ds = build_dataset({"name": "synthetic", "val_fraction": 0.0})
    assert list(ds.documents("validation")) == []
    with pytest.raises(EmptySplitError, match="val_fraction is 0"):
        next(iter(StreamingTextDataset(ds, split="validation", n_ctx=16, batch_size=2)))


def test_finite_corpus_loops(synthetic):
    ds = build_dataset({"name": "synthetic", "n_stories": 20, "val_fraction": 0.0})
    stream = StreamingTextDataset(ds, split="train", n_ctx=64, batch_size=4, shuffle_buffer=8, tokenize_batch=4)
    it = iter(stream)
    while stream.epoch < 2:
        next(it)


def test_preview_cli(synthetic):
    from qtoy_cli.main import cli

    result = CliRunner().invoke(cli, ["data", "preview", "-n", "2", "--stats-docs", "20", "--json"],
                                catch_exceptions=False)
    data = json.loads(result.output)
    assert len(data["samples"]) == 2 and data["stats"]["documents"] == 20
    sample = data["samples"][0]
    assert "".join(p["text"] for p in sample["pieces"]) == sample["text"]
    assert data["stats"]["entropy"]["nats_per_token"] > 0 and data["stats"]["unknown_rate"] is None
    text = CliRunner().invoke(cli, ["data", "preview", "-n", "1", "--stats-docs", "10", "--set", "difficulty=0.9"],
                              catch_exceptions=False).output
    assert "|" in text and "corpus entropy per token" in text and "vocabulary coverage" in text
