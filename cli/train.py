"""`qtoy train`: flags -> RunConfig -> Trainer -> run folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click

from .options import RegistryChoice, component_options, set_option

# Flags that change what is trained; a resumed run keeps its own.
FIXED_ON_RESUME = ("model_type", "attention", "mlp", "positional", "norm", "optimizer", "dataset", "data_files",
                   "tokenizer", "prepared", "doc_mask", "d_model", "n_head", "n_ctx", "d_mlp", "batch_size", "grad_accum", "seed")


def default_run_folder(flags: dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "-".join(str(flags.get(k)) for k in ("model_type", "attention") if flags.get(k)) or "run"
    return Path("runs") / f"{stamp}-{name}"


@click.command("train", context_settings={"show_default": True})
@click.option("--model-type", "--model_type", "model_type", help="attention_only_<N>L or transformer_<N>L")
@component_options
@click.option("--optimizer", type=RegistryChoice("optimizer"), default=None, help="optimizer (default adam)")
@click.option("--dataset", type=RegistryChoice("dataset"), default=None, help="dataset (default synthetic)")
@click.option("--data-files", "--data_files", "data_files", multiple=True, help="local data files or globs")
@click.option("--tokenizer", help="a local tokenizer.json")
@click.option("--data", "prepared", type=click.Path(file_okay=False),
              help="a folder made by `qtoy data prepare`: train from its memory-mapped shards")
@click.option("--shard-order", "--shard_order", "shard_order", type=click.Choice(["random", "sequential"]),
              default=None, help="with --data: random windows (default) or the packed order")
@click.option("--doc-mask/--no-doc-mask", "doc_mask", default=None,
              help="packed rows: attention never crosses a document boundary and positions restart at each "
                   "document (each document trains as if alone; docs/training.md) [off]")
@click.option("--callback", "callbacks", type=RegistryChoice("callback"), multiple=True,
              help="training callbacks, e.g. --callback dynamics")
@click.option("--d-model", "--d_model", "d_model", type=int)
@click.option("--n-head", "--n_head", "n_head", type=int)
@click.option("--n-ctx", "--n_ctx", "n_ctx", type=int)
@click.option("--d-mlp", "--d_mlp", "d_mlp", type=int)
@click.option("--batch-size", "--batch_size", "batch_size", type=int)
@click.option("--grad-accum", "--grad_accum", "grad_accum", type=int)
@click.option("--learning-rate", "--learning_rate", "--lr", "learning_rate", type=float)
@click.option("--min-lr-frac", "--min_lr_frac", "min_lr_frac", type=float)
@click.option("--warmup", type=int)
@click.option("--max-iters", "--max_iters", "max_iters", type=int)
@click.option("--max-tokens", "--max_tokens", "max_tokens", type=int)
@click.option("--eval-interval", "--eval_interval", "eval_interval", type=int)
@click.option("--eval-iters", "--eval_iters", "eval_iters", type=int)
@click.option("--checkpoint-interval", "checkpoint_interval", type=int, help="steps between full checkpoints "
              "(default: every evaluation)")
@click.option("--checkpoint-schedule", "checkpoint_schedule", type=click.Choice(["interval", "log"]),
              help="log: also keep weights at steps 1, 2, 4, ... then every --snapshot-interval steps [interval]")
@click.option("--snapshot-interval", "snapshot_interval", type=int, help="log schedule: steps between snapshots "
              "after the powers of two (default: the checkpoint interval)")
@click.option("--checkpoint-minutes", "checkpoint_minutes", type=float, help="also save a full checkpoint when "
              "this many minutes passed since the last [10]")
@click.option("--grad-clip", "--grad_clip", "grad_clip", type=float)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile (default: when it pays)")
@click.option("--device", help="auto, cpu, cuda, cuda:N")
@click.option("--seed", type=int)
@click.option("--out", type=click.Path(file_okay=False), help="run folder (default runs/<time>-<type>)")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), help="continue the run in this folder")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML, TOML or JSON config file")
@set_option
@click.option("--quiet", "-q", is_flag=True, help="print only the summary")
@click.option("--nproc", type=int, default=None, help="launch N processes with torchrun (DDP)")
def train_command(config_file, assignments, quiet, nproc, resume, out, compile_, callbacks, **flags) -> None:
    """Train a model. With no flags: a small attention-only quadratic model on the offline synthetic
    corpus (on 2 CPU cores: about two minutes with AVX-512 BF16, four to six with AVX2 only).

    Precedence: model-type preset < --config file < flags < --set. Examples:

      qtoy train --attn quadratic --mlp bilinear

      qtoy train --model-type transformer_2L --optimizer muon --max-iters 2000 --out runs/t2

      qtoy train --resume runs/t2 --max-iters 4000
    """
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_torchrun(nproc)
        return
    from qtoy_core.training.config import assemble_run_config, read_config_file
    from qtoy_core.training.trainer import Trainer

    flags["compile"] = compile_
    if callbacks:
        flags_callbacks = list(callbacks)
    else:
        flags_callbacks = None
    if resume:
        changed = [k for k in FIXED_ON_RESUME if flags.get(k) not in (None, ())] + (["--config"] if config_file else [])
        if changed or flags_callbacks:
            raise click.UsageError(f"--resume continues a run with its own configuration; these flags would change it: "
                                   f"{', '.join(changed or ['--callback'])}. Drop them, or start a new run with --out.")
        from qtoy_core.training.run_folder import RunFolder

        file_data = RunFolder(resume).read_config()
        out = resume
    else:
        file_data = read_config_file(config_file) if config_file else {}
    flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items() if v not in (None, ())}
    config = assemble_run_config(file_data, flags, assignments)
    if flags_callbacks:  # a copy, not a re-validation: that would mark vocab_size as chosen (4096)
        from qtoy_core.components import parse_component

        config = config.model_copy(update={"callbacks": [parse_component("callback", c) for c in flags_callbacks]})
    out = Path(out) if out else default_run_folder(flags)
    rank = int(os.environ.get("RANK", "0"))
    display = []
    if not quiet and rank == 0:
        from .progress import PlainLog, RichProgress

        display = [RichProgress() if sys.stderr.isatty() else PlainLog()]
    trainer = Trainer(config, out, resume=bool(resume), callbacks=display)
    summary = trainer.fit()
    if rank == 0:
        from .progress import print_summary

        print_summary(summary)


def _launch_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with N processes (the args minus --nproc)."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qtoy_cli.main", *args]
    click.echo("launching: " + " ".join(cmd), err=True)
    raise SystemExit(subprocess.call(cmd))
