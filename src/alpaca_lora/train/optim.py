"""The optimizer of a run: AdamW over the LoRA weights and its learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from alpaca_lora.config import FinetuneConfig


def build_optimizer(cfg: FinetuneConfig, params: list[torch.nn.Parameter], total_steps: int,
                    lora_b: set[int] | None = None) -> tuple[Any, Any]:
    """AdamW over ``params`` and its learning-rate schedule (a ``LambdaLR`` of :class:`LrSchedule`).

    With ``cfg.loraplus_lr_ratio`` (LoRA+), the parameters whose ``id`` is in ``lora_b`` (the B matrices)
    form a second group at ``learning_rate * loraplus_lr_ratio``; the schedule scales both groups alike.
    """
    groups: list[Any] = params
    if cfg.loraplus_lr_ratio is not None:
        fast = lora_b or set()
        groups = [{"params": [p for p in params if id(p) not in fast]},
                  {"params": [p for p in params if id(p) in fast], "lr": cfg.learning_rate * cfg.loraplus_lr_ratio}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(cfg.lr_scheduler, warmup, total_steps))


class LrSchedule:
    """Linear warm-up, then linear decay, cosine decay or constant (a multiplier of the peak lr)."""

    def __init__(self, kind: str, warmup: int, total: int) -> None:
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        """The multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)
