"""qtoy's cache folder (trained tokenizers, downloaded id maps) and small file helpers."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$QTOY_CACHE/<parts>` if QTOY_CACHE is set, else the platform's user cache folder for qtoy."""
    root = os.environ.get("QTOY_CACHE")
    if not root:
        from platformdirs import user_cache_dir

        root = user_cache_dir("qtoy")
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(target: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `target`, then rename it over `target`.

    Concurrent writers (several ranks training the same tokenizer) each rename a complete file, so a
    reader never sees half a file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def hash_files(paths: list[str], *, chunk: int = 1 << 20) -> str:
    """A blake2b hash of the files' contents, in the given order (names do not count)."""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        size = os.path.getsize(path)
        h.update(size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()
