"""glibc's malloc thresholds, set by named calls: freed tensor memory back to the OS on a Linux CPU.

A training step frees and allocates activations of a few MB each, and glibc's heap keeps what is
freed; a lower mmap threshold unmaps such tensors when freed, at the cost of a page fault for every
fresh page. Why and what it measured: ``docs/performance.md``, "Returning freed memory to the OS".

Every setting here is made by a call and undone by one (:func:`restore_memory_settings`, or the end
of :func:`heap_returned_while`); glibc keeps them process-wide, this module keeps no state but the
C library handle, loaded on first use (:func:`libc`). Elsewhere than Linux with glibc nothing is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 1024
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_MAX = 2 * MMAP_THRESHOLD_MAX  # what glibc's own adjustment pairs with that threshold


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """The process's glibc, loaded on the first call and cached; None on other systems and C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    lib = libc()
    if lib is None:
        return False
    try:
        return bool(lib.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except AttributeError:
        return False


def _set_mmap_threshold(threshold: int) -> bool:
    return _mallopt(M_MMAP_THRESHOLD, threshold)


def _user_set(name: str, tunable: str) -> bool:
    """Whether the user set a malloc parameter for the process (environment variable or glibc tunable)."""
    return name in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def release_freed_memory_to_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold so allocations of ``threshold`` bytes or more are unmapped when freed.

    The setting lasts until :func:`restore_memory_settings`. Call it after the model has loaded:
    loading (:func:`heap_returned_while`) ends by putting glibc's ceiling back.

    Args:
        threshold: Allocation size, in bytes, from which malloc uses a private mapping.

    Returns:
        True when the setting was applied; False on other platforms or C libraries.

    """
    ok = _set_mmap_threshold(threshold)
    if ok:
        logger.info("malloc: allocations >= %d KiB are returned to the OS when freed", threshold // 1024)
    return ok


def restore_memory_settings() -> bool:
    """Put back the pair glibc's own adjustment settles on: a 32 MB mmap and a 64 MB trim threshold.

    Setting the mmap threshold by hand freezes the trim threshold at 128 KiB; the top of the heap then
    went back to the OS between training steps and faulted in again, page by page (12,000 to 25,000
    page faults in some micro-batches of the SmolLM2-135M shape, none with the 64 MB trim threshold).
    A trim threshold the user set (``MALLOC_TRIM_THRESHOLD_`` or its tunable) is left alone.

    Returns:
        True when the mmap threshold was set; False on other platforms or C libraries.

    """
    ok = _set_mmap_threshold(MMAP_THRESHOLD_MAX)
    if ok and not _user_set("MALLOC_TRIM_THRESHOLD_", "trim_threshold"):
        _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX)
    return ok


@contextmanager
def heap_returned_while(threshold: int = MMAP_THRESHOLD_BYTES) -> Iterator[None]:
    """Return freed allocations of ``threshold`` bytes or more to the OS inside the block (Linux glibc).

    On leaving, :func:`restore_memory_settings` puts glibc's ceiling back. Elsewhere this does
    nothing, and so it does where the user set the threshold for the process
    (``MALLOC_MMAP_THRESHOLD_`` or a ``glibc.malloc.mmap_threshold`` tunable).
    """
    applied = not _user_set("MALLOC_MMAP_THRESHOLD_", "mmap_threshold") and _set_mmap_threshold(threshold)
    try:
        yield
    finally:
        if applied:
            restore_memory_settings()
