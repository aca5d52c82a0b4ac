"""qtoy's cache folder (trained tokenizers, downloaded id maps) and file hashing. Files in it are
written with `qtoy_core.run_files.write_atomic`."""

from __future__ import annotations

import hashlib
import os
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
