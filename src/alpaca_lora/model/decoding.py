"""Decode with model.generate: left-padded batches, or one prompt streamed as text pieces.

Batches are padded on the LEFT with an attention mask, so every prompt ends at the last column and
batched greedy output equals one-by-one output (training pads right, where the labels follow the
prompt). Only the new tokens are decoded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from alpaca_lora.kernels.modes import checkpointing_paused, dropout_disabled


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad on the left so every prompt ends in the last column; the mask is 0 on padding."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)  # (B, T), (B, T)


@contextlib.contextmanager
def answering(model: Any) -> Iterator[None]:
    """Put a model in eval mode for the block, then restore its previous mode.

    A model in training with bitsandbytes 4-bit layers only has its dropout switched off (and its
    gradient checkpointing paused): eval mode would repack the 4-bit weights on the CPU (see
    :func:`~alpaca_lora.kernels.modes.dropout_disabled`).
    """
    quantized = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    if model.training and quantized:
        with checkpointing_paused(model), dropout_disabled(model):
            yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batches(prompts: list[list[int]], batch_size: int, max_new_tokens: int, limit: int | None) -> Iterator[list[int]]:
    """Indices in batches, longest prompt first (similar lengths, less padding).

    A prompt whose answer the context cuts short runs alone with its own bound, so batched output
    still equals one-by-one output.
    """
    run: list[int] = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        if limit is not None and len(prompts[i]) + max_new_tokens > limit:
            yield [i]
            continue
        run.append(i)
        if len(run) == batch_size:
            yield run
            run = []
    if run:
        yield run


def _bounded(kwargs: dict[str, Any], width: int, limit: int | None) -> dict[str, Any]:
    """``kwargs`` with max_new_tokens lowered to what the context leaves after a prompt of ``width`` tokens."""
    room = kwargs["max_new_tokens"] if limit is None else min(kwargs["max_new_tokens"], limit - width)
    return {**kwargs, "max_new_tokens": room}


def _tokenizer_for(kwargs: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``{"tokenizer": tokenizer}`` for the settings transformers needs it for (stop strings, token healing)."""
    return {"tokenizer": tokenizer} if kwargs.get("stop_strings") or kwargs.get("token_healing") else {}


def generate_batches(model: Any, tokenizer: Any, prompts: list[list[int]], kwargs: dict[str, Any],
                     batch_size: int, limit: int | None) -> list[str]:
    """Answer ``prompts`` in left-padded batches of similar length; the texts in the order of ``prompts``."""
    texts: dict[int, str] = {}
    with answering(model), torch.no_grad():
        for idx in _batches(prompts, batch_size, kwargs["max_new_tokens"], limit):
            ids, mask = _left_pad([prompts[i] for i in idx], kwargs["pad_token_id"], model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, **_tokenizer_for(kwargs, tokenizer),
                                 **_bounded(kwargs, ids.shape[1], limit))  # (B, T + new)
            for i, row in zip(idx, out[:, ids.shape[1]:], strict=True):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [texts[i] for i in range(len(prompts))]


def stream_text(model: Any, tokenizer: Any, prompt: list[int], kwargs: dict[str, Any],
                limit: int | None) -> Iterator[str]:
    """Yield text pieces while a background thread generates; pieces join to the stripped response."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids, mask = _left_pad([prompt], kwargs["pad_token_id"], model.device)
    kwargs = _bounded(kwargs, ids.shape[1], limit)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kwargs,
                               **_tokenizer_for(kwargs, tokenizer))
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)
            streamer.end()

    with answering(model):
        thread = threading.Thread(target=run, name="alpaca_lora-generate", daemon=True)
        thread.start()
        try:
            yield from _strip_stream(streamer)
        finally:
            thread.join()
    if failure:
        raise failure[0]


def _strip_stream(pieces: Iterator[str]) -> Iterator[str]:
    """Drop leading whitespace and hold back trailing whitespace, as ``str.strip`` does on the whole."""
    started, pending = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        text = pending + piece
        body = text.rstrip()
        pending = text[len(body):]
        if body:
            yield body
