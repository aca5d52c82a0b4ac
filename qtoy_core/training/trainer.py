"""The training loop: mixed precision, accumulation, clipping, cosine schedule, evaluation,
atomic checkpoints, exact resume, non-finite step skipping, clean stops on SIGINT/SIGTERM, DDP."""

from __future__ import annotations

import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from qtoy_registry import QtoyError

from ..evaluation import evaluate, tokens_and_mask
from ..model import ToyTransformer, cross_entropy
from ..optim import build_optimizer, load_optimizer_state
from ..registry_access import build_component
from ..run_files import TOKENIZER_NAME
from .config import RunConfig
from .precision import resolve_device, resolve_precision
from .run_folder import MIN_FREE_BYTES, RunFolder, run_document
from .samples import SAMPLES_NAME, continue_prompts, default_prompts

# torch.compile costs ~15-20 s on 2 CPU cores and roughly halves the step time; it is switched on
# by default only when the eager run would take longer than this (see `should_compile`).
COMPILE_PAYS_AFTER_S = 90.0


class TrainingStopped(QtoyError):
    """Training ended early on purpose (a signal, or too many non-finite steps); work is saved."""


def cosine_schedule(step: int, *, warmup: int, total: int, min_lr_frac: float) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine decay to min_lr_frac at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def snapshot_due(step: int, *, every: int, last: bool = False) -> bool:
    """The log schedule: steps 1, 2, 4, 8, ... below ``every``, then every ``every`` steps, and the last."""
    return last or step % every == 0 or (0 < step < every and step & (step - 1) == 0)


#: The clock of wall-clock checkpoints (a module attribute, so tests can move time forward).
monotonic = time.monotonic


def should_compile(setting: bool | None, *, seconds_per_step: float, steps_left: int) -> bool:
    if setting is not None:
        return setting
    return seconds_per_step * steps_left > COMPILE_PAYS_AFTER_S


class Distributed:
    """rank/world size from torchrun's environment; gloo on CPU, nccl on GPU."""

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (the values themselves on one process)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


class Trainer:
    """Train `config` into the run folder `out`. `resume=True` continues the run saved there.

    `train_batches` / `val_batches` replace the configured dataset with given iterables of token
    tensors (batch, n_ctx + 1) or (tokens, attention_mask) pairs (tests, custom data); `tokenizer` is theirs
    (saved in the run folder, and used for the samples of `train.sample_prompts`). `callbacks` are extra
    callback objects (e.g. a progress display) besides the configured ones.
    """

    def __init__(self, config: RunConfig, out: str | os.PathLike, *, resume: bool = False,
                 callbacks: Iterable[Any] = (), train_batches: Iterable | None = None,
                 val_batches: Iterable | None = None, tokenizer: Any = None):
        self.config = config
        self.run = RunFolder(out)
        self.resume = resume
        self.device = resolve_device(config.train.device)
        if self.device.type == "cuda" and self.device.index is None and "LOCAL_RANK" in os.environ:
            # under torchrun each process drives its own GPU (rank on this node = GPU index)
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(config.train.precision, self.device)
        self.world = Distributed(self.device)
        self.callbacks = [build_component(c) for c in config.callbacks] + list(callbacks)
        self._given_train, self._given_val, self._given_tokenizer = train_batches, val_batches, tokenizer
        self.step = 0
        self.tokens = 0
        self.bad_steps = 0
        self.best_val: float | None = None
        self.last_eval: dict[str, float] = {}
        self._stop_signal: str | None = None
        self.compiled = False

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        if self.world.is_main:
            self.run.acquire_lock()  # before anything is written: one trainer per run folder
            self.run.prepare(fresh=not self.resume)
        if self.resume:  # before building anything: is there a checkpoint to resume from?
            self._find_checkpoint()
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.tokenizer = None
        self.sample_prompts: list[str] = []  # continued at every evaluation (needs a tokenizer)
        if self._given_train is None and cfg.data.prepared:
            self._setup_prepared()
            cfg = self.config
            self.sample_prompts = list(cfg.train.sample_prompts or [])
        elif self._given_train is None:
            from ..data import StreamingTextDataset, build_dataset, check_vocab

            self.dataset = build_dataset(cfg.data.dataset)
            self.tokenizer = self.dataset.tokenizer()
            if "vocab_size" not in cfg.model.model_fields_set:  # not chosen: the tokenizer decides
                model = cfg.model.model_dump()
                model["vocab_size"] = self.tokenizer.vocab_size
                cfg = self.config = cfg.model_copy(update={"model": type(cfg.model).model_validate(model)})
            check_vocab(cfg.model, self.tokenizer)
            common = dict(n_ctx=cfg.model.n_ctx, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                          rank=self.world.rank, world_size=self.world.world_size, dataset=self.dataset)
            self.sample_prompts = (cfg.train.sample_prompts if cfg.train.sample_prompts is not None
                                   else default_prompts(self.dataset))
            self.train_stream = StreamingTextDataset.from_config(cfg.data, split="train", **common)
            self.val_stream = StreamingTextDataset.from_config(cfg.data, split="validation", **common)
            self._check_validation_split()
        else:
            self.train_stream, self.val_stream = self._given_train, self._given_val
            self.tokenizer = self._given_tokenizer
            self.sample_prompts = list(cfg.train.sample_prompts or []) if self.tokenizer is not None else []
        if cfg.model.doc_mask:
            cfg = self.config = self._record_document_tokens(cfg)
        self.model = build_model_or_explain(cfg.model, self.device)
        if self.world.is_main:  # weights plus ~2 optimizer moments, for latest, best and the one being written
            weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self.run.check_free_space(max(MIN_FREE_BYTES, 3 * 3 * weight_bytes))
        opt_cfg = cfg.optimizer
        if cfg.train.learning_rate is not None:
            opt_cfg = opt_cfg.model_copy(update={"lr": cfg.train.learning_rate})
        self.optimizer = build_optimizer(self.model, opt_cfg)
        self.tokens_per_step = cfg.train.batch_size * cfg.model.n_ctx * cfg.train.grad_accum * self.world.world_size
        self.total_steps = cfg.train.total_steps(self.tokens_per_step)
        t = cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_schedule(s, warmup=t.warmup, total=self.total_steps, min_lr_frac=t.min_lr_frac))
        self.scaler = self.precision.grad_scaler()
        self.forward_model: torch.nn.Module = self.model
        if self.world.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(self.model)
        self.model_doc = run_document(cfg)
        if self.resume:
            self._load_checkpoint()
        if self.world.is_main:  # on resume too: options changed for the rest of the run (max_iters, lr) stick
            self.run.write_config(self.model_doc)
        if self.tokenizer is not None and self.world.is_main:
            self.tokenizer.save(self.run.path / TOKENIZER_NAME)  # atomic (run_files.write_atomic)
        self._train_iter = self._batches(self.train_stream)

    def _record_document_tokens(self, cfg: RunConfig) -> RunConfig:
        """With doc_mask: the model config records the tokenizer's separator (and bos), the tokens
        its forward finds the documents of packed rows by, so eval, generation and analysis of the
        run mask the same boundaries."""
        from ..documents import DocMaskError

        model = cfg.model
        if self.tokenizer is None:
            if model.doc_separator_id is None:
                raise DocMaskError("doc_mask needs the token that separates documents, and these batches come "
                                   "without a tokenizer: set model.doc_separator_id (and doc_bos_id), or pass "
                                   "the tokenizer to the Trainer.")
            return cfg
        found = {"doc_separator_id": self.tokenizer.separator_id, "doc_bos_id": self.tokenizer.bos_id}
        for name, value in found.items():
            given = getattr(model, name)
            if given is not None and given != value:
                raise DocMaskError(f"model.{name} is {given} but the tokenizer's is {value}: the documents would "
                                   f"be cut at the wrong tokens. Drop {name} (training records the tokenizer's).")
        updated = type(model).model_validate({**model.model_dump(), **found})
        return cfg.model_copy(update={"model": updated})

    def _setup_prepared(self) -> None:
        """Train and validation batches from a `qtoy data prepare` folder (memmap), its tokenizer checked."""
        from ..data import check_vocab
        from ..data.shards import PreparedShards, ShardBatches, check_shards_match

        cfg = self.config
        shards = PreparedShards(cfg.data.prepared)
        check_shards_match(shards, cfg.data)
        if "dataset" not in cfg.data.model_fields_set:  # the run's config.json names the data it trained on
            from ..components import parse_component

            try:
                data = cfg.data.model_copy(update={"dataset": parse_component("dataset", shards.dataset_config)})
                cfg = self.config = cfg.model_copy(update={"data": data})
            except Exception:  # the dataset's plugin is not installed here: the shards still train
                pass
        self.dataset = None
        self.tokenizer = shards.tokenizer()
        if "vocab_size" not in cfg.model.model_fields_set:  # not chosen: the tokenizer decides
            model = cfg.model.model_dump()
            model["vocab_size"] = self.tokenizer.vocab_size
            cfg = self.config = cfg.model_copy(update={"model": type(cfg.model).model_validate(model)})
        check_vocab(cfg.model, self.tokenizer)
        common = dict(n_ctx=cfg.model.n_ctx, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      rank=self.world.rank, world_size=self.world.world_size, pin_memory=self.device.type == "cuda")
        self.train_stream = ShardBatches(shards, split="train", order=cfg.data.shard_order, **common)
        self.val_stream = ShardBatches(shards, split="validation", **common)

    def _check_validation_split(self) -> None:
        """Fail before the first step, not at the first evaluation, when the validation split is empty."""
        batches = iter(self.val_stream)  # the validation stream restarts at every iter(): this costs one batch
        try:
            next(batches)
        except StopIteration:
            raise TrainingStopped("The validation split produced no batch: the dataset is too small for its "
                                  "validation fraction. Add data or raise val_fraction "
                                  "(--set data.dataset.val_fraction=0.1).") from None
        finally:
            batches.close()

    def _find_checkpoint(self) -> tuple[Path, int]:
        found = self.run.latest_checkpoint()
        if found is None:
            raise TrainingStopped(f"{self.run.path} has no complete checkpoint to resume from (the run stopped "
                                  f"before its first save). Start it again without --resume.")
        return found

    def _load_checkpoint(self) -> None:
        folder, step = self._find_checkpoint()
        from ..checkpoint import load_weights

        load_weights(self.model, folder / "model.safetensors")
        state = self.run.load_state(folder)
        configured = [g["initial_lr"] for g in self.optimizer.param_groups]
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # A learning rate given on resume (e.g. lower, after non-finite steps) replaces the saved one.
        for i, (group, lr) in enumerate(zip(self.optimizer.param_groups, configured)):
            if group.get("initial_lr") != lr:
                group["initial_lr"] = self.scheduler.base_lrs[i] = lr
                group["lr"] = lr * self.scheduler.lr_lambdas[i](self.scheduler.last_epoch)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.best_val, self.bad_steps = state.get("best_val"), state.get("bad_steps", 0)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_to_tuple(state["rng"]["python"]))
        if hasattr(self.train_stream, "load_state_dict") and state.get("data") is not None:
            self.train_stream.load_state_dict(state["data"])
        if self.world.is_main:
            self.run.truncate_metrics(self.step)
            self.run.drop_snapshots_after(self.step)
            for name in self.run.plugin_logs():  # samples.jsonl, dynamics.jsonl, ...: what came after goes
                self.run.truncate_log(name, self.step)
            self.run.republish()

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step, "tokens": self.tokens, "best_val": self.best_val, "bad_steps": self.bad_steps,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "data": self.train_stream.state_dict() if hasattr(self.train_stream, "state_dict") else None,
        }

    def _batches(self, stream: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for batch in stream:
            tokens, mask = tokens_and_mask(batch)
            yield tokens.to(self.device, non_blocking=True), None if mask is None else mask.to(self.device)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        try:
            return self._fit()
        finally:
            self.run.release_lock()

    def _fit(self) -> dict[str, Any]:
        self.setup()
        for cb in self.callbacks:
            cb.on_train_start(self)
        previous = self._install_signal_handlers()
        start = time.perf_counter()
        start_tokens = self.tokens
        try:
            self._loop()
        finally:
            self._restore_signal_handlers(previous)
        elapsed = time.perf_counter() - start
        summary = {
            "run": str(self.run.path), "steps": self.step, "tokens": self.tokens,
            "train_loss": self.last_train_loss, "val_loss": self.last_eval.get("val_loss"),
            "best_val_loss": self.best_val, "seconds": elapsed,
            "tokens_per_s": (self.tokens - start_tokens) / elapsed if elapsed > 0 else None,
            "precision": self.precision.name, "compiled": self.compiled, "skipped_steps": self.skipped_total,
        }
        if self.world.is_main:
            from ..model_card import write_run_card

            write_run_card(self.run.path)  # README.md: the run's model card (hub format)
        for cb in self.callbacks:
            cb.on_train_end(self, summary)
        if self.world.enabled:
            dist.barrier()
        return summary

    def _loop(self) -> None:
        cfg = self.config.train
        ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
        snapshot_every = cfg.snapshot_interval or ckpt_every
        self._last_save = monotonic()
        self.last_train_loss = None
        self.skipped_total = 0
        self._first_step, self._compile_decided = self.step, False
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < self.total_steps:
            self._maybe_compile()
            loss, grad_norm, finite = self._train_step()
            self.step += 1
            self.tokens += self.tokens_per_step
            window_tokens += self.tokens_per_step
            now = time.perf_counter()
            record = {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                      "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(now - window_start, 1e-9)}
            if not finite:
                record["skipped"] = True
            self.step_seconds = (now - window_start) / max(1, window_tokens // self.tokens_per_step)
            if self.step % cfg.log_interval == 0:
                window_start, window_tokens = now, 0
            if finite:
                self.last_train_loss = loss
            self.scheduler.step()
            if self.world.is_main:
                self.run.append_metrics([record])
            for cb in self.callbacks:
                cb.on_step_end(self, record)
            if self.bad_steps >= cfg.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_steps} steps in a row had a non-finite loss or gradient (last at step {self.step}); "
                    f"training stopped. The last good checkpoint is in {self.run.path}. Lower the learning rate "
                    f"(--learning-rate), use --precision fp32, or tighten --grad-clip, then resume with "
                    f"--resume {self.run.path}.")
            last = self.step == self.total_steps
            evaluated = False
            if self.step % cfg.eval_interval == 0 or last:
                self.evaluate()
                evaluated = True
            if cfg.checkpoint_schedule == "log" and self.world.is_main and snapshot_due(
                    self.step, every=snapshot_every, last=last):
                self.run.save_snapshot(self.model, self.step, self.tokens)
            overdue = cfg.checkpoint_minutes is not None and monotonic() - self._last_save >= 60 * cfg.checkpoint_minutes
            if self.step % ckpt_every == 0 or last or overdue:
                self.save_checkpoint(val_loss=self.last_eval.get("val_loss") if evaluated else None)
            if self._stop_signal is not None:
                self.save_checkpoint()
                raise TrainingStopped(
                    f"Stopped by {self._stop_signal} at step {self.step}/{self.total_steps}; a checkpoint was saved "
                    f"in {self.run.path}. Resume with: qtoy train --resume {self.run.path}")

    def _maybe_compile(self) -> None:
        """Decide once per fit: as configured, or (auto) after timing a few eager steps."""
        cfg = self.config.train
        if self._compile_decided or self.world.enabled:
            return
        if cfg.compile is None and self.step - self._first_step < 3:
            return  # measure a few eager steps first
        self._compile_decided = True
        seconds = getattr(self, "step_seconds", 0.0)
        if should_compile(cfg.compile, seconds_per_step=seconds, steps_left=self.total_steps - self.step):
            # the forward and the loss as one graph: the float32 cross-entropy fuses with the unembedding
            # instead of round-tripping (batch, time, vocab) logits through memory
            self._compiled_loss = torch.compile(_forward_loss)
            self.compiled = True

    def _train_step(self) -> tuple[float, float, bool]:
        cfg = self.config.train
        losses = []
        loss_fn = getattr(self, "_compiled_loss", None) or _forward_loss
        for micro in range(cfg.grad_accum):
            tokens, mask = next(self._train_iter)
            sync = nullcontext()
            if self.world.enabled and micro < cfg.grad_accum - 1:
                sync = self.forward_model.no_sync()
            with sync:
                loss = loss_fn(self.forward_model, tokens, mask, self.precision.dtype, self.device.type) / cfg.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses.append(loss.detach().double())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # one host sync per step (not one per micro-batch plus one for the norm)
        total, grad_norm = torch.stack([sum(losses), norm.detach().double()]).tolist()
        finite = math.isfinite(total) and math.isfinite(grad_norm)
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself on inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_total += 1
        return total, grad_norm, finite

    def evaluate(self) -> dict[str, float]:
        """Loss per real target token over the first eval_iters validation batches (the same batches
        every time), over every rank's batches together (`qtoy_core.evaluation.evaluate`)."""
        if self.val_stream is None:
            return {}
        result = evaluate(self.model, self.val_stream, self.config.train.eval_iters, device=self.device,
                          autocast=self.precision.autocast)
        if not result.batches:
            raise TrainingStopped("The validation split produced no batch: the dataset is too small for its "
                                  "validation fraction. Add data or raise val_fraction (--set data.dataset.val_fraction=0.1).")
        loss_sum, tokens = self.world.sum(result.loss_sum, result.tokens)
        val = loss_sum / tokens if tokens else math.nan
        self.last_eval = {"step": self.step, "tokens": self.tokens, "val_loss": val, "val_ppl": math.exp(min(val, 50))}
        if self.world.is_main:
            self.run.append_metrics([self.last_eval])
        for cb in self.callbacks:
            cb.on_eval_end(self, self.last_eval)
        self.sample()
        return self.last_eval

    def sample(self) -> list[dict]:
        """Continue the run's fixed prompts (greedy by default), write them to samples.jsonl and pass
        them to the callbacks (live display, trackers). Nothing without a tokenizer or prompts."""
        if not self.sample_prompts or self.tokenizer is None or not self.world.is_main:
            return []
        t = self.config.train
        with self.precision.autocast():
            texts = continue_prompts(self.model, self.tokenizer, self.sample_prompts, max_new_tokens=t.sample_tokens,
                                     temperature=t.sample_temperature, seed=t.seed + self.step, device=self.device)
        samples = [{"step": self.step, "tokens": self.tokens, **s} for s in texts]
        self.run.append_log(SAMPLES_NAME, samples)
        for cb in self.callbacks:
            cb.on_samples(self, samples)
        return samples

    def log_record(self, source: str, record: dict) -> None:
        """Append `record` to the run folder's log `source` (a .jsonl file name, e.g. "dynamics.jsonl";
        main process only) and pass it to every callback's `on_log`: a callback's own metrics reach
        the experiment trackers this way. The record needs a "step" (a resumed run truncates by it)."""
        if not self.world.is_main:
            return
        self.run.append_log(source, [record])
        for cb in self.callbacks:
            cb.on_log(self, record, source)

    def save_checkpoint(self, val_loss: float | None = None) -> None:
        if val_loss is not None and (self.best_val is None or val_loss < self.best_val):
            self.best_val = val_loss
        self._last_save = monotonic()
        if not self.world.is_main:
            return
        path = self.run.save_checkpoint(self.model, self.model_doc, self._state(), self.step, val_loss=val_loss)
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)

    # -- signals ---------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now
                signal.signal(signum, previous.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _forward_loss(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None,
                 autocast_dtype: torch.dtype | None, device_type: str) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, n_ctx + 1) batch: the forward under autocast (when
    `autocast_dtype` is set), the loss in float32. One function, so torch.compile fuses the two."""
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(tokens[:, :-1], None if mask is None else mask[:, :-1])
    return cross_entropy(logits, tokens[:, 1:], None if mask is None else mask[:, 1:])


def build_model_or_explain(config: Any, device: torch.device) -> ToyTransformer:
    """The model of `config` on `device`; running out of memory becomes a message naming the sizes."""
    try:
        return ToyTransformer(config).to(device)
    except (RuntimeError, MemoryError) as exc:
        text = str(exc)
        if not isinstance(exc, MemoryError) and "alloc" not in text and "out of memory" not in text:
            raise
        sizes = ", ".join(f"{k}={getattr(config, k)}" for k in ("vocab_size", "d_model", "n_ctx", "d_mlp")
                          if getattr(config, k, None) is not None)
        raise QtoyError(f"The model does not fit in memory on {device} ({config.model_type}, {sizes}): "
                        f"{text.strip().splitlines()[0] if text.strip() else 'out of memory'}. Choose smaller "
                        f"sizes (--d-model, --n-ctx, --set d_mlp=..., vocab_size) or fewer layers.") from None


def _to_tuple(x: Any) -> Any:
    """random.setstate needs tuples where torch.load may give lists."""
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x
