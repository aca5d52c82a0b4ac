"""Run by torchrun in tests/test_training.py: train on a fixed stream, rank r taking its slice of
each global batch, then save the final parameters of this rank."""

import sys

import torch

from qtoy_core.training.config import assemble_run_config
from qtoy_core.training.trainer import Trainer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fixed_stream import GLOBAL_BATCH, fixed_batches, tiny_run_config  # noqa: E402

out = sys.argv[1]
rank = int(__import__("os").environ["RANK"])
world = int(__import__("os").environ["WORLD_SIZE"])
per_rank = GLOBAL_BATCH // world
config = assemble_run_config(tiny_run_config(batch_size=per_rank))
train = ((t[rank * per_rank:(rank + 1) * per_rank], None) for t in fixed_batches())
val = [(t[rank * per_rank:(rank + 1) * per_rank], None) for t in fixed_batches(2, seed=99)]
trainer = Trainer(config, out, train_batches=train, val_batches=val)
trainer.fit()
torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, f"{out}/params_rank{rank}.pt")
