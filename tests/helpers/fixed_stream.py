"""A fixed, in-memory token stream for training tests that must not depend on a dataset."""

import torch

GLOBAL_BATCH = 8
N_CTX = 16
VOCAB = 64


def fixed_batches(n: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: each row counts upward from a random start (mod VOCAB)
    for _ in range(n):
        start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
        yield (start + torch.arange(N_CTX + 1)) % VOCAB


def tiny_run_config(batch_size: int = GLOBAL_BATCH, **train):
    return {
        "model": {"model_type": "transformer_1L", "d_model": 32, "n_head": 2, "n_ctx": N_CTX, "vocab_size": VOCAB},
        "optimizer": {"name": "adam", "lr": 1e-2},
        "train": {"batch_size": batch_size, "max_iters": 12, "eval_interval": 6, "eval_iters": 2, "warmup": 2,
                  "precision": "fp32", "compile": False, "seed": 3, **train},
    }
