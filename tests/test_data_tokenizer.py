"""The Tokenizer interface, BPE training, the tinymodel-style mapped tokenizer, and check_vocab."""

import pickle

import pytest
import torch

from qtoy_core.config import make_model_config
from qtoy_core.data import (
    MappedTokenizer,
    Tokenizer,
    TokenizerError,
    VocabMismatchError,
    cached_tokenizer,
    check_vocab,
    train_bpe,
)
from qtoy_core.data.tokenizer import tinymodel_clean

CORPUS = [f"Once upon a time, {name} saw a {thing} in the {place}. The end." for name in ("Mia", "Tom", "Zed")
          for thing in ("cat", "dog", "red ball") for place in ("park", "forest")] * 5


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer(train_bpe(CORPUS, vocab_size=300))


def test_training_is_deterministic_and_fills_the_vocabulary():
    a, b = train_bpe(CORPUS, vocab_size=400), train_bpe(CORPUS, vocab_size=400)
    assert a.to_str() == b.to_str()
    # the corpus has too few merges for 400 tokens: reserved tokens fill it up exactly
    assert a.get_vocab_size(with_added_tokens=True) == 400


def test_interface_and_special_ids(bpe, tmp_path):
    assert bpe.vocab_size == 300
    assert bpe.eos_id == bpe.backend.token_to_id("<|endoftext|>") and bpe.separator_id == bpe.eos_id
    assert bpe.bos_id is None and bpe.pad_id is None and bpe.unk_id is None
    assert bpe.padding_id == bpe.eos_id
    text = "Once upon a time, Mia saw a café."
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text  # byte-level: exact round trip, no specials added
    assert bpe.encode_batch([text, "The end."]) == [ids, bpe.encode("The end.")]
    ids2, offsets, norm = bpe.encode_with_offsets(text)
    assert ids2 == ids and norm == text
    covered, cursor = "", 0  # a multi-byte character split over two byte tokens: both cover it
    for start, end in offsets:
        covered += text[max(start, cursor):end]
        cursor = max(cursor, end)
    assert covered == text

    batch, mask = bpe.enc(["The end.", text])
    assert batch.dtype == torch.long and mask.dtype == torch.long and batch.shape == mask.shape
    assert batch.shape[1] == len(ids) and mask[0].sum() == len(bpe.encode("The end."))
    assert (batch[0][mask[0] == 0] == bpe.padding_id).all()  # right-padded with the pad id
    assert bpe.dec(batch, mask) == ["The end.", text]
    assert bpe.dec(torch.tensor(ids)) == [text]
    eos_batch, _ = bpe.enc(["The end."], add_eos=True)
    assert eos_batch[0, -1] == bpe.eos_id

    path = tmp_path / "tok.json"
    bpe.save(path)
    again = Tokenizer.from_file(path)
    assert again.fingerprint() == bpe.fingerprint() and again.encode(text) == ids
    assert pickle.loads(pickle.dumps(bpe)).encode(text) == ids
    assert len(bpe.fingerprint()) == 16


def test_explicit_specials_and_missing_file(bpe, tmp_path):
    tok = Tokenizer(bpe.backend, eos=None, bos="<|endoftext|>")
    assert tok.eos_id is None and tok.separator_id == tok.bos_id
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        _ = Tokenizer(bpe.backend, eos=None, bos=None).separator_id
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_wordpiece_specials_and_template_is_not_applied():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

    tk = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[EOS]"],
                                                             show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 1)])
    tok = Tokenizer(tk)
    assert (tok.unk_id, tok.eos_id, tok.bos_id, tok.pad_id) == (0, 1, None, None)
    ids = tok.encode("Mia saw a zebra")
    assert ids[-1] != tok.eos_id  # the template's [EOS] is not appended: the pipeline places separators
    assert tok.unk_id in ids and tok.decode(ids).startswith("mia saw a")


def test_mapped_tokenizer_maps_outside_pieces_to_unk(bpe, tmp_path):
    base = train_bpe(CORPUS, vocab_size=300)
    base.add_special_tokens(["[BEGIN]", "[END]", "[PAD]", "[UNK]"])
    specials = [base.token_to_id(t) for t in ("[BEGIN]", "[END]", "[PAD]", "[UNK]")]
    keep = [i for i in range(260) if base.id_to_token(i) != "<|endoftext|>"]
    tok = MappedTokenizer(base, keep + specials, normalizer="tinymodel",
                          specials={"bos": "[BEGIN]", "eos": "[END]", "pad": "[PAD]", "unk": "[UNK]"})
    assert tok.vocab_size == len(keep) + 4
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == tuple(range(len(keep), len(keep) + 4))
    ids = tok.encode("Once upon a time, Mia saw a cat.")
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.unk_id in ids  # merged pieces above id 260 are outside the subset
    known = tok.encode("a a")
    assert tok.decode(known) == "a a"
    path = tmp_path / "mapped.json"
    tok.save(path)
    again = Tokenizer.from_file(path)
    assert isinstance(again, MappedTokenizer) and again.fingerprint() == tok.fingerprint()
    assert again.encode("Once upon a time") == tok.encode("Once upon a time")
    assert pickle.loads(pickle.dumps(tok)).encode("Mia") == tok.encode("Mia")


def test_tinymodel_cleaning():
    assert tinymodel_clean("She said \u201chi\u201d \u2014 it\u2019s\u2026\n\n\nOK  \t") == 'She said "hi" - it\'s...\nOK '
    assert tinymodel_clean("Lily\u00e2\u20ac\u2122s caf\u00e9") == "Lily's cafe"


def test_cached_tokenizer_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOY_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return train_bpe(CORPUS, vocab_size=300)

    a = cached_tokenizer("unit-test", build)
    b = cached_tokenizer("unit-test", build)
    assert calls == [1] and a.fingerprint() == b.fingerprint()
    assert (tmp_path / "tokenizers" / "unit-test.json").is_file()


def test_check_vocab_names_both_numbers(bpe):
    check_vocab(make_model_config(vocab_size=300), bpe)
    with pytest.raises(VocabMismatchError) as err:
        check_vocab(make_model_config(vocab_size=1000), bpe)
    assert "1000" in str(err.value) and "300" in str(err.value)
    with pytest.raises(VocabMismatchError, match="4096.*300"):
        check_vocab({"model": {"vocab_size": 4096}}, bpe)
