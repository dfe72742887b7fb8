"""Kernels for one packed row's attention, each given the records' boundaries as Python ints.

Three ways to attend within each record of a packed row (:class:`~alpaca_lora.data.packing.PackedRecords`):

- ``"sdpa"``: one causal ``scaled_dot_product_attention`` per record. Runs everywhere; one kernel
  launch per record and layer, so many short records cost launches on a GPU. On a CPU, fp16/bf16
  attention computes in fp32 unless the CPU has AMX tiles for that dtype (:func:`cpu_sdpa_dtype`).
- ``"flex"``: torch's FlexAttention over the whole row with a document mask (a token attends to the
  earlier tokens of its own record), built once per micro-batch as a ``BlockMask`` and compiled on
  CUDA. One launch per layer. Forward only on the CPU (torch has no CPU backward for it), where it
  runs unfused: the CPU default stays ``"sdpa"``.
- ``"flash"``: flash-attention's ``flash_attn_varlen_func``, which takes the boundaries directly;
  only when the ``flash_attn`` package is installed.

:func:`choose_kernel` picks one: ``"auto"`` is ``"flash"`` on CUDA when flash-attn is installed
and the attention computes in fp16 or bf16, else ``"flex"`` on CUDA (without attention dropout),
else ``"sdpa"``. What the choice depends on (device, dropout, what is
installed) is passed in, so tests force each branch without the hardware.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from alpaca_lora.data.packing import PackedRecords
from alpaca_lora.errors import ConfigError
from alpaca_lora.kernels.cpu_features import cpu_flags

KERNELS = ("auto", "sdpa", "flex", "flash")
"""The record-wise attention kernels :func:`choose_kernel` accepts."""

CPU_TILE_FLAGS = {torch.bfloat16: "amx_bf16", torch.float16: "amx_fp16"}
"""The CPU flag of AMX tiles for each half-precision dtype."""


def flex_available() -> bool:
    """Whether this torch has FlexAttention (``torch.nn.attention.flex_attention``, torch >= 2.5)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def flash_available() -> bool:
    """Whether flash-attention (the ``flash_attn`` package) is installed."""
    return importlib.util.find_spec("flash_attn") is not None


def choose_kernel(requested: str, device: torch.device, *, dropout: float = 0.0,
                  dtype: torch.dtype = torch.bfloat16, flex: bool | None = None, flash: bool | None = None) -> str:
    """Resolve ``requested`` (one of :data:`KERNELS`) to the kernel that runs: ``"sdpa"``, ``"flex"`` or ``"flash"``.

    Args:
        requested: ``"auto"`` or a kernel name.
        device: Where the attention runs.
        dropout: The attention dropout of this call (FlexAttention has none).
        dtype: The dtype the attention computes in (flash-attention takes fp16 and bf16 only).
        flex: Whether FlexAttention is available (None: ask :func:`flex_available`).
        flash: Whether flash-attn is installed (None: ask :func:`flash_available`).

    Raises:
        ConfigError: An unknown kernel, or one that cannot run here.

    """
    if requested not in KERNELS:
        raise ConfigError(f"packed attention kernel {requested!r} is unknown; choose one of {KERNELS}")
    flex = flex_available() if flex is None else flex
    flash = flash_available() if flash is None else flash
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if device.type != "cuda":
            return "sdpa"
        if flash and half:
            return "flash"
        return "flex" if flex and dropout == 0.0 else "sdpa"
    if requested == "flash" and not flash:
        raise ConfigError("packed attention kernel 'flash' needs flash-attention: pip install flash-attn "
                          "(CUDA only), or choose 'flex' or 'sdpa'")
    if requested == "flash" and not half:
        raise ConfigError(f"packed attention kernel 'flash' computes in fp16 or bf16 only, not {dtype}; "
                          "train with compute_dtype='bfloat16' or choose 'flex' or 'sdpa'")
    if requested == "flex" and not flex:
        raise ConfigError(f"packed attention kernel 'flex' needs FlexAttention (torch >= 2.5, this is "
                          f"{torch.__version__}); upgrade torch or choose 'sdpa'")
    if requested == "flex" and dropout > 0.0:
        raise ConfigError(f"packed attention kernel 'flex' has no attention dropout (the model's is {dropout}); "
                          "choose 'sdpa' or set the model's attention_dropout to 0")
    return requested


def cpu_sdpa_dtype(device: torch.device, dtype: torch.dtype, flags: frozenset[str] | None = None) -> torch.dtype:
    """The dtype per-record sdpa computes in for attention of ``dtype`` on ``device``.

    On a CPU, fp16 and bf16 attention computes in fp32 unless the CPU has AMX tiles for that dtype:
    torch's CPU flash-attention kernel ran forward + backward 1.6-1.9x slower in bf16 than in fp32
    on an AMD EPYC with AVX512-BF16 (a SmolLM2-135M layer's heads over four records of 120-180
    tokens), and the fp32 result is the closer one to an fp64 reference. Other devices, fp32, and
    CPUs with the tiles keep ``dtype``.

    Args:
        device: Where the attention runs.
        dtype: The dtype the attention would compute in (autocast's when autocast is on).
        flags: CPU flags to judge (None: this machine's, :func:`~alpaca_lora.kernels.cpu_features.cpu_flags`).

    """
    if device.type != "cpu" or dtype not in CPU_TILE_FLAGS:
        return dtype
    flags = cpu_flags() if flags is None else flags
    return dtype if CPU_TILE_FLAGS[dtype] in flags else torch.float32


def sdpa_records(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, records: PackedRecords,
                 scaling: float | None, dropout: float, *, work_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One causal sdpa per record: ``(1, H, N, D)`` in, ``(1, H, N, D)`` out, in the attention's dtype.

    ``work_dtype`` is the dtype the products run in (None: :func:`cpu_sdpa_dtype`'s choice); the
    result comes back in the dtype the attention computes in (:func:`compute_dtype`).
    """
    dtype = compute_dtype(query)
    work = cpu_sdpa_dtype(query.device, dtype) if work_dtype is None else work_dtype
    if work == dtype:
        return _sdpa_each(query, key, value, records, scaling, dropout)
    with torch.autocast(query.device.type, enabled=False):
        out = _sdpa_each(query.to(work), key.to(work), value.to(work), records, scaling, dropout)
    return out.to(dtype)


def _sdpa_each(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, records: PackedRecords,
               scaling: float | None, dropout: float) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]  # sdpa shares each key/value head among its query heads itself
    pieces = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                             is_causal=True, scale=scaling, enable_gqa=gqa)
              for a, b in records.spans]
    return torch.cat(pieces, dim=2)


def document_ids(records: PackedRecords, device: torch.device) -> torch.Tensor:
    """``(N,)`` index of the record of each position, built on ``device`` without a host sync."""
    lengths = [b - a for a, b in zip(records.bounds[:-1], records.bounds[1:], strict=True)]
    counts = torch.tensor(lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), counts, output_size=records.bounds[-1])


def document_mask_mod(doc: torch.Tensor) -> Callable[..., torch.Tensor]:
    """FlexAttention ``mask_mod``: query ``q`` sees key ``kv`` iff both are in one record and ``kv <= q``."""

    def mask_mod(b: Any, h: Any, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (doc[q] == doc[kv]) & (kv <= q)

    return mask_mod


def flex_block_mask(records: PackedRecords, device: torch.device) -> Any:
    """The row's document ``BlockMask``, built once per micro-batch and kept in ``records.cache``."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex_block_mask", str(device))
    if key not in records.cache:
        n = records.bounds[-1]
        # On CUDA the compiled builder never holds the N x N booleans the eager one evaluates.
        records.cache[key] = create_block_mask(document_mask_mod(document_ids(records, device)), None, None, n, n,
                                               device=device, _compile=device.type == "cuda")
    return records.cache[key]


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_records(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, records: PackedRecords,
                 scaling: float | None, *, compiled: bool | None = None) -> torch.Tensor:
    """FlexAttention over the row with the records' document mask: ``(1, H, N, D)`` in and out.

    Args:
        query: ``(1, H, N, D)``.
        key: ``(1, H_kv, N, D)``.
        value: ``(1, H_kv, N, D)``.
        records: The row's boundaries.
        scaling: Softmax scale (``1/sqrt(D)`` when None).
        compiled: Run the compiled (fused) kernel; None compiles on CUDA only. Uncompiled, FlexAttention
            materializes each layer's scores: a reference, not a fast path.

    """
    from torch.nn.attention.flex_attention import flex_attention

    query, key, value = _common_dtype(query, key, value)
    compiled = query.is_cuda if compiled is None else compiled
    attend = _compiled_flex() if compiled else flex_attention
    return attend(query, key, value, block_mask=flex_block_mask(records, query.device), scale=scaling,
                  enable_gqa=query.shape[1] != key.shape[1])


def flash_records(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, records: PackedRecords,
                  scaling: float | None, dropout: float, *, varlen: Callable[..., torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """flash-attention's varlen kernel over the row: ``(1, H, N, D)`` in and out.

    Args:
        query: ``(1, H, N, D)``.
        key: ``(1, H_kv, N, D)`` (flash-attention shares key/value heads itself).
        value: ``(1, H_kv, N, D)``.
        records: The row's boundaries.
        scaling: Softmax scale (``1/sqrt(D)`` when None).
        dropout: Attention dropout probability.
        varlen: The function with ``flash_attn_varlen_func``'s signature (None: import it from flash_attn).

    """
    if varlen is None:
        from flash_attn import flash_attn_varlen_func as varlen
    query, key, value = _common_dtype(query, key, value)
    key_cu = ("cu_seqlens", str(query.device))
    if key_cu not in records.cache:  # a host-to-device copy of Python ints: no sync
        records.cache[key_cu] = torch.tensor(records.bounds, dtype=torch.int32, device=query.device)
    cu, longest = records.cache[key_cu], records.max_length
    out = varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),  # (N, H, D)
                 cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, dropout_p=dropout,
                 softmax_scale=scaling, causal=True)  # (N, H, D)
    return out.transpose(0, 1)[None]  # (1, H, N, D)


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention on ``query`` computes in: autocast's when autocast is on, else the query's."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def _common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in one dtype, as sdpa would see them: autocast's dtype when autocast is on.

    FlexAttention and flash-attention are not autocast ops, and rotary embeddings can leave the query
    and key in fp32 next to a bf16 value.
    """
    dtype = compute_dtype(tensors[0])
    return tuple(t.to(dtype) for t in tensors)
