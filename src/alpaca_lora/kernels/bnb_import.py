"""Import bitsandbytes without its notice about an optional kernel package on stderr.

On CPUs with AVX512-BF16, importing bitsandbytes tries the optional ``kernels`` package for a faster
CPU 4-bit product and, where that package is absent, logs a warning with no handler configured, so
Python prints it before every command (``--help`` included). Nothing is wrong: bitsandbytes uses its
built-in CPU kernels. :func:`import_bitsandbytes` imports it with a filter that turns exactly that
record into a debug message of this package; every other bitsandbytes warning passes, and the filter
is removed once the import is done.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

_NOTICE_LOGGER = "bitsandbytes.backends.cpu.ops"
_NOTICE_PREFIX = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _OptionalKernelNotice(logging.Filter):
    """Drop the optional-``kernels`` notice, logging it at debug level here instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_NOTICE_PREFIX):
            logger.debug("bitsandbytes uses its built-in CPU 4-bit kernels (%s)", record.getMessage()[:200])
            return False
        return True


def import_bitsandbytes() -> ModuleType:
    """Return the ``bitsandbytes`` module, importing it first if needed (see the module docstring)."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    notice_logger = logging.getLogger(_NOTICE_LOGGER)
    quiet = _OptionalKernelNotice()
    notice_logger.addFilter(quiet)
    try:
        import bitsandbytes
    finally:
        notice_logger.removeFilter(quiet)
    return bitsandbytes
