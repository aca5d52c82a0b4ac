"""Model cards in the Hugging Face hub's format (README.md: a YAML header, then Markdown), built with
huggingface_hub's own `ModelCard` / `ModelCardData`, for `save_pretrained` folders and run folders.

The header says `library_name: qtoy`, tags (the components), the hub dataset when there is one, the
metric and, for a run, its final validation loss as a model-index entry; the body gives the
architecture, each component and the package that provides it, the training data and tokens, the
final losses, the loss curve and how to load the model with qtoy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
CURVES_NAME = "curves.png"


def _final(metrics: list[dict], key: str) -> dict | None:
    found = [m for m in metrics if m.get(key) is not None]
    return found[-1] if found else None


def model_card(document: dict[str, Any], *, metrics: list[dict] | None = None, curves: str | None = None,
               repo_id: str | None = None):
    """A `huggingface_hub.ModelCard` for a model's config.json `document` (a run's carries data and
    train sections too), with the run's `metrics` records and the file name of its loss `curves`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    model = document["model"]
    plugins = document.get("plugins", {})
    data = (document.get("data") or {}).get("dataset") or {}
    metrics = metrics or []
    step, val = _final(metrics, "loss"), _final(metrics, "val_loss")
    hub_dataset = data.get("hub_id") if isinstance(data, dict) and not data.get("data_files") else None
    dataset_name = data.get("name") if isinstance(data, dict) else None
    name = repo_id or f"qtoy {model.get('model_type', 'model')}"
    components = {kind: (spec.get("name") if isinstance(spec, dict) else spec)
                  for kind, spec in model.items() if kind in ("attention", "mlp", "positional", "norm")}
    tags = ["qtoy", "toy-transformer", "interpretability", str(model.get("model_type"))]
    tags += [f"{kind}-{value}" for kind, value in components.items() if value]
    eval_results = None
    if val is not None:
        eval_results = [EvalResult(task_type="text-generation", dataset_type=hub_dataset or dataset_name or "unknown",
                                   dataset_name=hub_dataset or dataset_name or "unknown", dataset_split="validation",
                                   metric_type="loss", metric_name="validation loss (nats/token)",
                                   metric_value=round(float(val["val_loss"]), 4))]
    card_data = ModelCardData(library_name="qtoy", tags=tags, datasets=[hub_dataset] if hub_dataset else None,
                              metrics=["loss"] if val is not None else None, pipeline_tag="text-generation",
                              model_name=name, eval_results=eval_results)
    lines = [f"# {name}", "",
             f"A polynomial toy transformer (`{model.get('model_type')}`) made with qtoy "
             f"{document.get('qtoy_version', '?')}.", "", "## Architecture", "", "| option | value |", "|---|---|"]
    for key in ("model_type", "d_model", "n_head", "d_head", "n_ctx", "d_mlp", "vocab_size", "tie_embeddings"):
        if model.get(key) is not None:
            lines.append(f"| {key} | {model[key]} |")
    lines += ["", "| component | name | provided by |", "|---|---|---|"]
    for kind, value in components.items():
        provider = plugins.get(kind, {})
        lines.append(f"| {kind} | {value} | {provider.get('distribution', '?')} {provider.get('version', '')} |")
    if document.get("data") or document.get("train"):
        train = document.get("train") or {}
        lines += ["", "## Training", ""]
        if dataset_name:
            lines.append(f"- data: `{dataset_name}`" + (f" ([{hub_dataset}](https://huggingface.co/datasets/"
                                                        f"{hub_dataset}))" if hub_dataset else ""))
        if step is not None:
            lines.append(f"- steps: {step['step']:,}, tokens: {step.get('tokens', 0):,}")
            lines.append(f"- final training loss: {step['loss']:.4f} nats/token")
        if val is not None:
            lines.append(f"- final validation loss: {val['val_loss']:.4f} nats/token (step {val['step']:,})")
        optimizer = (document.get("optimizer") or {}).get("name")
        if optimizer:
            lines.append(f"- optimizer: {optimizer}, batch size {train.get('batch_size')}, "
                         f"precision {train.get('precision')}")
        if curves:
            lines += ["", f"![loss curves]({curves})"]
    source = repo_id or "PATH_OR_REPO_ID"
    lines += ["", "## Use it with qtoy", "", "With qtoy installed:", "", "```python",
              "from qtoy_core import ToyTransformer, Tokenizer", "",
              f'model = ToyTransformer.from_pretrained("{source}")']
    if repo_id:
        lines += ["from huggingface_hub import hf_hub_download", "",
                  f'tokenizer = Tokenizer.from_file(hf_hub_download("{repo_id}", "tokenizer.json"))']
    else:
        lines += [f'tokenizer = Tokenizer.from_file("{source}/tokenizer.json")']
    lines += ["```", "", "Components from plugin packages other than `qtoy` must be installed too (table above)."]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_run_card(run: str | Path, *, repo_id: str | None = None) -> Path:
    """Write RUN/README.md from the run's config.json and metrics.jsonl (atomically)."""
    from .checkpoint import CONFIG_NAME
    from .run_files import write_atomic
    from .training.run_folder import read_metrics

    run = Path(run)
    document = json.loads((run / CONFIG_NAME).read_text(encoding="utf-8"))
    card = model_card(document, metrics=read_metrics(run), repo_id=repo_id,
                      curves=CURVES_NAME if (run / CURVES_NAME).exists() else None)
    write_atomic(run / CARD_NAME, str(card))
    return run / CARD_NAME
