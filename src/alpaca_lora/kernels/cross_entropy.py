"""Causal-LM loss computed only where labels are set, in chunks.

The usual path builds logits for every position, ``(B, T, V)`` floats (for a 49k vocabulary,
micro-batch 8 and 512 tokens that is 800 MB in fp32), and then throws most of them away: prompt
and padding positions carry no loss. Here the body's hidden states are gathered at the label
positions first, and lm_head + cross-entropy run over those in chunks, so at most
``chunk_size x V`` logits exist at once. The math is the same: the sum of token cross-entropies
over label positions.

When the head is a plain ``nn.Linear`` (the Llama family's ``lm_head``, tied or not), each chunk's
gradient is made right away in the forward pass (softmax minus one-hot, turned in place out of the
logits buffer) and kept as ``(N, H)`` gradients of the hidden states, so the backward pass neither
recomputes nor stores any logits. Other heads (a LoRA-wrapped or quantized ``lm_head``) take the
same chunks through autograd, each recomputed in the backward pass.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.kernels.autocast import active_compute_dtype
from alpaca_lora.kernels.cpu_matmul import linear
from alpaca_lora.kernels.modes import checkpointing_paused

CPU_CHUNK_BYTES = 30 * 1024 * 1024
"""On the CPU, a chunk's fp32 logits stay below glibc's largest heap-served allocation (32 MB).

Larger buffers get a fresh memory mapping each time, and every one of its pages faults in again:
on the SmolLM2-135M shape (49,152-token vocabulary), 311 label rows in one 61 MB chunk cost about
15,000 page faults a micro-batch. Capped at 160 rows, the buffer is reused from the heap.
"""


def cpu_chunk_rows(chunk_size: int, vocab: int) -> int:
    """``chunk_size`` label rows, fewer if their fp32 logits would pass ``CPU_CHUNK_BYTES`` (CPU runs)."""
    return min(chunk_size, max(1, CPU_CHUNK_BYTES // (4 * vocab)))


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


def _chunk_loss_and_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    softcap: float | None,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    onednn: bool = False,
) -> torch.Tensor:
    """Summed loss of one chunk; its gradients are written into (or added to) the ``grad_*`` buffers.

    The two products with the head run in ``weight``'s dtype (the compute dtype: the caller casts it
    once per call); the softmax, the loss and the weight gradient are fp32.
    """
    logits = linear(h.to(weight.dtype), weight, onednn)
    if bias is not None:
        logits += bias.to(weight.dtype)
    logits = logits.float()  # (n, V)
    squash = None
    if softcap:
        squash = torch.tanh(logits.div_(softcap))
        logits = squash * softcap
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    loss = (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
    if grad_h is None and grad_w is None and grad_b is None:
        return loss
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad[torch.arange(y.numel(), device=y.device), y] -= 1.0
    if squash is not None:  # d(c * tanh(x / c)) / dx = 1 - tanh^2
        grad.mul_(squash.square_().neg_().add_(1.0))
    if grad_h is not None:
        grad_h.copy_(linear(grad.to(weight.dtype), weight.t(), onednn))
    if grad_w is not None:
        grad_w += grad.t() @ h.float()  # (V, H), fp32
    if grad_b is not None:
        grad_b += grad.sum(0)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target``, chunk by chunk.

    The gradients are made in the forward pass, one chunk at a time, and scaled in the backward.
    Dtype policy: the head's products run in the autocast dtype when autocast is on for the device
    (else in the weight's dtype); the loss is an fp32 sum; each gradient keeps its input's dtype.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        softcap: float | None,
        chunk_size: int,
        onednn: bool,
    ) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device = hidden.device.type
        dtype = active_compute_dtype(device, weight.dtype)
        with torch.autocast(device, enabled=False):  # the casts here are the whole policy
            w = weight.to(dtype)  # (V, H), cast once for all chunks
            for start in range(0, target.numel(), chunk_size):
                rows = slice(start, start + chunk_size)
                # One chunk per call: its (n, V) buffer is freed before the next chunk allocates one.
                total += _chunk_loss_and_grads(
                    hidden[rows],
                    w,
                    bias,
                    target[rows],
                    softcap,
                    None if grad_h is None else grad_h[rows],
                    grad_w,
                    grad_b,
                    onednn,
                )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_total.float()
        return (
            None if grad_h is None else grad_h * scale.to(grad_h.dtype),
            None if grad_w is None else (grad_w * scale).to(ctx.dtypes[0]),
            None if grad_b is None else (grad_b * scale).to(ctx.dtypes[1]),
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy_sum(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    target: torch.Tensor,
    softcap: float | None = None,
    chunk_size: int = 1024,
    onednn: bool = False,
) -> torch.Tensor:
    """Sum of cross-entropies of ``head(hidden)`` against ``target``, never holding more than a chunk of logits.

    Args:
        head: The output layer (``lm_head``).
        hidden: ``(N, H)`` hidden states at the label positions.
        target: ``(N,)`` next-token ids.
        softcap: Final logit soft-capping (Gemma 2), or None.
        chunk_size: Rows per chunk (on the CPU at most ``CPU_CHUNK_BYTES`` of fp32 logits).
        onednn: Run a plain ``nn.Linear`` head's CPU fp32 products through oneDNN
            (:mod:`alpaca_lora.kernels.cpu_matmul`).

    Returns:
        A scalar fp32 tensor; differentiable in ``hidden`` (and in the head's weights if they train).

    """
    vocab = getattr(head, "out_features", None)
    if hidden.device.type == "cpu" and vocab:
        chunk_size = cpu_chunk_rows(chunk_size, vocab)
    if type(head) is torch.nn.Linear:
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, target, softcap, chunk_size, onednn)
    total = hidden.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled()
    for start in range(0, target.numel(), chunk_size):
        hs, ys = hidden[start : start + chunk_size], target[start : start + chunk_size]
        if recompute:
            total = total + checkpoint(_chunk_loss, head, softcap, hs, ys, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, softcap, hs, ys)
    return total


def token_losses_sum(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    onednn: bool = False,
    **body_kwargs: Any,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over label positions.

    Args:
        model: A causal LM, optionally wrapped by peft.
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)`` 1 on real tokens, 0 on padding; None for a packed row (its
            boundaries come in ``body_kwargs``).
        labels: ``(B, T)`` target ids, -100 where no loss is taken (same layout as ``input_ids``;
            the shift by one happens here).
        chunk_size: Label positions per lm_head + cross-entropy chunk.
        onednn: Run the lm_head's CPU fp32 products through oneDNN (:mod:`alpaca_lora.kernels.cpu_matmul`).
        **body_kwargs: Passed to the decoder body (e.g. ``position_ids`` for packed batches).

    Returns:
        ``(loss_sum, n_label_tokens)``; divide by the token count of the whole optimizer step.

    """
    lm = causal_lm(model)
    body = lm.get_decoder()
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    with checkpointing_paused(body) if not torch.is_grad_enabled() else contextlib.nullcontext():
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, **body_kwargs).last_hidden_state  # (B,T,H)
    target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = target != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # (N, H), only label positions
    y = target[keep]  # (N,)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    return linear_cross_entropy_sum(head, h, y, softcap, chunk_size, onednn), n


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
