"""One door for the files the library reads back: JSON of the expected shape, safetensors with a checked header.

A damaged, truncated or hand-edited file must end in our own error naming the file and the fix, never
in a traceback from ``json``, ``struct`` or the safetensors reader, and never be half-read into a model.
Every reader here takes the error class to raise, so a damaged checkpoint is a ``CheckpointError`` and a
damaged base a ``ModelError``.

Safetensors headers are checked before any tensor is read: the header length fits the file, every
entry names a dtype, a shape of non-negative ints and byte offsets that lie inside the data and
match the shape. That is cheap (the header is a few KB even for a 70B model) and catches truncated
downloads, which the format's readers report as a bare ``SafetensorError`` or a ``struct.error``.

The checks of a whole model folder live in :mod:`alpaca_lora.model.folder_checks`, the reader of a LoRA
adapter's files in :mod:`alpaca_lora.model.adapter_files`; both read through this module.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.errors import AlpacaLoraError, ModelError, shown

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file read back (a tokenizer.json of a 256k vocabulary is about 20 MB)."""
MAX_HEADER_BYTES = 100 * 2**20
"""Largest safetensors header, the format's own limit."""
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
              "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
"""Bytes per element of the safetensors dtypes whose size is checked against the shape."""

_JSON_KINDS = {dict: "a JSON object", list: "a JSON array", str: "a JSON string", int: "a JSON integer",
               float: "a JSON number", bool: "true or false"}


def read_json(path: str | Path, *, expect: type | tuple[type, ...] = dict, error: type[AlpacaLoraError] = ModelError,
              fix: str = "the folder is damaged; write it again") -> Any:
    """Read a JSON file that must hold a value of type ``expect``.

    Args:
        path: The file.
        expect: The type (or types) the top-level value must have; ``object`` accepts any.
        error: The error class raised for a missing, oversized, undecodable or wrongly typed file.
        fix: What the user should do, appended to the message.

    Raises:
        AlpacaLoraError: Of class ``error``, naming the file, what is wrong and ``fix``.

    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO or device: reading never ends
            raise error(f"{path} is not a regular file (a device, FIFO or socket); {fix}")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{path} is {path.stat().st_size:,} bytes, more than the {MAX_JSON_BYTES:,} a JSON file of "
                        f"this library may have; {fix}")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except AlpacaLoraError:  # ours, above (several derive from ValueError, caught below otherwise)
        raise
    except FileNotFoundError:
        raise error(f"{path} is missing; is {path.parent} a folder written by alpaca_lora? {fix}") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder where a JSON file was expected; {fix}") from None
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror}); {fix}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{path} is not valid JSON ({shown(str(exc))}); {fix}") from None
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if object not in kinds and (not isinstance(data, kinds) or (isinstance(data, bool) and bool not in kinds)):
        wanted = " or ".join(_JSON_KINDS.get(k, k.__name__) for k in kinds)
        raise error(f"{path} holds {shown(data, 60)} where {wanted} was expected; {fix}")
    return data


def safetensors_header(path: str | Path, *, error: type[AlpacaLoraError] = ModelError) -> tuple[dict[str, Any], int]:
    """Read and check the header of a safetensors file.

    Returns:
        ``(header, data_start)``: ``{tensor name: {"dtype", "shape", "data_offsets"}}`` (plus
        ``"__metadata__"`` when present) and the file offset where tensor data begins.

    Raises:
        AlpacaLoraError: Of class ``error`` when the file is missing, truncated or its header is
            inconsistent; the message names the file and the tensor.

    """
    path = Path(path)
    fix = "the file is damaged or truncated: copy or download it again, or write it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise error(f"{path} is {size} bytes, too short for a safetensors file; {fix}")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise error(f"{path} declares a {length:,}-byte header in a {size:,}-byte file; {fix}")
            raw = fh.read(length)
    except FileNotFoundError:
        raise error(f"{path} is missing; {fix}") from None
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise error(f"{path} has a header that is not valid JSON; {fix}") from None
    if not isinstance(header, dict):
        raise error(f"{path} has a header that is not a JSON object; {fix}")
    data_len = size - 8 - length
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(meta, data_len)
        if problem:
            raise error(f"{path}: tensor {shown(name, 80)} {problem}; {fix}")
    return header, 8 + length


def _entry_problem(meta: Any, data_len: int) -> str | None:
    if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str):
        return "has no dtype"
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        return f"has the shape {shown(shape, 60)}"
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len):
        return f"has the byte range {shown(offsets, 60)} outside the file's {data_len:,} bytes of data"
    item = ITEM_BYTES.get(meta["dtype"])
    if item is not None and offsets[1] - offsets[0] != math.prod(shape) * item:
        return f"has {offsets[1] - offsets[0]:,} bytes for the shape {shape} of {meta['dtype']}"
    return None


def tensor_shapes(path: str | Path, *, error: type[AlpacaLoraError] = ModelError) -> dict[str, list[int]]:
    """``{tensor name: shape}`` of one safetensors file, from its checked header."""
    header, _ = safetensors_header(path, error=error)
    return {name: list(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}


def load_safetensors(path: str | Path, *, error: type[AlpacaLoraError] = ModelError) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file after checking its header (never pickle).

    Raises:
        AlpacaLoraError: Of class ``error`` for a missing, truncated or damaged file.

    """
    from safetensors.torch import load_file

    safetensors_header(path, error=error)
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike mean a damaged file
        raise error(f"{path} cannot be read as safetensors ({type(exc).__name__}: {shown(str(exc))}); "
                    "the file is damaged: copy or write it again") from None


def check_weight_files(folder: str | Path, *, error: type[AlpacaLoraError] = ModelError) -> list[Path]:
    """Check the header of every ``*.safetensors`` file directly in ``folder``; return the files."""
    files = sorted(Path(folder).glob("*.safetensors"))
    for file in files:
        safetensors_header(file, error=error)
    return files


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` holding a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


def wide_encoding(head: bytes) -> str | None:
    """"UTF-32" or "UTF-16" when ``head`` (a file's first bytes) starts with that byte order mark, else None.

    (config_file.py checks the same marks itself: it must not import this module, which imports torch.)
    """
    if head[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        return "UTF-32"
    return "UTF-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else None
