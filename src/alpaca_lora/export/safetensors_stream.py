"""Safetensors tensor by tensor: reads and writes, and a forward pass loaded module by module.

Weights are read one tensor at a time, shards are written incrementally, and a forward pass loads
each module's parameters only while that module runs.

This is what lets :func:`alpaca_lora.export.merge.merge` merge and verify a model in a fraction of its
size in memory.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from alpaca_lora import files
from alpaca_lora.errors import ModelError, shown
from alpaca_lora.kernels.cpu_memory import libc

ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
FROM_ST = {code: dtype for dtype, code in ST_DTYPES.items()}


def read_tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    """Read one tensor of a safetensors file with plain file reads into a fresh tensor.

    Not ``safe_open``: it memory-maps the file, and the mapped pages it copies from count as
    resident too, doubling the footprint of every tensor read (113 MB extra for SmolLM2's embedding).
    """
    path = files[name]
    header, data_start = read_header(path, path.stat().st_mtime_ns)
    meta = header.get(name)
    if meta is None or meta.get("dtype") not in FROM_ST:
        raise ModelError(f"{path} has no readable tensor {name!r}; the checkpoint is damaged or not safetensors")
    begin, end = meta["data_offsets"]
    out = torch.empty(meta["shape"], dtype=FROM_ST[meta["dtype"]])
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    if len(view) != end - begin:
        raise ModelError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {meta['shape']}; file damaged")
    with open(path, "rb") as fh:
        fh.seek(data_start + begin)
        done = 0
        while done < len(view):
            n = fh.readinto(view[done:])
            if not n:
                raise ModelError(f"{path} ends inside tensor {name!r}; the file is truncated, download it again")
            done += n
    return out


@functools.lru_cache(maxsize=64)
def read_header(path: Path, mtime_ns: int) -> tuple[dict[str, Any], int]:
    """:func:`alpaca_lora.files.safetensors_header`, cached by path and modification time (``mtime_ns``).

    Raises:
        ModelError: The file is truncated or its header is damaged (naming the file).

    """
    return files.safetensors_header(path)


def tensor_metas(files_by_name: dict[str, Path]) -> dict[str, tuple[list[int], torch.dtype]]:
    """Return ``{name: (shape, dtype)}`` for every tensor of the files in ``files_by_name`` (checked headers only)."""
    metas = {}
    for file in sorted(set(files_by_name.values())):
        header, _ = read_header(file, file.stat().st_mtime_ns)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in FROM_ST:
                raise ModelError(f"{file}: tensor {shown(name, 80)} has dtype {shown(meta['dtype'], 20)}, which "
                                 "merge() does not handle; convert the base to float32/bfloat16/float16 first")
            metas[name] = (list(meta["shape"]), FROM_ST[meta["dtype"]])
    return metas


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor: the header is known up front, data is appended.

    Format: 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets per
    tensor, space-padded to 8 bytes), then the raw little-endian tensor bytes in header order.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[list[int], torch.dtype]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (shape, dtype) in specs.items():
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.specs, self.order = path, specs, list(specs)
        self.fh = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self.fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``, which must be the next one in header order with its declared shape and dtype."""
        assert name == self.order.pop(0) and list(tensor.shape) == self.specs[name][0], name
        assert tensor.dtype == self.specs[name][1], (name, tensor.dtype)
        self.fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()
        assert exc[0] is not None or not self.order, f"{self.path}: tensors not written: {self.order}"


def skeleton(base_dir: Path, vocab_size: int | None = None) -> Any:
    """The model with parameters on the meta device (no memory) and real buffers (rotary tables).

    ``vocab_size`` overrides the config's (an adapter's new tokens grew the embedding).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    if vocab_size:
        config.vocab_size = vocab_size
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False).eval()


def streamed_logits(model: Any, ids: torch.Tensor, source: Callable[[str], torch.Tensor],
                     lora_config: Any = None) -> torch.Tensor:
    """Run ``ids`` through ``model``, loading each module's parameters from ``source`` only while it runs."""
    aliases = _tied_aliases(model)
    if lora_config is not None:
        from peft import inject_adapter_in_model

        model = inject_adapter_in_model(lora_config, model, low_cpu_mem_usage=True).eval()
    with _streaming(model, lambda n: source(aliases.get(n, n)) if aliases.get(n) else source(n)):
        return model(input_ids=ids, use_cache=False).logits  # (B, T, V)


def _tied_aliases(model: Any) -> dict[str, str]:
    """With tied embeddings the checkpoint stores one matrix; map the output head's name to it."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return {f"{names[id(head)]}.weight": f"{names[id(emb)]}.weight"} if head is not None else {}


@contextmanager
def _streaming(model: torch.nn.Module, source: Callable[[str], torch.Tensor]) -> Iterator[None]:
    """Hook every module that owns parameters: fill them from ``source`` before it runs, free them after.

    A peft LoRA layer is filled and freed as one unit with its ``base_layer``: DoRA reads the base weight
    again after the base layer has run (for its row norms).
    """
    handles = []
    units = [p for p, m in model.named_modules() if hasattr(m, "base_layer") and p]
    for prefix, module in model.named_modules():
        inside = any(prefix.startswith(u + ".") for u in units)
        names = [] if inside else [n for n, _ in module.named_parameters(recurse=prefix in units)]
        if names:
            handles.append(module.register_forward_pre_hook(_Fill(prefix, names, source)))
            handles.append(module.register_forward_hook(_Free(names)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Fill:
    def __init__(self, prefix: str, names: list[str], source: Callable[[str], torch.Tensor]) -> None:
        self.prefix, self.names, self.source = prefix, names, source

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        for n in self.names:
            full = f"{self.prefix}.{n}" if self.prefix else n
            owner, leaf = _owner(module, n)
            t, expected = self.source(full), getattr(owner, leaf)
            if t.shape != expected.shape:
                raise ModelError(f"{full} has shape {list(t.shape)} in the checkpoint, the model expects "
                                 f"{list(expected.shape)}; the base does not fit the adapter")
            t = t.to(expected.dtype) if t.is_floating_point() else t
            owner.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The submodule that holds the parameter ``name`` (dotted, relative to ``module``) and its own name."""
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


class _Free:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        freed = 0
        for n in self.names:
            owner, leaf = _owner(module, n)
            p = getattr(owner, leaf)
            freed += p.numel() * p.element_size()
            owner.register_parameter(leaf, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                              requires_grad=False))
        if freed > 2**20:
            release_free_memory()


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only).

    Weights of a few MB come from the malloc heap, where freed blocks between live ones stay
    resident; without a trim, streaming every layer of a model ratchets RSS up by a random amount.
    """
    lib = libc()
    if lib is not None:
        lib.malloc_trim(0)
