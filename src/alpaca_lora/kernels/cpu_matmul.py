"""fp32 matrix products on the CPU through oneDNN rather than torch's default BLAS.

A 4-bit model trained on a CPU spends most of each step in fp32 products, and oneDNN picks kernels
for the CPU's instruction set, with the same fp32 arithmetic; what it measured: ``docs/performance.md``,
"CPU matrix products through oneDNN".

- :func:`resolve_backend` turns ``FinetuneConfig.cpu_matmul`` into ``"onednn"`` or ``"blas"``.
  ``"auto"`` times both once per process on a 512 x 1024 x 1024 product and takes oneDNN when it
  is available, gives the same result, and is at least 10% faster.
- :func:`linear` is ``F.linear`` on either backend.
- :mod:`alpaca_lora.kernels.cpu_linear4bit` runs bitsandbytes' 4-bit layers through :func:`linear`.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from alpaca_lora.config import CPU_MATMULS as BACKENDS
from alpaca_lora.errors import ConfigError

logger = logging.getLogger(__name__)

_MIN_GAIN = 1.10  # "auto" takes oneDNN only when it is at least this much faster


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's dense fp32 linear (``torch.ops.mkldnn._linear_pointwise``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@functools.lru_cache(maxsize=1)
def _measured_choice() -> str:
    """Time both backends once on a 512 x 1024 x 1024 fp32 product; oneDNN only if it agrees and is faster."""
    if not onednn_available():
        return "blas"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=gen)
    w = torch.randn(1024, 1024, generator=gen) / 32
    try:
        same = torch.allclose(_onednn_linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
        same = same and torch.allclose(_onednn_linear(x, w.t()), F.linear(x, w.t()), rtol=1e-4, atol=1e-4)
    except RuntimeError:
        return "blas"
    if not same:
        return "blas"

    def median_s(fn: Any) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    blas = median_s(lambda: F.linear(x, w))
    onednn = median_s(lambda: _onednn_linear(x, w))
    choice = "onednn" if blas >= _MIN_GAIN * onednn else "blas"
    logger.info("CPU fp32 matmul: %s (oneDNN %.1f ms, BLAS %.1f ms on 512x1024x1024)", choice, onednn * 1e3, blas * 1e3)
    return choice


def resolve_backend(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """The fp32 matmul backend a run uses: ``"onednn"`` or ``"blas"``.

    Args:
        choice: ``FinetuneConfig.cpu_matmul``: ``"auto"``, ``"onednn"`` or ``"blas"``.
        device: The training device; anything but the CPU gets ``"blas"`` (torch's own kernels).
        dtype: The compute dtype; only fp32 goes through oneDNN here.

    Returns:
        ``"onednn"`` or ``"blas"``.

    Raises:
        ConfigError: ``choice`` is not one of ``BACKENDS``, or ``"onednn"`` where this torch has no oneDNN.

    """
    if choice not in BACKENDS:
        raise ConfigError(f"cpu_matmul={choice!r}: must be one of {list(BACKENDS)}")
    if device.type != "cpu" or dtype != torch.float32 or choice == "blas":
        return "blas"
    if choice == "onednn":
        if not onednn_available():
            raise ConfigError("cpu_matmul='onednn': this torch build has no oneDNN linear; use 'auto' or 'blas'")
        return "onednn"
    return _measured_choice()


def linear(x: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias), through oneDNN when ``onednn`` and the operands are CPU fp32.

    ``weight`` is ``(out, in)`` and may be a transposed view; ``x`` is ``(..., in)``.
    """
    if not (onednn and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32):
        return F.linear(x, weight)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return _onednn_linear(x2, weight).view(*x.shape[:-1], weight.shape[0])
