"""Process-wide tuning for CPU inference, applied once per process before the model loads."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest; below it, blocks come from the heap and are reused
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Have glibc reuse freed blocks instead of returning them to the kernel at once; True if it took.

    Each decoding step allocates and frees the same megabyte-sized tensors (logits, sampling weights). By
    default glibc serves those with fresh mmap()s, so every step pays page faults on new memory: measured here,
    sampling 8 rows took 1.9 ms that way and 0.6 ms with these settings. Resident memory stays at its high-water
    mark instead of shrinking between requests.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        ok = False
    if not ok:
        log.info("malloc tuning not available on this platform")
    return ok


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the kernel once (glibc malloc_trim); True if some were released.

    Called once after the model loads: reading fp32 weights into bf16, or quantizing them to int4 or int8, frees the
    fp32 copies, and with the settings above glibc may keep small freed blocks resident for the worker's life.
    """
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0) == 1
    except (OSError, AttributeError):
        return False
