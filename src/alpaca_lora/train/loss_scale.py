"""Dynamic loss scaling for fp16 training (Micikevicius et al., 2018, "Mixed Precision Training").

fp16 has a narrow range: gradients below 6e-8 flush to zero and values above 65,504 become inf. The
loss is multiplied by ``scale`` before the backward pass so the small gradients of the LoRA weights
stay representable, then the fp32 gradients are divided by ``scale`` before clipping. A step whose
scaled gradients overflowed is skipped (nothing is updated) and the scale halves; after
``growth_interval`` good steps in a row it doubles. This is the rule of ``torch.amp.GradScaler``,
written over a list of parameters so that its decision can be summed over processes (every rank
skips the same steps) and its state saved as JSON in a checkpoint.

bf16 and fp32 have fp32's range and need no scaling: there the scaler is disabled and multiplies by 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from alpaca_lora.errors import CheckpointError


@dataclass
class LossScaler:
    """The loss scale of a run and its update rule.

    Attributes:
        enabled: Scale at all (fp16 compute); a disabled scaler has ``scale`` 1 and never backs off.
        scale: The current factor the loss is multiplied by before ``backward``.
        growth_interval: Good steps in a row after which the scale doubles.
        good_steps: Good steps since the last overflow or growth.
        min_scale: Below this scale an overflow is no longer the scale's fault: the gradients
            themselves are not finite, and the run has diverged.

    """

    enabled: bool = False
    scale: float = 2.0**16
    growth_interval: int = 2000
    good_steps: int = 0
    min_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.enabled:
            self.scale = 1.0

    def unscale(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Divide the gradients of ``params`` by the scale in place (before clipping measures them).

        Whether they overflowed is read from the clipping's total norm, which every process computes
        over the same (summed or sharded) gradients, so all of them agree on skipping a step.
        """
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        """Halve the scale after an overflow, double it after ``growth_interval`` good steps."""
        if not self.enabled:
            return
        if overflow:
            self.scale /= 2.0
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def exhausted(self) -> bool:
        """Whether the scale has fallen below ``min_scale``: more overflows are a divergence, not bad luck."""
        return self.enabled and self.scale < self.min_scale

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state as JSON-serialisable values (saved in every checkpoint)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, refusing values a checkpoint could not have written.

        Raises:
            CheckpointError: ``state`` is not a mapping of the scaler's fields with sane values.

        """
        try:
            scale, good = float(state["scale"]), int(state["good_steps"])
            enabled = bool(state["enabled"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"the loss-scaler state in the checkpoint is damaged: {str(state)[:200]}") from None
        if enabled != self.enabled:
            raise CheckpointError(
                f"the checkpoint was written with loss scaling {'on' if enabled else 'off'} and this run has it "
                f"{'on' if self.enabled else 'off'}; resume with the same compute_dtype"
            )
        if not (math.isfinite(scale) and scale > 0 and good >= 0):
            raise CheckpointError(f"the loss-scaler state in the checkpoint is damaged: scale={scale}, "
                                  f"good_steps={good}; resume from an earlier checkpoint")
        self.scale, self.good_steps = scale, good
