"""Talking to the Hugging Face hub, and failing fast and clearly when it cannot be reached.

Without network a hub call retries for 24 s to minutes; with HF_HUB_OFFLINE=1 it fails at once. So
before any hub call qtoy checks: HF_HUB_OFFLINE set -> no attempt (files already in the local
Hugging Face cache are still used for tokenizers); otherwise a 3-second TCP probe of the endpoint.
Every failure becomes a `HubUnreachableError` naming the dataset and the local alternatives.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any
from urllib.parse import urlparse

from .errors import DataError, HubUnreachableError

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set, read now (not at import time)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def probe_hub(timeout: float = PROBE_TIMEOUT_S, *, url: str | None = None) -> str | None:
    """None when a TCP connection to the hub endpoint (or `url`'s host) opens within `timeout`, else
    the reason. Skipped (None) behind an HTTP(S) proxy, where only the proxy knows the way."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    if url is None:
        host, port = _endpoint()
    else:
        parsed = urlparse(url)
        host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme != "http" else 80)
    result: list[str | None] = []

    def attempt() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{host}:{port}: {exc.strerror or exc}")

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host}:{port}: no answer within {timeout:.0f} s"


def unreachable_message(dataset: str, target: str, reason: str, hint: str) -> str:
    return (f"Dataset {dataset!r}: the Hugging Face hub could not be reached for {target} ({reason}). "
            f"{hint} To use the hub, run with network access and HF_HUB_OFFLINE=0 (the qtoy command sets "
            f"HF_HUB_OFFLINE=1 unless you set it).")


def require_hub(dataset: str, target: str, hint: str) -> None:
    """Raise HubUnreachableError at once when the hub is switched off or does not answer."""
    if hub_offline():
        raise HubUnreachableError(unreachable_message(dataset, target, "HF_HUB_OFFLINE=1 is set", hint))
    reason = probe_hub()
    if reason is not None:
        raise HubUnreachableError(unreachable_message(dataset, target, reason, hint))


def is_connection_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "Timeout", "ConnectTimeout", "ReadTimeout",
                         "ConnectError", "TimeoutException", "NetworkError", "LocalEntryNotFoundError",
                         "HfHubHTTPError", "RemoteDisconnected", "ProtocolError"})


def hub_file(repo_id: str, filename: str, *, dataset: str, hint: str, repo_type: str = "model",
             revision: str | None = None) -> str:
    """The local path of a hub file: from the Hugging Face cache, else downloaded (fast failure)."""
    from huggingface_hub import hf_hub_download

    target = f"{repo_id}/{filename}"
    offline = hub_offline()
    try:
        return hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision, local_files_only=True)
    except Exception as exc:
        if not is_connection_error(exc) and type(exc).__name__ not in ("EntryNotFoundError", "FileNotFoundError"):
            raise DataError(f"Dataset {dataset!r}: reading {target} from the Hugging Face cache failed: {exc}") from None
    if offline:
        raise HubUnreachableError(unreachable_message(
            dataset, target, "HF_HUB_OFFLINE=1 is set and the file is not in the local Hugging Face cache", hint))
    require_hub(dataset, target, hint)
    try:
        return hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision)
    except Exception as exc:
        if is_connection_error(exc):
            raise HubUnreachableError(unreachable_message(dataset, target, _short(exc), hint)) from None
        raise DataError(f"Dataset {dataset!r}: downloading {target} from the Hugging Face hub failed: "
                        f"{_short(exc)}. {hint}") from None


def url_file(url: str, cache_name: str, *, dataset: str, hint: str, sha256: str | None = None,
             timeout: float = 20.0) -> str:
    """A file fetched once from a plain URL into qtoy's cache (checked against `sha256`)."""
    import hashlib
    import urllib.request

    from ..run_files import write_atomic
    from .cache import cache_dir

    path = cache_dir("downloads") / cache_name
    if path.is_file():
        return str(path)
    if hub_offline():
        raise HubUnreachableError(unreachable_message(
            dataset, url, "HF_HUB_OFFLINE=1 is set and the file is not in qtoy's cache", hint))
    reason = probe_hub(url=url)
    if reason is not None:
        raise HubUnreachableError(f"Dataset {dataset!r}: {url} could not be downloaded ({reason}). {hint}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as exc:
        raise HubUnreachableError(f"Dataset {dataset!r}: {url} could not be downloaded ({_short(exc)}). {hint}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"Dataset {dataset!r}: {url} does not have the expected content (sha256 mismatch). {hint}")
    write_atomic(path, data)
    return str(path)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def load_hub_stream(hub_id: str, hub_config: str | None, *, dataset: str, hint: str,
                    split: str = "train", **kwargs: Any):
    """`datasets.load_dataset(hub_id, hub_config, split=split, streaming=True)` with fast, clear failure."""
    require_hub(dataset, f"the dataset {hub_id}", hint)
    import datasets

    try:
        return datasets.load_dataset(hub_id, hub_config, split=split, streaming=True, **kwargs)
    except Exception as exc:
        if is_connection_error(exc):
            raise HubUnreachableError(unreachable_message(dataset, f"the dataset {hub_id}", _short(exc), hint)) from None
        if type(exc).__name__ in ("DatasetNotFoundError", "FileNotFoundError", "RepositoryNotFoundError"):
            raise DataError(f"Dataset {dataset!r}: the hub has no dataset {hub_id!r}"
                            f"{f' with config {hub_config!r}' if hub_config else ''} ({_short(exc)}).") from None
        if isinstance(exc, ValueError) and "split" in str(exc).lower():
            raise DataError(f"Dataset {dataset!r}: {hub_id} has no {split!r} split ({_short(exc)}).") from None
        raise
