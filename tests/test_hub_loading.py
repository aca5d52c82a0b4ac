"""from_pretrained with a hub repo id runs huggingface_hub's real download code, here against a local
hub cache (the hub itself is unreachable in tests), and fails clearly when nothing is there."""

import pytest
import torch

from qtoy_core import CheckpointError, ToyTransformer, build_model


def _fake_hub_cache(tmp_path, repo_id, model):
    """The folder layout huggingface_hub keeps for a downloaded repo: models--org--name/..."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    model.save_pretrained(root / "snapshots" / revision)
    return tmp_path


def test_hub_repo_id_loads_through_the_hub_cache(tmp_path):
    torch.manual_seed(0)
    model = build_model("transformer_1L", d_model=32, n_head=2, vocab_size=50, n_ctx=16)
    cache = _fake_hub_cache(tmp_path, "qtoy-user/tiny", model)
    loaded = ToyTransformer.from_pretrained("qtoy-user/tiny", cache_dir=cache)
    tokens = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(loaded(tokens), model(tokens))
    assert loaded.config == model.config


@pytest.mark.parametrize("name", ["someone/not-cached", "runs/typo/x"])
def test_unreachable_hub_or_bad_path_is_one_clear_error(tmp_path, name):
    with pytest.raises(CheckpointError, match="not a local model or run folder"):
        ToyTransformer.from_pretrained(name, cache_dir=tmp_path)
