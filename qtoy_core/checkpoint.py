"""Model files on disk: config.json (a JSON document with the model config and the provider of each
component) and model.safetensors (weights, no pickle). Every write is atomic (`qtoy_core.run_files`:
a temporary file in the same folder, fsynced, renamed over the target, the folder fsynced), so an
interrupted save never leaves a half-written file in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtoy_registry import QtoyError, UnknownComponentError, get_registry

from .config import ModelConfig
from .run_files import atomic_path, write_atomic

if TYPE_CHECKING:
    from .model import ToyTransformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_FORMAT = "qtoy-model/1"


class CheckpointError(QtoyError):
    """A model folder that cannot be loaded; the message says why and what to do."""


class MissingPluginError(CheckpointError):
    pass


def qtoy_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qtoy")
    except PackageNotFoundError:
        return "0+unknown"


def component_providers(config: ModelConfig) -> dict[str, dict[str, str]]:
    """For each component of the model: its name and the package (and version) that provides it."""
    registry = get_registry()
    out = {}
    for kind, component in config.components().items():
        provider = registry.get(kind, component.name).provider
        out[kind] = {"name": component.name, "distribution": provider.distribution, "version": provider.version}
    return out


def model_document(config: ModelConfig, **sections: Any) -> dict[str, Any]:
    """The config.json document: format marker, qtoy version, model config, component providers,
    plus any extra sections (a run adds "data" and "train")."""
    doc = {"format": MODEL_FORMAT, "qtoy_version": qtoy_version(), "model": config.model_dump(mode="json"),
           "plugins": component_providers(config)}
    doc.update(sections)
    return doc


def save_model_files(model: "ToyTransformer", directory: str | os.PathLike, **sections: Any) -> None:
    from safetensors.torch import save_model

    directory = Path(directory)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"})
    doc = model_document(model.config, **sections)
    write_atomic(directory / CONFIG_NAME, json.dumps(doc, indent=2, sort_keys=False) + "\n")


def read_document(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"No {CONFIG_NAME} in {path.parent}: that folder is not a qtoy model or run "
                              f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is corrupt. Restore it from a "
                              f"copy, or re-save the model with save_pretrained.") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} holds a JSON {type(doc).__name__}, not a qtoy config document.")
    return doc


def check_document(doc: dict[str, Any], source: str) -> None:
    """Refuse a document of another format version, or one needing a component no installed plugin
    provides (naming the package recorded for it)."""
    fmt = doc.get("format")
    if fmt is not None and fmt != MODEL_FORMAT:
        raise CheckpointError(f"{source} has format {fmt!r}; this qtoy ({qtoy_version()}) reads {MODEL_FORMAT!r}. "
                              f"Upgrade qtoy (`pip install -U qtoy`) to load it.")
    model = doc.get("model", doc)
    providers = doc.get("plugins", {}) or {}
    providers = providers if isinstance(providers, dict) else {}
    needed: list[tuple[str, str, Any]] = []  # (kind, key in "plugins", component spec)
    if isinstance(model, dict):
        needed += [(kind, kind, model.get(kind)) for kind in ("attention", "mlp", "positional", "norm")]
    data = doc.get("data")
    if isinstance(data, dict):
        needed.append(("dataset", "dataset", data.get("dataset")))
    if "optimizer" in doc:
        needed.append(("optimizer", "optimizer", doc.get("optimizer")))
    callbacks = doc.get("callbacks")
    for spec in callbacks if isinstance(callbacks, list) else []:
        name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, dict) else None
        needed.append(("callback", f"callback:{name}", spec))
    registry = get_registry()
    for kind, key, spec in needed:
        name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            continue  # validation reports it
        try:
            registry.get(kind, name)
        except UnknownComponentError:
            who = providers.get(key, {})
            package = who.get("distribution") if isinstance(who, dict) else None
            hint = (f"It is provided by the package {package!r} (version {who.get('version', '?')}): "
                    f"install it with `pip install {package}`." if package else
                    "Install the plugin package that provides it (see `qtoy plugins`).")
            raise MissingPluginError(f"{source} needs the {kind} {name!r}, which no installed plugin provides. {hint}") from None


def model_config_from_document(doc: dict[str, Any], source: str) -> ModelConfig:
    """Validate the model section, first turning a missing plugin into a message naming its package."""
    check_document({k: v for k, v in doc.items() if k in ("format", "model", "plugins")}
                   if isinstance(doc.get("model"), dict) else doc, source)
    from pydantic import ValidationError

    from .errors import format_validation_error

    try:
        return ModelConfig.model_validate(doc)
    except ValidationError as exc:
        hint = "" if "format" in doc else (f"\n{source} has no 'format' marker: qtoy reads folders written by "
                                           f"`qtoy train` or `save_pretrained`.")
        raise CheckpointError(f"The model config in {source} is not valid for this qtoy ({qtoy_version()}). "
                              f"{format_validation_error(exc, 'model config')}{hint}") from None


def resolve_weights_file(model_id: str, **hub_kwargs: Any) -> Path:
    local = Path(model_id)
    if local.is_dir():
        path = local / WEIGHTS_NAME
        if not path.exists():
            raise CheckpointError(f"No {WEIGHTS_NAME} in {local}: the weights are missing. Re-save the model, "
                                  f"or point at a run folder that finished at least one checkpoint.")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, **hub_kwargs))
    except Exception as exc:
        raise CheckpointError(f"Could not get {WEIGHTS_NAME} for {model_id!r}: it is not a local folder and the "
                              f"Hugging Face hub did not provide it ({type(exc).__name__}: {exc}). Check the path "
                              f"or repo id, or download the model folder and pass its path.") from None


def load_model_files(cls: type, model_id: str, *, document: dict | None = None, map_location: str = "cpu",
                     strict: bool = True, **hub_kwargs: Any) -> "ToyTransformer":
    if document is None:
        if Path(model_id).is_dir():
            document = read_document(model_id)
        else:
            raise CheckpointError(f"{model_id!r} is not a local folder with {CONFIG_NAME}, and no config could be "
                                  f"fetched from the Hugging Face hub. Check the path or repo id.")
    config = model_config_from_document(document, model_id)
    weights = resolve_weights_file(model_id, **{k: v for k, v in hub_kwargs.items() if v is not None and v is not False})
    model = cls(config)
    load_weights(model, weights, strict=strict, map_location=map_location)
    return model


def load_weights(model: "ToyTransformer", path: Path, *, strict: bool = True, map_location: str = "cpu") -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read as safetensors ({exc}); the file is truncated or corrupt. "
                              f"Use another checkpoint of the run (e.g. best/ or latest/) or retrain.") from None
    expected = model.state_dict()
    # Tied weights are stored once; fill in the alias so strict loading sees every key.
    if model.config.tie_embeddings and "unembed.weight" not in state and "embed.weight" in state:
        state["unembed.weight"] = state["embed.weight"]
    if model.config.tie_embeddings and "embed.weight" not in state and "unembed.weight" in state:
        state["embed.weight"] = state["unembed.weight"]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{path} has tensors of the wrong shape for its config ({'; '.join(wrong[:4])}). "
                              f"The weights and config.json do not belong together.")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                              f"The weights and config.json do not belong together.")
    model.load_state_dict(state, strict=strict)
