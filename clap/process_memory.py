"""Give memory that the process has freed back to the operating system between batches.

Why: a long study runs hundreds of batches whose forward passes allocate tensors of many sizes (ragged suffix passes,
per-batch baseline caches). glibc's allocator keeps freed blocks for reuse and, as the shapes vary, its heap
fragments: the process's resident memory creeps up batch after batch although no tensor outlives its batch.
Trimming after each batch keeps it flat at a small cost (measurements: ``bench/results/process_memory.md``).
``malloc_trim(0)`` returns the free pages of every arena to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Ask the C allocator to return freed memory to the system; True when it could be asked (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
