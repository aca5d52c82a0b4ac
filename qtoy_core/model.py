"""`ToyTransformer`: embedding, N blocks of (norm, attention, residual; norm, MLP, residual), final
norm, unembedding (tied to the embedding by default). Components come from the registry.

Submodule names are stable (see `qtoy_core.interfaces`); checkpoints and hooks rely on them.
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .interfaces import HookPoint
from .registry_access import build_component

INIT_STD = 0.02


@dataclass
class GenerationCache:
    """State carried between calls during token-by-token generation.

    `offset` is the number of tokens already processed; each attention layer keeps what it needs
    in its own dict in `layers`. `mode` "recurrent" lets polynomial attentions keep a constant-size
    running state; "kv" makes every attention keep keys and values.
    """

    n_layers: int
    mode: str = "recurrent"
    offset: int = 0
    layers: list[dict] = field(default_factory=list)
    # document masking: the last token, its document and where that document started (batch,), so
    # the next call continues the numbering and the positions (qtoy_core.documents)
    last_token: Tensor | None = field(default=None, init=False)
    doc_last: Tensor | None = field(default=None, init=False)
    doc_start: Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("recurrent", "kv"):
            raise ValueError(f"cache mode must be 'recurrent' or 'kv', not {self.mode!r}")
        if not self.layers:
            self.layers = [{"mode": self.mode} for _ in range(self.n_layers)]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        # Modules are registered in the order the forward runs them, so that hook_names (module
        # order) lists the hook points as a forward records them (HookPoints hold no parameters).
        self.hook_resid_pre = HookPoint()
        self.ln1 = build_component(config.norm, config)
        self.attn = build_component(config.attention, config, layer)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.has_mlp = config.has_mlp
        if self.has_mlp:
            self.ln2 = build_component(config.norm, config)
            self.mlp = build_component(config.mlp, config)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, *, positional: nn.Module, positions: Tensor,
                attention_mask: Tensor | None = None, state: dict | None = None,
                doc_ids: Tensor | None = None) -> Tensor:
        x = self.hook_resid_pre(x)
        docs = {} if doc_ids is None else {"doc_ids": doc_ids}  # only to attentions that declare support
        attn_out = self.attn(self.ln1(x), positional=positional, positions=positions,
                             attention_mask=attention_mask, state=state, **docs)
        x = self.hook_resid_mid(x + self.dropout(self.hook_attn_out(attn_out)))
        if self.has_mlp:
            x = x + self.dropout(self.hook_mlp_out(self.mlp(self.ln2(x))))
        return self.hook_resid_post(x)


def _model_hub_mixin() -> type:
    from huggingface_hub import ModelHubMixin

    return ModelHubMixin


class ToyTransformer(nn.Module, _model_hub_mixin()):
    """A toy transformer assembled from registered components.

    `ToyTransformer(config)` then `load_state_dict(...)` restores a model; `from_pretrained(path or
    hub id)` and `save_pretrained(dir)` read and write config.json + model.safetensors.
    """

    def __init__(self, config: ModelConfig | dict):
        super().__init__()
        config = ModelConfig.model_validate(config) if not isinstance(config, ModelConfig) else config
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positional = build_component(config.positional, config)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.ln_final = build_component(config.norm, config)
        self.unembed = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self._init_weights()
        if config.tie_embeddings:
            self.unembed.weight = self.embed.weight
        for name, module in self.named_modules():  # TL's hook.name
            if isinstance(module, HookPoint):
                module.name = name
        if config.doc_mask:
            from .documents import check_doc_mask_support

            check_doc_mask_support(self)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        # Residual writers start at zero: every block begins as the identity.
        for block in self.blocks:
            writers = [block.attn.out_proj] + ([block.mlp.out_proj] if block.has_mlp else [])
            for proj in writers:
                if proj is None:
                    continue
                nn.init.zeros_(proj.weight)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None, *,
                cache: GenerationCache | None = None, doc_ids: Tensor | None = None) -> Tensor:
        """tokens: (batch, time) int64 -> logits (batch, time, vocab).

        attention_mask: (batch, time) 1 for real tokens, 0 for padding (with a cache: covering the
        cached tokens too). With `cache`, tokens continue the cached sequence.

        doc_ids: (batch, time) int, each token's document (nondecreasing along a row; with a cache,
        numbered on from the earlier calls): attention never crosses a document boundary and
        positions restart at every document, so each document comes out exactly as if run alone.
        A model with ``config.doc_mask`` derives them itself from the separator token its config
        records (`qtoy_core.documents`); given ones take precedence.
        """
        from .documents import document_positions, documents_for

        offset = cache.offset if cache is not None else 0
        docs = documents_for(self, tokens, cache, doc_ids)
        if docs is None:
            positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        else:  # each token's position in its own document, (batch, time)
            positions = document_positions(docs, offset, cache)
        limit = getattr(self.positional, "max_positions", None)
        if limit is not None and offset + tokens.shape[1] > limit:
            last = offset + tokens.shape[1] if docs is None else int(positions.max()) + 1 if positions.numel() else 0
            if last > limit:
                raise ValueError(
                    f"positions up to {last} requested but the {self.config.positional.name} "
                    f"positional encoding only covers n_ctx={limit}: shorten the input (or the generation), "
                    f"or train with a larger n_ctx or with rope"
                )
        x = self.hook_embed(self.embed(tokens))
        pos = self.positional.embed(positions)
        if pos is not None:
            x = x + self.hook_pos_embed(pos)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, positional=self.positional, positions=positions, attention_mask=attention_mask,
                      state=cache.layers[i] if cache is not None else None, doc_ids=docs)
        if cache is not None:
            cache.offset += tokens.shape[1]
            if tokens.shape[1]:
                cache.last_token = tokens[:, -1]
        return self.unembed(self.ln_final(x))

    def run_with_cache(self, tokens: Tensor, names_filter: Any = None, **kwargs: Any):
        """(logits, cache): the activations at every HookPoint (or those ``names_filter`` keeps: a
        name, names, or a predicate) as an `ActivationCache` (a mapping, in execution order, with
        TransformerLens's shorthands and residual helpers), detached, hooks removed afterwards even on
        error. Names and layouts are TL's: hook_embed, hook_pos_embed, blocks.{i}.hook_resid_pre /
        hook_attn_out / hook_resid_mid / hook_mlp_out / hook_resid_post, blocks.{i}.attn.hook_q /
        hook_k (before RoPE) / hook_rot_q / hook_rot_k (after) / hook_v / hook_z (batch, pos, head,
        d_head), hook_scores / hook_pattern (batch, head, query_pos, key_pos), hook_result (batch,
        pos, head, d_model), blocks.{i}.mlp.hook_hidden (and hook_left / hook_right / hook_pre).
        Shapes and options: `qtoy_core.analysis.cache.run_with_cache`."""
        from .analysis.cache import run_with_cache

        return run_with_cache(self, tokens, names_filter, **kwargs)

    def run_with_hooks(self, tokens: Tensor, fwd_hooks: Any = (), reset_hooks_end: bool = True,
                       **kwargs: Any) -> Tensor:
        """Logits of a forward with ``fwd_hooks`` = [(hook name or predicate on names, fn), ...]
        attached, as TransformerLens: ``fn(activation, hook)`` may return a replacement of the same
        shape. Hooks are removed afterwards, also when the forward raises. See
        `qtoy_core.analysis.hooks`."""
        from .analysis.hooks import run_with_hooks

        return run_with_hooks(self, tokens, fwd_hooks, reset_hooks_end, **kwargs)

    def hooks(self, fwd_hooks: Any = (), reset_hooks_end: bool = True):
        """``with model.hooks(fwd_hooks=[...]):`` hooks attached for the block, removed at its end."""
        from .analysis.hooks import hooks

        return hooks(self, fwd_hooks, reset_hooks_end)

    def add_hook(self, name: Any, hook: Any) -> None:
        """Attach a forward hook until `reset_hooks` (TL's ``add_hook``; forward hooks only)."""
        from .analysis.hooks import add_hook

        add_hook(self, name, hook)

    def reset_hooks(self) -> None:
        """Remove the hooks `add_hook` (or ``reset_hooks_end=False``) left on the model."""
        from .analysis.hooks import reset_hooks

        reset_hooks(self)

    def new_cache(self, mode: str = "recurrent") -> GenerationCache:
        return GenerationCache(len(self.blocks), mode=mode)

    def loss(self, tokens: Tensor, attention_mask: Tensor | None = None, *, doc_ids: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy of a (batch, time) sequence, over real tokens only
        (``doc_ids``: each token's document, see `forward`)."""
        logits = self(tokens[:, :-1], None if attention_mask is None else attention_mask[:, :-1],
                      doc_ids=None if doc_ids is None else doc_ids[:, :-1])
        mask = None if attention_mask is None else attention_mask[:, 1:]
        return cross_entropy(logits, tokens[:, 1:], mask)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- Hugging Face hub format (config.json + model.safetensors + README.md) ---------------------
    def save_pretrained(self, save_directory, *, tokenizer: Any = None, **kwargs: Any):
        """Write config.json, model.safetensors and a README.md model card (hub format) to
        `save_directory`; with `tokenizer` (a qtoy Tokenizer), also tokenizer.json beside the weights."""
        result = super().save_pretrained(save_directory, **kwargs)
        if tokenizer is not None:
            from .run_files import write_atomic

            write_atomic(os.path.join(save_directory, "tokenizer.json"), tokenizer.to_str())
        return result

    def _save_pretrained(self, save_directory) -> None:
        from .checkpoint import save_model_files

        save_model_files(self, save_directory)

    def generate_model_card(self, *args: Any, **kwargs: Any):
        """The README.md that `save_pretrained` writes (see `qtoy_core.model_card`)."""
        from .checkpoint import model_document
        from .model_card import model_card

        return model_card(model_document(self.config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, step: int | None = None,
                        **kwargs: Any) -> "ToyTransformer":
        """A model from a run folder, a save_pretrained folder, or a Hugging Face hub repo id.
        ``step``: the weights a run saved at that step (a log-schedule snapshot or a checkpoint;
        `qtoy checkpoints RUN` lists them) instead of the latest."""
        from .checkpoint import CheckpointError, read_document

        if step is not None:
            from .checkpoint import load_weights, model_config_from_document
            from .training.run_folder import checkpoint_weights

            path = checkpoint_weights(pretrained_model_name_or_path, int(step))
            model = cls(model_config_from_document(read_document(pretrained_model_name_or_path),
                                                   str(pretrained_model_name_or_path)))
            load_weights(model, path, map_location=kwargs.get("map_location", "cpu"))
            return model
        if os.path.isdir(pretrained_model_name_or_path):
            read_document(pretrained_model_name_or_path)  # a broken config.json is a clear CheckpointError
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except CheckpointError:
            raise
        except Exception as exc:
            from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

            if not isinstance(exc, (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OSError)):
                raise
            raise CheckpointError(
                f"{str(pretrained_model_name_or_path)!r} is not a local model or run folder, and the Hugging Face "
                f"hub could not provide it ({type(exc).__name__}). Check the path; for a hub model, allow network "
                f"access (HF_HUB_OFFLINE=0) or download the model folder and pass its path."
            ) from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, config: Any = None, map_location: str = "cpu",
                         strict: bool = True, **_: Any) -> "ToyTransformer":
        from .checkpoint import load_model_files

        return load_model_files(cls, model_id, document=config, map_location=map_location, strict=strict,
                                revision=revision, cache_dir=cache_dir, force_download=force_download,
                                local_files_only=local_files_only, token=token)


def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over positions where mask is 1 (all positions when mask is None).

    Computed in float32 whatever the logits' dtype, so bf16 autocast does not distort the loss.
    """
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    if mask is None:
        return per_token.mean()
    mask = mask.flatten().to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
