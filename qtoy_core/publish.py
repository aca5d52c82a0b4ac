"""`qtoy push`: a run folder (or save_pretrained folder) to a Hugging Face hub model repo.

What is uploaded is prepared first in a folder of its own (`prepare_upload`): config.json,
model.safetensors (the latest weights), tokenizer.json, the README.md model card and curves.png.
Only then is the hub contacted (`push`), through huggingface_hub's `create_repo` and
`upload_folder`, so everything but the transfer can be checked without a network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from qtoy_registry import QtoyError

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_document
from .model_card import CARD_NAME, CURVES_NAME, model_card

TOKENIZER_NAME = "tokenizer.json"


class PushError(QtoyError):
    pass


def prepare_upload(source: str | os.PathLike, folder: str | os.PathLike, *, repo_id: str | None = None) -> Path:
    """Fill `folder` with what `push` uploads from the model or run folder `source`."""
    from .training.run_folder import read_metrics

    source, folder = Path(source), Path(folder)
    document = read_document(source)  # a clear CheckpointError for a folder that is not a model
    if not (source / WEIGHTS_NAME).exists():
        raise PushError(f"{source} has no {WEIGHTS_NAME}: the run has not saved a checkpoint yet. Train it for at "
                        f"least one checkpoint (or resume it) before pushing.")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / CONFIG_NAME, folder / CONFIG_NAME)
    shutil.copyfile(source / WEIGHTS_NAME, folder / WEIGHTS_NAME)  # follows the run's hard link: the latest weights
    if (source / TOKENIZER_NAME).exists():
        shutil.copyfile(source / TOKENIZER_NAME, folder / TOKENIZER_NAME)
    metrics = read_metrics(source)
    curves = None
    if any("loss" in m for m in metrics):
        from .training.plots import plot_run

        plot_run(source, folder / CURVES_NAME)
        curves = CURVES_NAME
    card = model_card(document, metrics=metrics, curves=curves, repo_id=repo_id)
    (folder / CARD_NAME).write_text(str(card), encoding="utf-8")
    return folder


def push(source: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
         commit_message: str | None = None) -> str:
    """Upload `source` (prepared as by `prepare_upload`) to the hub model repo `repo_id`; returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    try:
        with tempfile.TemporaryDirectory(prefix="qtoy-push-") as tmp:
            prepare_upload(source, tmp, repo_id=repo_id)
            api = HfApi(token=token)
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                              commit_message=commit_message or f"qtoy push of {Path(source).name}")
            return str(url)
    except OfflineModeIsEnabled:
        raise PushError(f"Cannot push {source} to {repo_id}: the Hugging Face hub is switched off (HF_HUB_OFFLINE=1, "
                        f"qtoy's default). Run with HF_HUB_OFFLINE=0 on a machine that reaches the hub, or use "
                        f"--dry-run DIR to write the folder that would be uploaded.") from None
    except LocalTokenNotFoundError:
        raise PushError(f"Cannot push to {repo_id}: no Hugging Face token. Log in with `hf auth login`, or set "
                        f"HF_TOKEN to a token with write access.") from None
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        raise PushError(f"The Hugging Face hub refused the push to {repo_id} (HTTP {status}: "
                        f"{str(exc).splitlines()[0][:200]}). Check the repo id and that your token may write "
                        f"to it.") from None
    except (OSError, ConnectionError) as exc:
        if isinstance(exc, QtoyError):
            raise
        raise PushError(f"Cannot reach the Hugging Face hub to push {repo_id} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else 'no answer'}). Check the network (and "
                        f"HF_ENDPOINT), or use --dry-run DIR to write the folder that would be uploaded.") from None
    except Exception as exc:  # the HTTP client's transport errors (httpx, or the hub's httpx2) are not OSErrors
        if not type(exc).__module__.split(".")[0].startswith(("httpx", "httpcore")):
            raise
        raise PushError(f"Cannot reach the Hugging Face hub to push {repo_id} ({type(exc).__name__}: "
                        f"{str(exc)[:200]}). Check the network (and HF_ENDPOINT), or use --dry-run DIR to write "
                        f"the folder that would be uploaded.") from None


def describe_upload(folder: str | os.PathLike) -> list[dict]:
    """[{"file", "bytes"}] of a prepared folder (what `qtoy push --dry-run` prints)."""
    folder = Path(folder)
    return [{"file": p.name, "bytes": p.stat().st_size} for p in sorted(folder.iterdir()) if p.is_file()]


__all__ = ["PushError", "prepare_upload", "push", "describe_upload"]
