"""Model cards (hub format, read back with huggingface_hub's own parser), the folder `qtoy push`
would upload, and one clear error when the hub cannot be reached."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from qtoy_core import ToyTransformer, build_model
from qtoy_core.training.config import assemble_run_config
from qtoy_core.training.run_folder import read_metrics
from qtoy_core.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from fixed_stream import fixed_batches, tiny_run_config  # noqa: E402
from test_trackers_samples import word_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    Trainer(assemble_run_config(tiny_run_config()), out, train_batches=fixed_batches(),
            val_batches=list(fixed_batches(2, seed=9)), tokenizer=word_tokenizer()).fit()
    return out


def test_save_pretrained_writes_a_hub_model_card_and_the_tokenizer(tmp_path):
    model = build_model("transformer_1L", attn="bilinear", mlp="bilinear", d_model=16, n_head=2, vocab_size=64, n_ctx=8)
    model.save_pretrained(tmp_path, tokenizer=word_tokenizer())
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "qtoy"
    assert {"qtoy", "transformer_1L", "attention-bilinear", "mlp-bilinear"} <= set(card.data.tags)
    assert "| attention | bilinear | qtoy" in card.text and "ToyTransformer.from_pretrained" in card.text
    assert (tmp_path / "tokenizer.json").exists()
    assert ToyTransformer.from_pretrained(tmp_path).config == model.config


def test_a_run_folder_gets_a_card_with_its_final_losses(run):
    card = ModelCard.load(run / "README.md")
    metrics = read_metrics(run)
    val = [m for m in metrics if "val_loss" in m][-1]
    train = [m for m in metrics if "loss" in m][-1]
    (result,) = card.data.eval_results
    assert result.metric_type == "loss" and result.metric_value == pytest.approx(val["val_loss"], abs=1e-4)
    assert result.dataset_split == "validation"
    assert f"final training loss: {train['loss']:.4f}" in card.text
    assert f"steps: {train['step']:,}, tokens: {train['tokens']:,}" in card.text


def test_push_dry_run_writes_exactly_what_would_be_uploaded(run, tmp_path):
    from qtoy_cli.main import cli

    result = CliRunner().invoke(cli, ["push", str(run), "someone/tiny", "--dry-run", str(tmp_path / "up")])
    assert result.exit_code == 0, result.output
    up = tmp_path / "up"
    assert sorted(p.name for p in up.iterdir()) == ["README.md", "config.json", "curves.png", "model.safetensors",
                                                    "tokenizer.json"]
    assert (up / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    card = ModelCard.load(up / "README.md")
    assert card.data.model_name == "someone/tiny" and "![loss curves](curves.png)" in card.text
    assert 'hf_hub_download("someone/tiny", "tokenizer.json")' in card.text
    assert ToyTransformer.from_pretrained(up).num_parameters > 0  # the folder loads as a model
    assert "dry run: nothing uploaded" in result.output


def _push(run, env):
    return subprocess.run([sys.executable, "-m", "qtoy_cli.main", "push", str(run), "someone/tiny"],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_push_with_the_hub_switched_off_is_one_clear_error(run):
    result = _push(run, {"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "HF_HUB_OFFLINE=0" in result.stderr and "--dry-run" in result.stderr


def test_push_to_an_unreachable_hub_is_one_clear_error(run):
    # a closed port on this machine's loopback: connection refused, at once
    result = _push(run, {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Cannot reach the Hugging Face hub" in result.stderr


def test_push_of_a_folder_that_is_not_a_model_names_the_problem(tmp_path):
    from qtoy_core import QtoyError
    from qtoy_core.publish import prepare_upload

    with pytest.raises(QtoyError, match="not a qtoy model or run"):
        prepare_upload(tmp_path, tmp_path / "up")
