"""Record-wise attention for packed rows: each record attends only to itself, at the cost of its own length.

A dense ``N x N`` block mask (what :class:`~alpaca_lora.data.packing.PackedCollator` builds) makes
attention cost grow with the square of the packed row, not of each record: 1,000 tokens in four
records cost four times the attention of the records alone, which on a CPU ate most of what
packing saved. :func:`use_packed_attention` therefore switches the model to ``"alpaca_lora_packed"``,
an attention function registered with transformers' ``AttentionInterface``: given the records'
boundaries (``cu_seq_lens_q``, the same keyword the flash-attention varlen kernels take), it runs
causal sdpa on each record on its own, so attention costs the sum of the squared record lengths.
Without boundaries it is plain sdpa.

The function is registered when :func:`use_packed_attention` first needs it, never on import:
importing this package leaves transformers' registries as they were.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alpaca_lora.data.packing import PACKED_ATTENTION


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa over each packed record separately; plain sdpa when no boundaries are given.

    Args:
        module: The attention module (supplies ``training``).
        query: ``(1, H, N, D)``.
        key: ``(1, H_kv, N, D)``.
        value: ``(1, H_kv, N, D)``.
        attention_mask: Ignored when ``cu_seq_lens_q`` is given (the records' own causal masks apply).
        dropout: Attention dropout probability (training only).
        scaling: Softmax scale (``1/sqrt(D)`` when None).
        cu_seq_lens_q: ``(R + 1,)`` cumulative record lengths ``[0, l1, l1 + l2, ...]``.
        **kwargs: Passed on to transformers' sdpa when there are no boundaries.

    Returns:
        ``(attn_output, None)`` with ``attn_output`` of shape ``(1, N, H, D)``, as transformers expects.

    """
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # sdpa shares each key/value head among its query heads itself: no (1, H, N, D) copies of them.
    gqa = query.shape[1] != key.shape[1]
    bounds = cu_seq_lens_q.tolist()
    p = dropout if module.training else 0.0
    pieces = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=p,
                                             is_causal=True, scale=scaling, enable_gqa=gqa)
              for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None  # (1, N, H, D)


def register_packed_attention() -> None:
    """Register :func:`packed_sdpa_attention` (and sdpa's mask builder) under ``"alpaca_lora_packed"``.

    Registering again replaces the entry with the same function, so calling this twice is harmless.
    """
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def use_packed_attention(model: Any) -> bool:
    """Switch a model using sdpa to the record-wise packed attention; return whether it was switched.

    Registers the attention function with transformers first (see :func:`register_packed_attention`).
    Other implementations are left alone: eager takes the block mask, and flash-attention kernels
    read the same ``cu_seq_lens_q`` boundaries natively.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    return model.config._attn_implementation == PACKED_ATTENTION
