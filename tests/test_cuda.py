"""The CUDA path, where a GPU is present (every test here is marked `cuda` and skips without one):
a training step under bf16 autocast, evaluation, generation (recurrent state against the full
forward pass), the analysis (a cache and the circuits, against the CPU model), and prepared
shards delivered in pinned memory. benchmarks/gpu_check.sh runs them on a GPU machine."""

import json

import pytest
import torch

from qtoy_core.config import ModelConfig
from qtoy_core.model import ToyTransformer

pytestmark = pytest.mark.cuda

TINY = dict(model_type="transformer_2L", d_model=32, n_head=2, n_ctx=16, vocab_size=64)


def _batches(n_ctx=16, vocab=64, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (batch, n_ctx + 1), generator=g)


def _config(**train):
    from qtoy_core.training.config import RunConfig

    return RunConfig.model_validate({"model": TINY, "train": {"batch_size": 4, "max_iters": 6, "eval_interval": 3,
                                                            "eval_iters": 2, "warmup": 1, "device": "cuda", **train}})


def test_training_and_eval_on_cuda_follow_the_cpu_run(tmp_path):
    from qtoy_core.training.trainer import Trainer

    runs = {}
    for device in ("cuda", "cpu"):
        cfg = _config(device=device, precision="fp32", compile=False)
        trainer = Trainer(cfg, tmp_path / device, train_batches=_batches(), val_batches=list(_batches_take(3)))
        summary = trainer.fit()
        assert next(trainer.model.parameters()).device.type == device
        runs[device] = [r["loss"] for r in map(json.loads, (tmp_path / device / "metrics.jsonl").read_text().splitlines())
                        if "loss" in r] + [summary["val_loss"]]
    # same init, same batches: fp32 on the GPU follows the CPU run closely (TF32 off by default)
    assert runs["cuda"] == pytest.approx(runs["cpu"], rel=1e-3)


def _batches_take(n):
    it = _batches(seed=1)
    return [next(it) for _ in range(n)]


def test_bf16_autocast_and_compile_train_on_cuda(tmp_path):
    from qtoy_core.training.trainer import Trainer

    trainer = Trainer(_config(precision="auto", compile=True, max_iters=20, learning_rate=3e-3), tmp_path / "run",
                      train_batches=_cycle(_batches_take(2)), val_batches=_batches_take(2))
    summary = trainer.fit()
    assert summary["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert summary["compiled"]
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] - 0.1  # it learns two repeated batches


def _cycle(items):
    while True:
        yield from items


def _model(device):
    torch.manual_seed(0)
    model = ToyTransformer(ModelConfig.model_validate(TINY))
    with torch.no_grad():  # non-zero output projections, so every path carries signal
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(device).eval()


def test_generate_on_cuda_recurrent_equals_full_forward():
    from qtoy_core.generate import generate

    model = _model("cuda")
    prompt = torch.randint(0, 64, (2, 5), device="cuda")
    cached = generate(model, prompt, 8, temperature=0, cache_mode="recurrent")
    full = generate(model, prompt, 8, temperature=0, cache_mode=None)
    assert cached.device.type == "cuda" and torch.equal(cached, full)
    cpu = generate(_model("cpu"), prompt.cpu(), 8, temperature=0, cache_mode=None)
    assert torch.equal(full.cpu(), cpu)


def test_analysis_on_cuda_equals_cpu():
    from qtoy_core.analysis import run_with_cache
    from qtoy_core.analysis.circuits import ov_circuit, qk_circuit

    gpu, cpu = _model("cuda"), _model("cpu")
    tokens = torch.randint(0, 64, (2, 16))
    logits_g, cache_g = run_with_cache(gpu, tokens.cuda())
    logits_c, cache_c = run_with_cache(cpu, tokens)
    torch.testing.assert_close(logits_g.cpu(), logits_c, rtol=1e-4, atol=1e-5)
    for name in cache_c:
        torch.testing.assert_close(cache_g[name].cpu(), cache_c[name], rtol=1e-4, atol=1e-5)
    for layer in range(2):
        torch.testing.assert_close(qk_circuit(gpu, layer).AB.cpu(), qk_circuit(cpu, layer).AB, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ov_circuit(gpu, layer).AB.cpu(), ov_circuit(cpu, layer).AB, rtol=1e-4, atol=1e-5)


def test_shard_batches_arrive_pinned(tmp_path):
    from qtoy_core.data import Tokenizer, build_dataset, train_bpe
    from qtoy_core.data.shards import ShardBatches, prepare_shards

    docs = [f"story {i} " + "la " * (i % 7) for i in range(120)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    Tokenizer(train_bpe(docs, vocab_size=300)).save(tmp_path / "tok.json")
    ds = build_dataset({"name": "text", "data_files": [str(tmp_path / "d.jsonl")], "tokenizer": str(tmp_path / "tok.json"),
                        "val_fraction": 0.2})
    prepare_shards(ds, tmp_path / "shards")
    pinned = ShardBatches(tmp_path / "shards", split="train", n_ctx=8, batch_size=4, pin_memory=True)
    plain = ShardBatches(tmp_path / "shards", split="train", n_ctx=8, batch_size=4)
    a, b = next(iter(pinned)), next(iter(plain))
    assert a.tokens.is_pinned() and not b.tokens.is_pinned()
    assert torch.equal(a.tokens.to("cuda", non_blocking=True).cpu(), b.tokens)
