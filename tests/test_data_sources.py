"""Each hub dataset's loading code on small local files in that dataset's real format, split detection in a
hub-like folder, the text dataset's trained tokenizer, bad input, and the fast offline failure."""

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qtoy_core.data import (
    DataError,
    DataFileError,
    HubUnreachableError,
    MappedTokenizer,
    StreamingTextDataset,
    Tokenizer,
    build_dataset,
    train_bpe,
)

STORIES = [f"Once upon a time, a {animal} named {name} found a {thing}. It was {mood}. The end."
           for animal in ("cat", "dog", "fox") for name in ("Mia", "Leo", "Ava", "Max")
           for thing in ("ball", "kite") for mood in ("fun", "great")]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    Tokenizer(train_bpe(STORIES, vocab_size=320)).save(path)
    return str(path)


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _first_batch(ds, **kw):
    return next(iter(StreamingTextDataset(ds, split="train", n_ctx=32, batch_size=2, **kw)))


# -- simplestories ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wordpiece_path(tmp_path_factory):
    """A small lowercasing WordPiece shaped like SimpleStories' (UNK 0, EOS 1, a template adding [EOS])."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

    tk = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(STORIES, trainers.WordPieceTrainer(vocab_size=150, special_tokens=["[UNK]", "[EOS]"],
                                                              show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 1)])
    path = tmp_path_factory.mktemp("wp") / "simplestories-tokenizer.json"
    tk.save(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_simplestories_local_files(tmp_path, wordpiece_path, fmt):
    rows = [{"id": f"{i:032x}", "story": s, "topic": "animals", "word_count": len(s.split())}
            for i, s in enumerate(STORIES)]
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "train.jsonl", rows)
    else:
        path = str(tmp_path / "train.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    ds = build_dataset({"name": "simplestories", "data_files": [path], "tokenizer": wordpiece_path})
    docs = list(ds.documents("train")) + list(ds.documents("validation"))
    assert sorted(docs) == sorted(STORIES)
    tok = ds.tokenizer()
    assert tok.eos_id == 1 and tok.unk_id == 0 and tok.vocab_size <= 150
    assert tok.decode(tok.encode("Once upon a time")) == "once upon a time"
    batch = _first_batch(ds)
    assert (batch.tokens == tok.eos_id).sum() >= 1  # [EOS] between stories, placed by the pipeline
    description = ds.describe()
    assert description["source"] == "files" and description["column"] == "story"
    json.dumps(description)


def test_wrong_column_is_named(tmp_path, wordpiece_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"text": s} for s in STORIES])
    ds = build_dataset({"name": "simplestories", "data_files": [path], "tokenizer": wordpiece_path})
    with pytest.raises(DataFileError, match="no column 'story'.*'text'"):
        next(ds.documents("train"))


# -- tinystories --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tinymodel_files(tmp_path_factory, bpe_path):
    """A stand-in for GPT-Neo + tinymodel's id map: a small BPE and a map keeping its first 200 ids."""
    root = tmp_path_factory.mktemp("tinymodel")
    base = Tokenizer.from_file(bpe_path).backend
    size = base.get_vocab_size(with_added_tokens=True)
    ts_to_neo = torch.tensor(list(range(1, 200)) + [size, size + 1, size + 2, size + 3], dtype=torch.long)
    torch.save(ts_to_neo, root / "ts_tok_ids_to_neo.pt")
    return bpe_path, str(root)


def test_tinystories_text_format(tmp_path, tinymodel_files):
    base, maps = tinymodel_files
    stories = STORIES[:30] + ["Lily\u2019s caf\u00e9 was \u201cbig\u201d \u2014 really\u2026 big."]
    # TinyStories-train.txt / -valid.txt: stories separated by <|endoftext|> lines
    (tmp_path / "TinyStories-valid.txt").write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    ds = build_dataset({"name": "tinystories", "data_files": [str(tmp_path / "TinyStories-valid.txt")],
                        "base_tokenizer": base, "id_maps": maps, "val_fraction": 0.0})
    assert list(ds.documents("train")) == stories
    tok = ds.tokenizer()
    assert isinstance(tok, MappedTokenizer) and tok.vocab_size == 203
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (199, 200, 201, 202)
    assert "Lily's cafe was \"big\" - really... big." == tok.normalize(stories[-1])
    stream = StreamingTextDataset(ds, split="train", n_ctx=64, batch_size=2, shuffle_buffer=1)
    batch = next(iter(stream))
    first = tok.encode(stories[0])
    assert batch.tokens[0, 0] == tok.bos_id and batch.tokens[0, 1:1 + len(first)].tolist() == first
    assert batch.tokens[0, 1 + len(first)] == tok.eos_id  # [BEGIN] story [END]
    assert stream.stats()["unknown_tokens"] > 0  # pieces outside the subset became [UNK], nothing dropped
    assert stream.stats()["documents"] >= 2


def test_tinystories_paragraph_text_and_neo_to_ts_map(tmp_path, tinymodel_files):
    base, maps = tinymodel_files
    fwd = torch.load(os.path.join(maps, "ts_tok_ids_to_neo.pt"), weights_only=True)
    inverse = torch.full((int(fwd.max()) + 1,), len(fwd) - 1, dtype=torch.long)
    inverse[fwd] = torch.arange(len(fwd))
    torch.save(inverse, tmp_path / "neo_tok_ids_to_ts.pt")
    (tmp_path / "sample.txt").write_text("\n\n".join(STORIES[:10]) + "\n", encoding="utf-8")
    ds = build_dataset({"name": "tinystories", "data_files": [str(tmp_path / "sample.txt")], "base_tokenizer": base,
                        "id_maps": str(tmp_path / "neo_tok_ids_to_ts.pt"), "val_fraction": 0.0})
    assert list(ds.documents("train")) == STORIES[:10]  # no <|endoftext|>: blank lines separate documents
    assert ds.tokenizer().to_base == fwd.tolist()


# -- fineweb and a hub-like folder ----------------------------------------------------------------------
def _fineweb_rows(texts, split):
    return [{"text": t, "id": f"<urn:uuid:{split}-{i}>", "dump": "CC-MAIN-2024-10", "url": f"https://x/{i}",
             "date": "2024-02-20", "file_path": "s3://x", "language": "en", "language_score": 0.9,
             "token_count": len(t.split())} for i, t in enumerate(texts)]


def test_fineweb_hub_like_folder_detects_the_train_split(tmp_path, bpe_path):
    data = tmp_path / "fineweb" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_fineweb_rows(STORIES, "train")), data / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(_fineweb_rows(["held out test text"], "test")),
                   data / "test-00000-of-00001.parquet")
    ds = build_dataset({"name": "fineweb", "data_files": [str(tmp_path / "fineweb")], "tokenizer": bpe_path})
    docs = list(ds.documents("train")) + list(ds.documents("validation"))
    assert sorted(docs) == sorted(STORIES)  # the test split's file is not read
    assert ds.describe()["split"] == "train"
    assert _first_batch(ds).tokens.shape == (2, 33)
    # a glob over the parquet files reads them all
    ds = build_dataset({"name": "fineweb", "data_files": [str(data / "*.parquet")], "tokenizer": bpe_path})
    assert len(list(ds.documents("train")) + list(ds.documents("validation"))) == len(STORIES) + 1


def test_datasets_state_is_used_to_resume(tmp_path, bpe_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(_fineweb_rows(STORIES, "train")), path, row_group_size=7)
    ds = build_dataset({"name": "fineweb", "data_files": [path], "tokenizer": bpe_path})
    it = ds.source().open()
    head = [next(it) for _ in range(10)]
    state = it.state()
    it.close()
    resumed = ds.source().open(start=10, state=state)
    assert resumed.resumed and [k for k, _ in resumed] == list(range(10, len(STORIES)))
    assert [k for k, _ in head] == list(range(10))


# -- text: your own files --------------------------------------------------------------------------------
def test_text_dataset_trains_and_caches_a_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOY_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(STORIES[:24]), encoding="utf-8")
    (corpus / "b.txt").write_text("\n\n".join(STORIES[24:]), encoding="utf-8")
    spec = {"name": "text", "data_files": [str(corpus / "*.txt")], "vocab_size": 400}
    tok = build_dataset(spec).tokenizer()
    assert tok.vocab_size == 400 and tok.eos_id is not None
    cached = list((tmp_path / "cache" / "tokenizers").glob("text-*.json"))
    assert len(cached) == 1
    import qtoy_plugins.data.hub_datasets as hub_module

    with monkeypatch.context() as patch:  # a cache hit never trains
        patch.setattr(hub_module, "train_bpe", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
        again = build_dataset(spec).tokenizer()
    assert again.fingerprint() == tok.fingerprint()
    (corpus / "b.txt").write_text("\n\n".join(STORIES[24:] + ["A new story."]), encoding="utf-8")
    assert build_dataset(spec).tokenizer().fingerprint() != tok.fingerprint()  # keyed by content
    ds = build_dataset(spec)
    assert len(list(ds.documents("train"))) + len(list(ds.documents("validation"))) == len(STORIES) + 1


# -- bad input -----------------------------------------------------------------------------------------
def _read(spec):
    ds = build_dataset(spec)
    return list(ds.documents("train"))


def test_missing_and_empty_files(tmp_path, bpe_path):
    base = {"name": "fineweb", "tokenizer": bpe_path}
    with pytest.raises(DataFileError, match="does not exist"):
        _read({**base, "data_files": [str(tmp_path / "nope.parquet")]})
    with pytest.raises(DataFileError, match="no file matches"):
        _read({**base, "data_files": [str(tmp_path / "*.jsonl")]})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFileError, match="empty"):
        _read({**base, "data_files": [str(tmp_path / "empty.jsonl")]})
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(DataFileError, match="cannot tell the format"):
        _read({**base, "data_files": [str(tmp_path / "notes.docx")]})
    with pytest.raises(DataError, match="data_files"):
        build_dataset({"name": "text"})


@pytest.mark.parametrize("name, content", [
    ("latin1.txt", "caf\u00e9 au lait\n\nsecond paragraph\n".encode("latin-1")),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
])
def test_non_utf8_names_the_file(tmp_path, bpe_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataFileError, match=f"{name}.* is not UTF-8 .*0xe9"):
        _read({"name": "text", "data_files": [str(tmp_path / name)], "tokenizer": bpe_path})


def test_broken_json_is_a_clear_error(tmp_path, bpe_path):
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\nnot json at all\n')
    with pytest.raises(DataFileError, match="could not read .*broken.jsonl as json"):
        _read({"name": "text", "data_files": [str(tmp_path / "broken.jsonl")], "tokenizer": bpe_path})


# -- offline -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["simplestories", "tinystories", "fineweb"])
def test_offline_hub_fails_fast_with_the_way_out(monkeypatch, name, bpe_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError) as err:  # the tokenizer
        build_dataset(name).tokenizer()
    assert f"Dataset '{name}'" in str(err.value) and "--tokenizer" in str(err.value)
    with pytest.raises(HubUnreachableError) as err:  # the documents
        next(build_dataset({"name": name, "tokenizer": bpe_path}).documents("train"))
    message = str(err.value)
    assert f"Dataset '{name}'" in message and "could not be reached" in message and "--data-files" in message
    assert time.perf_counter() - start < 5


def test_offline_tokenizer_comes_from_the_hugging_face_cache(tmp_path, monkeypatch, wordpiece_path):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--SimpleStories--SimpleStories-V2-5M"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "tokenizer.json").write_bytes(open(wordpiece_path, "rb").read())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="not the 4019 expected"):
        tok = build_dataset("simplestories").tokenizer()
    assert tok.eos_id == 1 and tok.source == f"hub:SimpleStories/SimpleStories-V2-5M@{commit}/tokenizer.json"


def test_unreachable_hub_without_offline_flag_fails_fast(monkeypatch, bpe_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="could not be reached"):
        next(build_dataset({"name": "fineweb", "tokenizer": bpe_path}).documents("train"))
    assert time.perf_counter() - start < 10


def test_cli_offline_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QTOY_CACHE": str(tmp_path)}
    code = "import sys; from qtoy_cli.main import main; main(sys.argv[1:])"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "data", "preview", "--dataset", "fineweb"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Dataset 'fineweb'" in proc.stderr and "could not be reached" in proc.stderr
    assert "--tokenizer" in proc.stderr or "--data-files" in proc.stderr
    assert time.perf_counter() - start < 30
