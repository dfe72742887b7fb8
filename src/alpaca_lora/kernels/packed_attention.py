"""Record-wise attention for packed rows: each record attends only to itself, at the cost of its own length.

A dense ``N x N`` block mask makes attention cost grow with the square of the packed row, not of
each record: 1,000 tokens in four records cost four times the attention of the records alone.
:func:`use_packed_attention` therefore switches the model to ``"alpaca_lora_packed"`` (from sdpa) or
``"alpaca_lora_packed_eager"`` (from eager), attention functions registered with transformers'
``AttentionInterface``. Given the records' boundaries (``packed_records``, Python ints computed once
per micro-batch by :func:`~alpaca_lora.data.packing.body_kwargs`), they attend within each record:

- ``alpaca_lora_packed`` runs the kernel :func:`~alpaca_lora.kernels.packed_kernels.choose_kernel`
  picks (per-record sdpa on the CPU; flash-attention varlen or FlexAttention on CUDA);
- ``alpaca_lora_packed_eager`` runs the model's own eager attention on each record with that
  record's ``(L, L)`` causal mask, so no row-sized mask exists anywhere.

No layer reads the boundaries from a device tensor (a host sync per layer on CUDA): only callers
that pass ``cu_seq_lens_q`` without ``packed_records`` pay that. Their mask builders return no mask
for an unpadded row (the boundaries carry it) and transformers' usual one otherwise; without
boundaries the functions are transformers' sdpa and eager.

The functions are registered when :func:`use_packed_attention` first needs them, never on import:
importing this package leaves transformers' registries as they were.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from alpaca_lora.data.packing import PACKED_ATTENTION, PACKED_EAGER_ATTENTION, PackedRecords
from alpaca_lora.kernels.packed_kernels import (
    choose_kernel,
    compute_dtype,
    flash_records,
    flex_records,
    sdpa_records,
)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_records: PackedRecords | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed record; plain sdpa when no boundaries are given.

    Args:
        module: The attention module (supplies ``training``).
        query: ``(1, H, N, D)``.
        key: ``(1, H_kv, N, D)``.
        value: ``(1, H_kv, N, D)``.
        attention_mask: Ignored when boundaries are given (the records' own causal masks apply).
        dropout: Attention dropout probability (training only).
        scaling: Softmax scale (``1/sqrt(D)`` when None).
        packed_records: The row's boundaries as Python ints, and the kernel to use.
        cu_seq_lens_q: ``(R + 1,)`` cumulative record lengths, read when ``packed_records`` is absent
            (one host sync per layer).
        **kwargs: Passed on to transformers' sdpa when there are no boundaries.

    Returns:
        ``(attn_output, None)`` with ``attn_output`` of shape ``(1, N, H, D)``, as transformers expects.

    """
    records = _records(query, key, packed_records, cu_seq_lens_q)
    if records is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    p = dropout if module.training else 0.0
    kernel = choose_kernel(records.kernel, query.device, dropout=p, dtype=compute_dtype(query))
    if kernel == "flex":
        out = flex_records(query, key, value, records, scaling)
    elif kernel == "flash":
        out = flash_records(query, key, value, records, scaling, p)
    else:
        out = sdpa_records(query, key, value, records, scaling, p)
    return out.transpose(1, 2).contiguous(), None  # (1, N, H, D)


def packed_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_records: PackedRecords | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The model's eager attention on each packed record with the record's own causal mask.

    Arguments as :func:`packed_sdpa_attention`. The per-record ``(1, 1, L, L)`` additive masks are
    built in the first layer and reused by the others (``packed_records.cache``).
    """
    eager = model_eager_attention(module)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    records = _records(query, key, packed_records, cu_seq_lens_q)
    if records is None:
        if attention_mask is None and query.shape[2] == key.shape[2] > 1:  # packed_eager_mask left causality to us
            attention_mask = _causal_mask(query.shape[2], query.dtype, query.device)
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    pieces = []
    for a, b in records.spans:
        mask_key = ("eager_mask", b - a, query.dtype, str(query.device))
        if mask_key not in records.cache:
            records.cache[mask_key] = _causal_mask(b - a, query.dtype, query.device)
        out, _ = eager(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], records.cache[mask_key],
                       dropout=dropout, scaling=scaling, **kwargs)  # (1, L, H, D)
        pieces.append(out)
    return torch.cat(pieces, dim=1), None  # (1, N, H, D)


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(1, 1, L, L)`` additive causal mask: 0 where a token may attend, the dtype's minimum elsewhere."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril_()  # (L, L)
    blocked = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return blocked.masked_fill(causal, 0.0)[None, None]


def model_eager_attention(module: torch.nn.Module) -> Callable[..., Any]:
    """The ``eager_attention_forward`` of the modeling file that defines ``module``'s class.

    Raises:
        ValueError: That file defines none (such a model is left on transformers' eager by
            :func:`use_packed_attention`, so this is an internal error).

    """
    eager = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__module__} defines no eager_attention_forward; load the model with "
                         "attn_implementation='sdpa' for packing")
    return eager


def _records(query: torch.Tensor, key: torch.Tensor, packed: PackedRecords | None,
             cu_seq_lens_q: torch.Tensor | None) -> PackedRecords | None:
    """The row's boundaries, or None where the call is not a packed row (a batch, or a cached decode step)."""
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    if packed is not None:
        return packed
    if cu_seq_lens_q is not None:
        return PackedRecords(tuple(cu_seq_lens_q.tolist()))
    return None


def packed_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No 4D mask for a row without padding (the boundaries carry the blocks); sdpa's mask otherwise."""
    return _packed_mask(sdpa_mask, args, attention_mask, kwargs)


def packed_eager_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No 4D mask for a row without padding (the boundaries carry the blocks); eager's mask otherwise."""
    return _packed_mask(eager_mask, args, attention_mask, kwargs)


def _packed_mask(builder: Callable[..., Any], args: tuple[Any, ...], attention_mask: torch.Tensor | None,
                 kwargs: dict[str, Any]) -> torch.Tensor | None:
    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    if attention_mask is None and q_length is not None and q_length == kv_length:
        return None
    return builder(*args, attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> None:
    """Register the packed attention functions and their mask builders with transformers.

    Registering again replaces the entries with the same functions, so calling this twice is harmless.
    """
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_sdpa_mask)
    AttentionInterface.register(PACKED_EAGER_ATTENTION, packed_eager_attention)
    AttentionMaskInterface.register(PACKED_EAGER_ATTENTION, packed_eager_mask)


def use_packed_attention(model: Any) -> bool:
    """Switch a model using sdpa or eager to the record-wise packed attention; return whether it was switched.

    Registers the attention functions with transformers first (see :func:`register_packed_attention`).
    Other implementations are left alone, and so is an eager model whose modeling file has no
    ``eager_attention_forward`` (transformers then derives the block mask from ``position_ids``).
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager") or not hasattr(model, "set_attn_implementation"):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if impl == "eager" and getattr(inspect.getmodule(type(base)), "eager_attention_forward", None) is None:
        return False
    target = PACKED_ATTENTION if impl == "sdpa" else PACKED_EAGER_ATTENTION
    register_packed_attention()
    model.set_attn_implementation(target)
    return model.config._attn_implementation == target
