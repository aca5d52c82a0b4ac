"""Keep freed host memory for reuse instead of handing it back to the OS (glibc malloc).

Why: an eager PyTorch step on the CPU allocates and frees the same large tensors every step (logits,
attention patterns, their gradients). glibc serves every block above its mmap threshold (128 KiB,
rising to at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, and trims the top of the heap
whenever more than twice that is free. So each step touches its big tensors on pages the kernel
has to fault in and zero again. Measured on the development machine (2-core AMD EPYC, torch 2.13):
the eager fp32 training step of transformer_2L at d_model 256 faulted in ~93,000 pages (~360 MiB)
per step, and plain attention at T 4096 up to ~55,000 per call; with the setting below, none, and
eager steps ran 15-45% faster (benchmarks/train_throughput.py prints the faults of every variant).
Compiled steps reuse their buffers and never paid this.

The cost: memory a process has freed stays in it (its resident size stays at its peak) until it
exits. That suits a training or analysis process, so the ``qtoy`` command turns it on at start
(``QTOY_MALLOC=system`` in the environment leaves malloc alone); a notebook or another program
that wants it calls :func:`keep_freed_memory` itself. PyTorch's CPU tuning guide gets the same
effect by preloading jemalloc or tcmalloc; this needs no extra library.

No torch import here: the CLI calls it before torch loads.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MALLOC_ENV", "apply_from_environment", "keep_freed_memory", "kept_block_bytes"]

#: Environment variable read by the ``qtoy`` command: ``system`` leaves glibc's malloc settings alone.
MALLOC_ENV = "QTOY_MALLOC"

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap (larger ones are still mapped and unmapped: rare, and
#: their compute dwarfs the page faults). glibc 2.36 accepts it; releases whose mallopt refuses
#: thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit systems) get that instead (and then
#: larger blocks, such as the 64 MiB logits of a batch of 4096 tokens over 4096 words, still fault).
MMAP_THRESHOLD_BYTES = 2**30
_MMAP_THRESHOLD_OLD_GLIBC_MAX = 32 * 2**20
#: Free memory at the top of the heap is handed back to the OS only past this much.
TRIM_THRESHOLD_BYTES = 2**31 - 1

_kept_up_to = 0  # the mmap threshold in effect, in bytes; 0 until keep_freed_memory takes effect


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    except (OSError, TypeError):  # Windows has no process-wide C library handle (TypeError on 3.10-3.12)
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl, macOS: another malloc with other knobs
    return libc


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from its heap and keep freed memory (see the module
    docstring for why and at what cost). Process-wide and for the rest of the process; calling it
    again does nothing. Returns True when the setting is in effect, False where the C library is not
    glibc (macOS, Windows, musl), where it is a no-op.

    Blocks that threads other than the main one allocate come from glibc's per-thread arenas, whose
    heaps are at most 64 MiB: larger ones are still mapped. CPU autograd runs on the calling thread,
    so a training step's tensors are the main thread's."""
    global _kept_up_to
    if _kept_up_to:
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # the mmap threshold first: each accepted setting turns glibc's automatic thresholds off, so if
    # every size is refused nothing may have been changed
    size = next((s for s in (MMAP_THRESHOLD_BYTES, _MMAP_THRESHOLD_OLD_GLIBC_MAX)
                 if libc.mallopt(_M_MMAP_THRESHOLD, s) == 1), 0)
    if not size or libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        return False
    _kept_up_to = size
    return True


def kept_block_bytes() -> int:
    """The largest block malloc now serves from its heap (and keeps when freed): 1 GiB, or 32 MiB on
    an older glibc; 0 while :func:`keep_freed_memory` has not taken effect."""
    return _kept_up_to


def apply_from_environment() -> bool:
    """What the ``qtoy`` command does at start: :func:`keep_freed_memory` unless ``QTOY_MALLOC=system``."""
    choice = os.environ.get(MALLOC_ENV, "").strip().lower()
    if choice == "system":
        return False
    if choice not in ("", "keep"):
        import warnings

        warnings.warn(f"{MALLOC_ENV}={os.environ[MALLOC_ENV]!r} is not a setting qtoy knows: use 'system' "
                      f"(leave malloc alone) or 'keep' (the default: keep freed memory for reuse). Using 'keep'.",
                      stacklevel=2)
    return keep_freed_memory()
