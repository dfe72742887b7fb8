"""Give freed tensor memory back to the operating system at once when training on a Linux CPU.

glibc's malloc serves allocations below a threshold (which it raises on its own, up to 32 MB)
from its heap, and keeps what is freed there for reuse. A training step frees and allocates
activations of a few MB each, layer after layer, and the heap fragments: measured on the
SmolLM2-135M shape (one packed micro-batch of 680 tokens), the forward pass left RSS 590 MB above
what ``malloc_trim`` could release, while autograd held only 47 MB. With the threshold set to
256 KiB, such tensors get their own memory mappings and are unmapped when freed, and the peak RSS
of that forward pass fell from 1.82 GB to 1.37 GB.

The price is a page fault for every fresh page of every such tensor, about half the tokens per
second. Since then the peak of a run comes from loading (the fused loss removed most of the
training-step growth), and in the training benchmark (SmolLM2-135M
shape, cutoff 512, micro-batch 4) this setting no longer lowers it: 1,286 MB against 1,287 MB,
at 0.5x the speed. So it is off by default; it may still help a long-context CPU run whose
training step, not its loading, sets the peak.

The setting is process-wide and stays for the life of the process; it is applied only on Linux
with glibc and only when ``FinetuneConfig.release_cpu_memory`` is True and training runs on the CPU.

Loading is different: it allocates and frees a few hundred large temporaries once (quantizing
every weight), so :func:`heap_returned_while` applies the low threshold around ``from_pretrained``
on the CPU only. There it lowered the loading peak of the SmolLM2-135M shape from 1350 MB to
1233 MB at no measurable cost. Afterwards the threshold is 32 MB, the ceiling glibc's own
adjustment would reach (training speed and peak measured the same as glibc's default), unless
``release_freed_memory_to_os`` had set one for the whole run.
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
_run_threshold: list[int] = []  # the threshold release_freed_memory_to_os set for the whole run, if any


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    libc = _libc()
    if libc is None:
        return False
    try:
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except AttributeError:
        return False


def _set_mmap_threshold(threshold: int) -> bool:
    return _mallopt(M_MMAP_THRESHOLD, threshold)


def release_freed_memory_to_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold so allocations of ``threshold`` bytes or more are unmapped when freed.

    Args:
        threshold: Allocation size, in bytes, from which malloc uses a private mapping.

    Returns:
        True when the setting was applied; False on other platforms or C libraries.

    """
    ok = _set_mmap_threshold(threshold)
    if ok:
        _run_threshold[:] = [threshold]
        logger.info("malloc: allocations >= %d KiB are returned to the OS when freed", threshold // 1024)
    return ok


@contextmanager
def heap_returned_while(threshold: int = MMAP_THRESHOLD_BYTES) -> Iterator[None]:
    """Return freed allocations of ``threshold`` bytes or more to the OS inside the block (Linux glibc).

    On leaving, the threshold becomes the one :func:`release_freed_memory_to_os` set for the run,
    or 32 MB with a 64 MB trim threshold: the pair glibc's own adjustment settles on. Setting the mmap
    threshold by hand freezes the trim threshold at 128 KiB; the top of the heap then went back to
    the OS between training steps and faulted in again, page by page (12,000 to 25,000 page faults
    in some micro-batches of the SmolLM2-135M shape, none with the 64 MB trim threshold). Elsewhere
    this does nothing, and so it does where the user set the threshold for the process
    (``MALLOC_MMAP_THRESHOLD_`` or a ``glibc.malloc.mmap_threshold`` tunable); a trim threshold the
    user set (``MALLOC_TRIM_THRESHOLD_`` or its tunable) is left alone.
    """
    user_set = "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
    applied = not user_set and _set_mmap_threshold(threshold)
    try:
        yield
    finally:
        if applied and _run_threshold:
            _set_mmap_threshold(_run_threshold[0])
        elif applied:
            _set_mmap_threshold(MMAP_THRESHOLD_MAX)
            tunables = os.environ.get("GLIBC_TUNABLES", "")
            if "MALLOC_TRIM_THRESHOLD_" not in os.environ and "trim_threshold" not in tunables:
                _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX)
