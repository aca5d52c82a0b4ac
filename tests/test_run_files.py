"""qtoy_core.run_files: one atomic writer, one JSON Lines helper, one way to open a trained folder."""

import json
import os
import stat

import pytest
import torch

from qtoy_core import (
    CheckpointError,
    Tokenizer,
    append_jsonl,
    atomic_path,
    build_model,
    load_run,
    read_jsonl,
    train_bpe,
    truncate_jsonl,
    write_atomic,
)
from qtoy_core import run_files as run_files_mod


def _no_temporaries(folder):
    return not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_write_atomic_replaces_with_usual_permissions_and_syncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(run_files_mod.os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)),
                                                              real_fsync(fd))[1])
    target = tmp_path / "sub" / "config.json"  # the folder is created
    write_atomic(target, "first\n")
    write_atomic(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert synced == [False, True, False, True]  # the file, then the folder holding the rename, each time
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode == 0o666 & ~run_files_mod.current_umask()  # not mkstemp's 0600
    assert _no_temporaries(target.parent)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and _no_temporaries(tmp_path)


def test_read_jsonl_skips_torn_and_foreign_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    assert read_jsonl(path) == []  # missing: no records
    path.write_text('{"step": 1, "loss": 2.5}\n[1, 2]\nnot json\n\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo',
                    encoding="utf-8")
    assert read_jsonl(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]


def test_append_then_truncate_keeps_lines_up_to_the_step_verbatim(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"step": 1, "loss": 3.0})
    append_jsonl(path, {"step": 2, "loss": 2.0}, {"step": 2, "val_loss": 2.1})  # several records, one write
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 3, "loss": 1.5}\n{"summary": true}\n{"step": 4, "lo')  # a summary, then a torn line
    original = path.read_text(encoding="utf-8").splitlines()
    truncate_jsonl(path, after_step=2)
    assert path.read_text(encoding="utf-8").splitlines() == original[:3]
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 2]
    append_jsonl(path, {"step": 3, "loss": 1.4})  # the resumed run continues on a clean line
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 2, 3]
    truncate_jsonl(path, after_step=0, key="step")
    assert path.read_text(encoding="utf-8") == ""
    truncate_jsonl(tmp_path / "absent.jsonl", after_step=5)
    assert not (tmp_path / "absent.jsonl").exists()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run-shaped folder: a model with its tokenizer at the top, and one checkpoint folder without."""
    run = tmp_path_factory.mktemp("run")
    tokenizer = Tokenizer(train_bpe(["the cat sat on the mat"] * 20, vocab_size=280))
    torch.manual_seed(0)
    model = build_model("attention_only_1L", d_model=16, n_head=2, n_ctx=8, vocab_size=tokenizer.vocab_size)
    model.save_pretrained(run)
    tokenizer.save(run / "tokenizer.json")
    model.save_pretrained(run / "checkpoints" / "step_00000001")
    return run, model, tokenizer


def test_load_run_gives_model_tokenizer_and_document(run_folder):
    run, model, tokenizer = run_folder
    loaded, tok, document = load_run(run)
    tokens = torch.randint(0, tokenizer.vocab_size, (1, 8))
    torch.testing.assert_close(loaded(tokens), model(tokens))
    assert tok.fingerprint() == tokenizer.fingerprint()
    assert document == json.loads((run / "config.json").read_text())


def test_load_run_of_a_checkpoint_finds_the_runs_tokenizer(run_folder, tmp_path):
    run, _, tokenizer = run_folder
    _, tok, _ = load_run(run / "checkpoints" / "step_00000001")
    assert tok is not None and tok.fingerprint() == tokenizer.fingerprint()
    bare = tmp_path / "bare"
    build_model("attention_only_1L", d_model=16, n_head=2, n_ctx=8, vocab_size=32).save_pretrained(bare)
    assert load_run(bare)[1] is None  # a model saved without a tokenizer


def test_load_run_of_a_folder_that_is_not_a_model_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a qtoy model or run"):
        load_run(tmp_path)
