"""Prepared token shards (`qtoy data prepare`, `qtoy train --data`): the same tokens and splits as
the streaming path, resume after an interruption, incomplete folders refused, disjoint ranks, exact
resume of the batch position, and tokenizer / vocabulary mismatches refused."""

import json

import numpy as np
import pytest
import torch

from qtoy_core.data import (
    DataError,
    ResumeError,
    StreamingTextDataset,
    Tokenizer,
    VocabMismatchError,
    build_dataset,
    train_bpe,
)
from qtoy_core.data import shards as shards_mod
from qtoy_core.data.shards import IncompleteShardsError, PreparedShards, ShardBatches, prepare_shards

N_DOCS = 200


def _doc(i: int) -> str:
    return f"Story {i}: " + "la " * (i % 17) + f"and then {i} ended."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    docs = [_doc(i) for i in range(N_DOCS)]
    with open(root / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    Tokenizer(train_bpe(docs, vocab_size=300)).save(root / "tokenizer.json")
    Tokenizer(train_bpe(docs[::-1][:50], vocab_size=300)).save(root / "other.json")
    return root


def _dataset(corpus):
    return build_dataset({"name": "text", "data_files": [str(corpus / "docs.jsonl")],
                          "tokenizer": str(corpus / "tokenizer.json"), "val_fraction": 0.2})


@pytest.fixture(scope="module")
def prepared(corpus):
    out = corpus / "prepared"
    prepare_shards(_dataset(corpus), out, num_proc=1, chunk_docs=16)
    return out


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.bin"))}


def test_shards_hold_the_streaming_documents_in_their_splits(corpus, prepared):
    ds = _dataset(corpus)
    tok = ds.tokenizer()
    shards = PreparedShards(prepared)
    for split in ("train", "validation"):
        records = list(ds.records(split))  # the streaming path's documents of this split, in source order
        expected = [t for _, text in records for t in tok.encode(text) + [tok.separator_id]]
        data = shards.split(split)
        assert data["tokens"].slice(0, data["size"]).tolist() == expected
        assert np.asarray(data["doc_keys"]).tolist() == [k for k, _ in records]
        lengths = [len(tok.encode(text)) + 1 for _, text in records]
        assert np.asarray(data["doc_starts"]).tolist() == np.concatenate(([0], np.cumsum(lengths)[:-1])).tolist()
    manifest = shards.manifest
    assert manifest["dtype"] == "uint16" and manifest["identity"]["tokenizer"] == tok.fingerprint()
    assert manifest["identity"]["files_hash"] and manifest["splits"]["validation"]["documents"] > 0
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == N_DOCS


def test_validation_batches_equal_the_streams(corpus, prepared):
    ds = _dataset(corpus)
    stream = list(StreamingTextDataset(ds, split="validation", n_ctx=16, batch_size=3))
    mine = list(ShardBatches(prepared, split="validation", n_ctx=16, batch_size=3))
    assert len(mine) == len(stream) > 2
    for a, b in zip(mine, stream):
        assert torch.equal(a.tokens, b.tokens)
        assert (a.attention_mask is None) == (b.attention_mask is None)
        if a.attention_mask is not None:  # the last, partial row padded as the stream pads it
            assert torch.equal(a.attention_mask, b.attention_mask)
    assert mine[-1].attention_mask is not None


def test_more_processes_write_the_same_files(corpus, prepared, tmp_path):
    manifest = prepare_shards(_dataset(corpus), tmp_path / "p2", num_proc=2, chunk_docs=16)
    assert _files(tmp_path / "p2") == _files(prepared)
    assert manifest["prepared"]["num_proc"] == 2


def test_interrupted_prepare_is_refused_then_resumes_to_the_same_files(corpus, prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "COMMIT_SECONDS", 0.0)  # commit after every chunk
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):  # stops after 5 chunks; the 5th was appended but not committed
        prepare_shards(_dataset(corpus), out, chunk_docs=16, stop_after_chunks=5)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["source_pos"] == 4 * 16
    assert not (out / "manifest.json").exists()
    with pytest.raises(IncompleteShardsError, match="incomplete.*qtoy data prepare"):
        PreparedShards(out)
    with pytest.raises(IncompleteShardsError):
        ShardBatches(out, split="train", n_ctx=16, batch_size=2)
    prepare_shards(_dataset(corpus), out, chunk_docs=16)  # the same request: resumes
    assert _files(out) == _files(prepared)
    assert not (out / "progress.json").exists()
    # a different request into that folder is refused, naming what differs
    other = build_dataset({"name": "text", "data_files": [str(corpus / "docs.jsonl")],
                           "tokenizer": str(corpus / "tokenizer.json"), "val_fraction": 0.3})
    with pytest.raises(DataError, match="different request.*dataset"):
        prepare_shards(other, out)


def test_damaged_shard_is_refused(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    path = copy / "train" / "tokens-00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="damaged"):
        PreparedShards(copy)


def _window_ids(batch) -> list[tuple[int, int]]:
    """(document key, position) of each row's first token: which window of the stream a row is."""
    return list(zip(batch.doc_ids[:, 0].tolist(), batch.doc_pos[:, 0].tolist()))


def test_ranks_take_disjoint_windows(prepared):
    n_ctx, size = 8, PreparedShards(prepared).split("train")["size"]
    seen = []
    for rank in range(2):
        stream = iter(ShardBatches(prepared, split="train", n_ctx=n_ctx, batch_size=4, rank=rank, world_size=2,
                                   seed=3, track_documents=True))
        per_rank = None
        windows = []
        while True:
            batch = next(stream)
            windows += _window_ids(batch)
            if per_rank is None:
                total = (size - 1 - shards_mod._mix(3, 0, 1) % n_ctx) // n_ctx
                per_rank = total // 2
            if len(windows) >= per_rank:
                break
        seen.append(set(windows[:per_rank]))
        assert len(seen[-1]) == per_rank  # no window twice within an epoch
    assert not seen[0] & seen[1]


def test_track_documents_matches_the_tokens(corpus, prepared):
    tok = _dataset(corpus).tokenizer()
    batch = next(iter(ShardBatches(prepared, split="train", n_ctx=8, batch_size=4, track_documents=True)))
    docs = {k: tok.encode(t) + [tok.separator_id] for k, t in _dataset(corpus).records("train")}
    for row, keys, pos in zip(batch.tokens.tolist(), batch.doc_ids.tolist(), batch.doc_pos.tolist()):
        assert row == [docs[k][p] for k, p in zip(keys, pos)]


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_resume_continues_exactly_across_epochs(prepared, order):
    def make(seed=0):
        return ShardBatches(prepared, split="train", n_ctx=16, batch_size=8, order=order, seed=seed)

    full = make()
    it = iter(full)
    batches = [next(it).tokens for _ in range(40)]
    assert full.epoch >= 1  # the 40 batches cross an epoch boundary
    first = make()
    it = iter(first)
    for _ in range(13):
        next(it)
    state = torch.load(_roundtrip(first.state_dict()), weights_only=True)
    second = make()
    second.load_state_dict(state)
    it = iter(second)
    assert all(torch.equal(next(it).tokens, b) for b in batches[13:])
    if order == "random":
        sequential = iter(ShardBatches(prepared, split="train", n_ctx=16, batch_size=8, order="sequential"))
        assert not torch.equal(next(sequential).tokens, batches[0])
    with pytest.raises(ResumeError, match="seed"):
        make(seed=1).load_state_dict(state)


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def _config(tmp_path, prepared, **data):
    from qtoy_core.training.config import RunConfig

    return RunConfig.model_validate({
        "model": {"model_type": "attention_only_1L", "d_model": 16, "n_head": 2, "n_ctx": 16, **data.pop("model", {})},
        "data": {"prepared": str(prepared), **data},
        "train": {"batch_size": 4, "max_iters": 4, "eval_interval": 2, "eval_iters": 2, "warmup": 1,
                  "precision": "fp32", "compile": False, "device": "cpu"},
    })


def test_trainer_reads_shards_and_resumes_exactly(prepared, tmp_path, one_thread):
    from qtoy_core.training.trainer import Trainer

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    Trainer(_config(tmp_path, prepared), tmp_path / "full").fit()
    full = losses(tmp_path / "full")
    doc = json.loads((tmp_path / "full" / "config.json").read_text())
    assert doc["data"]["prepared"] == str(prepared) and doc["data"]["dataset"]["name"] == "text"
    assert doc["model"]["vocab_size"] == 300  # from the shards' tokenizer
    from qtoy_core.interfaces import Callback
    from qtoy_core.training.trainer import TrainingStopped

    class StopAtStep2(Callback):  # as a SIGTERM after step 2 would: checkpoint, then stop
        def on_step_end(self, trainer, record):
            if trainer.step == 2:
                trainer._stop_signal = "SIGTERM"

    with pytest.raises(TrainingStopped):
        Trainer(_config(tmp_path, prepared), tmp_path / "cut", callbacks=[StopAtStep2()]).fit()
    Trainer(_config(tmp_path, prepared), tmp_path / "cut", resume=True).fit()
    assert losses(tmp_path / "cut") == full


def test_trainer_refuses_mismatches(corpus, prepared, tmp_path):
    from qtoy_core.training.trainer import Trainer

    with pytest.raises(VocabMismatchError, match="300"):
        Trainer(_config(tmp_path, prepared, model={"vocab_size": 64}), tmp_path / "a").setup()
    with pytest.raises(DataError, match="not the one .* was tokenized with"):
        Trainer(_config(tmp_path, prepared, dataset={"name": "text", "data_files": [str(corpus / "docs.jsonl")],
                                                     "tokenizer": str(corpus / "other.json")}), tmp_path / "b").setup()
    with pytest.raises(DataError, match="packed"):
        Trainer(_config(tmp_path, prepared, mode="padded"), tmp_path / "c").setup()
    with pytest.raises(IncompleteShardsError, match="not a prepared-shards folder"):
        Trainer(_config(tmp_path, tmp_path / "nothing"), tmp_path / "d").setup()


def test_endless_source_needs_max_documents(tmp_path):
    with pytest.raises(DataError, match="--max-documents"):
        prepare_shards(build_dataset("synthetic"), tmp_path / "s")


def test_cli_prepare_and_train(corpus, tmp_path):
    from helpers.in_process import qtoy

    out = tmp_path / "cli"
    code, text = qtoy("data", "prepare", "--dataset", "text", "--data-files", corpus / "docs.jsonl", "--tokenizer",
                      corpus / "tokenizer.json", "--set", "val_fraction=0.2", "--out", out, "--num-proc", "1")
    assert code == 0, text
    assert "tokens/s" in text and "qtoy train --data" in text
    code, text = qtoy("train", "--data", out, "--model-type", "attention_only_1L", "--d-model", "16", "--n-head", "2",
                      "--n-ctx", "16", "--batch-size", "2", "--max-iters", "2", "--eval-interval", "2",
                      "--eval-iters", "1", "--precision", "fp32", "--no-compile", "--out", tmp_path / "run", "--quiet")
    assert code == 0, text
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["prepared"] == str(out)
    code, text = qtoy("eval", tmp_path / "run", "--eval-iters", "2", "--json")  # on the shards' validation split
    assert code == 0, text
    assert json.loads(text[text.index("{"):])["batches"] == 2


def test_several_shard_files_read_as_one_stream(corpus, prepared, tmp_path):
    manifest = prepare_shards(_dataset(corpus), tmp_path / "small", chunk_docs=8, shard_tokens=400)
    assert len(manifest["splits"]["train"]["shards"]) > 3
    for order in ("random", "sequential"):
        one = iter(ShardBatches(prepared, split="train", n_ctx=16, batch_size=8, order=order, seed=5))
        many = iter(ShardBatches(tmp_path / "small", split="train", n_ctx=16, batch_size=8, order=order, seed=5))
        assert all(torch.equal(next(one).tokens, next(many).tokens) for _ in range(30))
    one = list(ShardBatches(prepared, split="validation", n_ctx=16, batch_size=3))
    many = list(ShardBatches(tmp_path / "small", split="validation", n_ctx=16, batch_size=3))
    assert len(one) == len(many) and all(torch.equal(a.tokens, b.tokens) for a, b in zip(one, many))
