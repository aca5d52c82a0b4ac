"""The deterministic split, rank sharding, packed/padded batches and exact resume of StreamingTextDataset."""

import io
import json

import pytest
import torch

from qtoy_core.data import (
    Batch,
    DataConfig,
    EmptySplitError,
    ResumeError,
    StreamingTextDataset,
    Tokenizer,
    build_dataset,
    split_of,
    split_value,
    train_bpe,
)

N_DOCS = 240


def _doc(i: int) -> str:
    return f"Story {i}: " + "la " * (i % 23) + f"and then {i} ended."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    docs = [_doc(i) for i in range(N_DOCS)]
    with open(root / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": len(d)}) + "\n")
    tok = Tokenizer(train_bpe(docs, vocab_size=320))
    tok.save(root / "tokenizer.json")
    return root, docs


def _dataset(files, **options):
    root, _ = files
    return build_dataset({"name": "text", "data_files": [str(root / "docs.jsonl")],
                          "tokenizer": str(root / "tokenizer.json"), "val_fraction": 0.2, **options})


def _same(a: Batch, b: Batch) -> bool:
    if (a.attention_mask is None) != (b.attention_mask is None):
        return False
    return torch.equal(a.tokens, b.tokens) and (a.attention_mask is None or torch.equal(a.attention_mask, b.attention_mask))


def _keys(batches) -> set[int]:
    return {k for b in batches for k in b.doc_ids.flatten().tolist() if k >= 0}


# -- the split ----------------------------------------------------------------------------------------
def test_split_hash_is_stable_and_seeded():
    # blake2b, not Python's hash: the same number on every machine and run (PYTHONHASHSEED-proof)
    assert split_value("Once upon a time.", 0) == pytest.approx(0.0935418303, abs=1e-9)
    assert split_value("Once upon a time.", 1) != split_value("Once upon a time.", 0)
    assert split_of("same text", val_fraction=0.5, seed=3) == split_of("same text", val_fraction=0.5, seed=3)
    values = [split_value(_doc(i)) for i in range(2000)]
    assert 0.15 < sum(v < 0.2 for v in values) / 2000 < 0.25


def test_split_is_deterministic_disjoint_and_complete(files):
    _, docs = files
    train = list(_dataset(files).documents("train"))
    val = list(_dataset(files).documents("validation"))
    assert train == list(_dataset(files).documents("train"))  # same order every time
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert all(split_of(t, val_fraction=0.2) == "validation" for t in val)
    other = list(_dataset(files, split_seed=1).documents("validation"))
    assert other != val


@pytest.mark.parametrize("split", ["train", "validation"])
def test_ranks_partition_the_split(files, split):
    ds = _dataset(files)
    whole = [k for k, _ in ds.records(split)]
    parts = [[k for k, _ in ds.records(split, rank=r, world_size=2)] for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(whole)


def test_stream_ranks_cover_the_single_process_documents(files):
    ds = _dataset(files)
    kw = dict(split="validation", n_ctx=16, batch_size=4, track_documents=True)
    single = _keys(StreamingTextDataset(ds, **kw))
    ranks = [_keys(StreamingTextDataset(ds, rank=r, world_size=2, **kw)) for r in (0, 1)]
    assert not ranks[0] & ranks[1] and ranks[0] | ranks[1] == single
    assert single == {k for k, _ in ds.records("validation")}


# -- batches ------------------------------------------------------------------------------------------
def test_packed_batches_join_documents_with_eos(files):
    ds = _dataset(files)
    tok = ds.tokenizer()
    stream = StreamingTextDataset(ds, split="validation", n_ctx=16, batch_size=4)
    batches = list(stream)
    assert all(b.tokens.shape[1] == 17 and b.tokens.dtype == torch.long for b in batches)
    assert all(b.attention_mask is None for b in batches[:-1])
    # rows overlap by one token: row i+1 starts with the last token of row i
    rows = [(row, None if b.attention_mask is None else b.attention_mask[i])
            for b in batches for i, row in enumerate(b.tokens)]
    flat = rows[0][0].tolist()
    for (prev, _), (row, mask) in zip(rows, rows[1:]):
        assert row[0] == prev[-1]
        flat += row[1:].tolist() if mask is None else row[1:int(mask.sum())].tolist()
    expected = [t for text in ds.documents("validation") for t in tok.encode(text) + [tok.eos_id]]
    assert flat == expected
    assert sum(b.n_targets for b in batches) == len(expected) - 1  # every token but the first, once


def test_padded_batches_one_document_per_row(files):
    ds = _dataset(files)
    tok = ds.tokenizer()
    stream = StreamingTextDataset(ds, split="validation", n_ctx=16, batch_size=4, mode="padded",
                                  track_documents=True)
    batches = list(stream)
    docs = [tok.encode(t) + [tok.eos_id] for t in ds.documents("validation")]
    targets = 0
    for b in batches:
        assert b.attention_mask is not None and b.tokens.shape == b.attention_mask.shape
        for row, mask, keys in zip(b.tokens, b.attention_mask, b.doc_ids):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()  # right-padded
            assert (row[n:] == tok.padding_id).all() and (keys[n:] == -1).all()
            assert len(set(keys[:n].tolist())) == 1  # one document per row
        assert (b.loss_mask == b.attention_mask[:, 1:]).all()
        targets += b.n_targets
    assert targets == sum(len(d) - 1 for d in docs)  # no loss on padding, nothing lost
    first = batches[0]
    n = int(first.attention_mask[0].sum())
    assert first.tokens[0, :n].tolist() == docs[0][:17]
    if len(docs[0]) <= 17:
        assert first.tokens[0, n - 1] == tok.eos_id


def test_long_documents_continue_on_the_next_row(files):
    ds = _dataset(files)
    tok = ds.tokenizer()
    stream = StreamingTextDataset(ds, split="validation", n_ctx=4, batch_size=64, mode="padded")
    batch = next(iter(stream))
    doc = tok.encode(next(ds.documents("validation"))) + [tok.eos_id]
    rows = [batch.tokens[i, : int(batch.attention_mask[i].sum())].tolist() for i in range(batch.tokens.shape[0])]
    rebuilt = rows[0]
    for row in rows[1:]:
        if len(rebuilt) >= len(doc):
            break
        assert row[0] == rebuilt[-1]
        rebuilt += row[1:]
    assert rebuilt[: len(doc)] == doc


def test_validation_is_finite_and_restartable_train_loops(files):
    ds = _dataset(files)
    val = StreamingTextDataset(ds, split="validation", n_ctx=16, batch_size=4)
    first, second = list(val), list(val)
    assert len(first) == len(second) > 0 and all(_same(a, b) for a, b in zip(first, second))
    train = StreamingTextDataset(ds, split="train", n_ctx=16, batch_size=8, shuffle_buffer=16, tokenize_batch=8)
    it = iter(train)
    for _ in range(300):
        next(it)
    assert train.epoch >= 2  # a finite dataset never runs dry
    state = train.state_dict()
    assert len(state["buffer"]) <= 16  # bounded shuffle buffer
    assert len(state["tokens"]) <= 8 * 16 + 1 + 8 * 100


def test_epochs_reshuffle_deterministically(files):
    ds = _dataset(files)
    kw = dict(split="train", n_ctx=8, batch_size=1, mode="padded", shuffle_buffer=8, tokenize_batch=1,
              track_documents=True)
    stream = StreamingTextDataset(ds, **kw)
    order, it = [], iter(stream)
    while stream.epoch < 2:
        key = next(it).doc_ids[0, 0].item()
        if not order or order[-1][1] != key:
            order.append((stream.epoch, key))
    n_train = sum(1 for _ in ds.records("train"))
    epochs = [[k for e, k in order if e == ep] for ep in (0, 1)]
    assert sorted(epochs[0]) == sorted(set(epochs[0])) and len(epochs[0]) >= n_train - 1
    assert epochs[0][:20] != epochs[1][:20]  # reshuffled
    same = [b.doc_ids[0, 0].item() for b in _take(StreamingTextDataset(ds, **kw), 40)]
    assert same == [b.doc_ids[0, 0].item() for b in _take(StreamingTextDataset(ds, **kw), 40)]


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


# -- resume -------------------------------------------------------------------------------------------
def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_exact_resume_across_epochs(files, mode):
    ds = _dataset(files)
    kw = dict(split="train", n_ctx=16, batch_size=4, mode=mode, shuffle_buffer=16, tokenize_batch=8)
    reference = _take(StreamingTextDataset(ds, **kw), 260)
    epochs_seen = set()
    for k in (0, 3, 41, 97, 180, 230):
        stream = StreamingTextDataset(ds, **kw)
        it = iter(stream)
        for _ in range(k):
            next(it)
        state = _roundtrip(stream.state_dict())
        epochs_seen.add(state["epoch"])
        fresh = StreamingTextDataset(_dataset(files), **kw)
        fresh.load_state_dict(state)
        resumed = _take(fresh, 30)
        assert all(_same(a, b) for a, b in zip(resumed, reference[k:k + 30])), (mode, k)
    assert len(epochs_seen) >= 2  # some states were saved in a later epoch than the first


def test_resume_without_the_datasets_state_skips_ahead(files, monkeypatch):
    """Resuming works by skipping records when the `datasets` stream state cannot be used."""
    ds = _dataset(files)
    kw = dict(split="train", n_ctx=16, batch_size=4, shuffle_buffer=16, tokenize_batch=8)
    reference = _take(StreamingTextDataset(ds, **kw), 60)
    stream = StreamingTextDataset(ds, **kw)
    it = iter(stream)
    for _ in range(30):
        next(it)
    state = stream.state_dict()
    assert state["source_state"] is not None
    state["source_state"] = {"bogus": True}
    fresh = StreamingTextDataset(ds, **kw)
    fresh.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(_take(fresh, 30), reference[30:]))


def test_resume_state_breaking_iteration_keeps_position(files):
    ds = _dataset(files)
    kw = dict(split="train", n_ctx=16, batch_size=4, shuffle_buffer=16, tokenize_batch=8)
    reference = _take(StreamingTextDataset(ds, **kw), 40)
    stream = StreamingTextDataset(ds, **kw)
    for i, _ in enumerate(stream):  # the iterator is dropped after the loop: its position must survive
        if i == 19:
            break
    assert all(_same(a, b) for a, b in zip(_take(stream, 20), reference[20:]))


def test_resume_refuses_another_stream(files):
    ds = _dataset(files)
    stream = StreamingTextDataset(ds, split="train", n_ctx=16, batch_size=4)
    state = stream.state_dict()
    other = StreamingTextDataset(ds, split="train", n_ctx=16, batch_size=8)
    with pytest.raises(ResumeError, match="batch_size: saved 4, now 8"):
        other.load_state_dict(state)


def test_empty_split_is_a_clear_error(files):
    ds = _dataset(files, val_fraction=0.0)
    with pytest.raises(EmptySplitError, match="validation split .* is empty"):
        list(StreamingTextDataset(ds, split="validation", n_ctx=16, batch_size=4))


def test_from_config(files):
    root, _ = files
    data = DataConfig(dataset={"name": "text", "data_files": [str(root / "docs.jsonl")],
                               "tokenizer": str(root / "tokenizer.json")}, mode="padded", shuffle_buffer=8)
    assert DataConfig.model_validate_json(data.model_dump_json()) == data
    stream = StreamingTextDataset.from_config(data, split="train", n_ctx=8, batch_size=2)
    assert stream.mode == "padded" and next(iter(stream)).attention_mask is not None
    assert DataConfig().dataset.name == "synthetic"
    assert DataConfig(dataset={"difficulty": 0.2}).dataset.difficulty == 0.2  # options of the default dataset
