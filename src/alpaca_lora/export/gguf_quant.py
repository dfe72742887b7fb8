"""GGUF tensor types: which type each tensor is written in, encoding, and llama.cpp's k-quant quantizer.

``f32``, ``f16``, ``bf16``, ``q8_0`` and ``q4_0`` are encoded here (the ``gguf`` package's reference
encoders). As llama.cpp's own quantizer does, 1-D tensors (norms) stay f32, a matrix whose rows are no
multiple of the 32-value block falls back to f16, and with ``q4_0`` the embedding and output matrices are
kept at q8_0 (the logits are most sensitive to them). The k-quants (``q4_k_m``, ``q5_k_m``, ``q6_k``)
come from llama.cpp's quantizer (``llama-cpp-python``) run over an f16 file: its mixes choose per tensor.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alpaca_lora.errors import ConfigError, ModelError, shown

DIRECT = ("f32", "f16", "bf16", "q8_0", "q4_0")
"""Quantizations written directly."""
LLAMA_CPP = ("q4_k_m", "q5_k_m", "q6_k")
"""Quantizations made by llama.cpp's quantizer (needs llama-cpp-python)."""
QUANTIZATIONS = DIRECT + LLAMA_CPP
LLAMA_CPP_HINT = ('CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python (a portable build; about 10 CPU '
                  "minutes; see docs/export.md)")

# Logits of the file read back vs the source, as the RMS of the difference over the RMS of the logits about
# their mean: the rounding each type may add (measured in docs/export.md). Unrelated logits are ~1.4 apart,
# so for 4-bit types this only catches garbage; each tensor is also checked (gguf_verify.WEIGHT_TOLERANCE).
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.15, "q6_k": 0.3, "q5_k_m": 0.5, "q4_k_m": 1.0,
             "q4_0": 1.2}
logger = logging.getLogger(__name__)
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
_BLOCK = 32


def check_quantization(quantization: Any) -> str:
    """Return ``quantization`` lower-cased if known; a ConfigError listing the choices if not."""
    if not isinstance(quantization, str) or quantization.lower() not in QUANTIZATIONS:
        raise ConfigError(f"quantization={shown(quantization)}: must be one of {list(QUANTIZATIONS)} (q8_0 keeps "
                          "nearly all quality at half the size of f16; q4_k_m is the usual choice for small files)")
    return quantization.lower()


def file_type(quantization: str) -> int:
    """llama.cpp's ``general.file_type`` for a quantization name."""
    return _FILE_TYPES[quantization]


def tensor_type(gguf_name: str, shape: tuple[int, ...], quantization: str) -> Any:
    """The GGML type ``gguf_name`` (torch ``shape``) is written in for a directly written ``quantization``."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or quantization == "f32":
        return T.F32
    if quantization in ("f16", "bf16"):
        return T.F16 if quantization == "f16" else T.BF16
    if shape[-1] % _BLOCK:
        return T.F16
    if quantization == "q4_0" and gguf_name.split(".")[0] in ("token_embd", "output"):
        return T.Q8_0
    return T.Q8_0 if quantization == "q8_0" else T.Q4_0


def encode(t: torch.Tensor, qtype: Any) -> np.ndarray:
    """``t`` (fp32, torch layout) as the bytes or values GGUF stores for ``qtype``."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    data = t.detach().float().contiguous().numpy()
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float16)
    return quants.quantize(data, qtype)


def decode(tensor: Any) -> torch.Tensor:
    """The fp32 values of a tensor ``gguf.GGUFReader`` read, in torch's shape order (GGUF lists it reversed)."""
    from gguf import quants

    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.array(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return torch.from_numpy(values).reshape(shape)


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python (llama.cpp's quantizer and runtime) is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def require_llama_cpp(quantization: str) -> None:
    """Raise ModelError, with the install command, when ``quantization`` needs llama.cpp and it is missing."""
    if not llama_cpp_available():
        raise ModelError(f"quantization={quantization!r} is made by llama.cpp's quantizer, which is not installed; "
                         f"install it with: {LLAMA_CPP_HINT}. Or pick one written directly: {list(DIRECT)}")


def quantize_with_llama_cpp(source: Path, target: Path, quantization: str) -> None:
    """Quantize the GGUF ``source`` (f16) into ``target`` with llama.cpp's quantizer.

    Raises:
        ModelError: llama-cpp-python is not installed (with the install command) or the quantizer failed.

    """
    require_llama_cpp(quantization)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FILE_TYPES[quantization]
    params.nthread = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with _stderr_captured() as log:  # llama.cpp logs a line per tensor; kept for an error, summarized otherwise
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    fallback = [line.split("WARNING: ", 1)[1] for line in log if "required fallback quantization" in line]
    if fallback:
        logger.info("llama.cpp's quantizer: %s (widths that are no multiple of 256)", fallback[0])
    if status != 0 or target.stat().st_size == 0:  # the file exists (mkstemp); an empty one is a failure
        tail = "\n".join(line for line in log[-5:])
        raise ModelError(f"llama.cpp's quantizer failed on {source} with status {status}; its log ends:\n{tail}\n"
                         "Check free disk space, or export with quantization='q8_0' or 'q4_0' instead")


@contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what C code writes to file descriptor 2 while the block runs (its lines, after the block)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())
