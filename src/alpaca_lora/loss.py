"""Causal-LM loss computed only where labels are set, in chunks.

The usual path builds logits for every position, ``(B, T, V)`` floats (for a 49k vocabulary,
micro-batch 8 and 512 tokens that is 800 MB in fp32), and then throws most of them away: prompt
and padding positions carry no loss. Here the body's hidden states are gathered at the label
positions first, and lm_head + cross-entropy run over those in chunks, each chunk recomputed in
the backward pass, so at most ``chunk_size x V`` logits exist at once. The math is the same:
the sum of token cross-entropies over label positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def causal_lm(model: Any) -> Any:
    """Return the ``*ForCausalLM`` module inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_loss(
    head: torch.nn.Module, softcap: float | None, hidden: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, target, reduction="sum")


def token_losses_sum(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    **body_kwargs: Any,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over label positions.

    Args:
        model: A causal LM, optionally wrapped by peft.
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)`` 1 on real tokens, 0 on padding (or a 4D mask for packing).
        labels: ``(B, T)`` target ids, -100 where no loss is taken (same layout as ``input_ids``;
            the shift by one happens here).
        chunk_size: Label positions per lm_head + cross-entropy chunk.
        **body_kwargs: Passed to the decoder body (e.g. ``position_ids`` for packed batches).

    Returns:
        ``(loss_sum, n_label_tokens)``; divide by the token count of the whole optimizer step.

    """
    lm = causal_lm(model)
    body = lm.get_decoder()
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, **body_kwargs).last_hidden_state  # (B, T, H)
    target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = target != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # (N, H), only label positions
    y = target[keep]  # (N,)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled()
    for start in range(0, n, chunk_size):
        hs, ys = h[start : start + chunk_size], y[start : start + chunk_size]
        if recompute:
            total = total + checkpoint(_chunk_loss, head, softcap, hs, ys, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, softcap, hs, ys)
    return total, n


def forward_losses_sum(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Like :func:`token_losses_sum`, through the model's own forward (full ``(B, T, V)`` logits).

    For wrappers that must run their root forward, such as FSDP, whose root unit gathers the
    embedding and lm_head weights only inside ``forward``: calling the decoder and the head
    separately, as :func:`token_losses_sum` does, would bypass it.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum"), n
