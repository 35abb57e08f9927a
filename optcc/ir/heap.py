"""Handing the C heap's free memory back to the system.

A large allocation freed in C (a session's buffers, onnx's checker's parse of a model)
stays in glibc's heap, so without ``release_memory`` a process's memory only grows
from one large step to the next (a BERT-base session leaves ~0.5 GB there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Return the memory freed in the C heap to the system (glibc's ``malloc_trim``;
    nothing elsewhere). Call it after dropping a large session or parse."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
