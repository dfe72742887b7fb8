"""bitsandbytes' 4-bit linear layer with its CPU fp32 products through oneDNN (:mod:`alpaca_lora.kernels.cpu_matmul`).

:class:`CpuLinear4bit` is bitsandbytes' ``Linear4bit`` with a CPU fp32 path that dequantizes and
multiplies through :func:`~alpaca_lora.kernels.cpu_matmul.linear`, forward and backward;
:func:`use_onednn_4bit_layers` turns the ``Linear4bit`` layers of a loaded model into it (same object
and state, subclass only) and :func:`restore_4bit_layers` turns them back. Anything else (another
device or dtype, a weight repacked for CPU inference, a ``[K, N]`` quantized weight, a forward under
autocast) takes bitsandbytes' own forward.
"""

from __future__ import annotations

from typing import Any

import torch

from alpaca_lora.kernels.bnb_import import import_bitsandbytes
from alpaca_lora.kernels.cpu_matmul import linear

bnb = import_bitsandbytes()


class _FrozenLinear4bit(torch.autograd.Function):
    """``x @ dequantize(W)^T`` for a frozen 4-bit weight; the backward pass dequantizes again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, quant_state: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.weight, ctx.quant_state = weight, quant_state
        w = bnb.functional.dequantize_4bit(weight, quant_state).to(x.dtype)
        return linear(x, w, onednn=True)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = bnb.functional.dequantize_4bit(ctx.weight, ctx.quant_state).to(grad_out.dtype)
        return linear(grad_out, w.t(), onednn=True), None, None


class CpuLinear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' ``Linear4bit`` whose CPU fp32 products run through oneDNN (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x @ W^T + b`` with ``W`` dequantized from 4 bits."""
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(self)
        qs = self.weight.quant_state
        fast = (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")  # under autocast the product is not fp32: bnb's path
            and self.compute_dtype in (None, torch.float32)
            and qs is not None
            and len(qs.shape) == 2
            and qs.shape[1] == x.shape[-1]
            and not getattr(qs, "packing_format_for_cpu", False)
        )
        if not fast:
            return super().forward(x)
        out = _FrozenLinear4bit.apply(x, self.weight, qs)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def use_onednn_4bit_layers(model: torch.nn.Module) -> int:
    """Turn every bitsandbytes ``Linear4bit`` of ``model`` into a :class:`CpuLinear4bit`.

    The modules keep their identity, parameters and quantization state (only their class changes,
    to a subclass that overrides ``forward``), so LoRA wrappers, ``state_dict`` keys and merging
    are unaffected.

    Args:
        model: A loaded (and possibly LoRA-wrapped) model.

    Returns:
        How many layers were changed.

    """
    n = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = CpuLinear4bit
            n += 1
    return n


def restore_4bit_layers(model: torch.nn.Module) -> int:
    """Undo :func:`use_onednn_4bit_layers`: turn every :class:`CpuLinear4bit` of ``model`` back into ``Linear4bit``.

    Args:
        model: A model :func:`use_onednn_4bit_layers` was applied to.

    Returns:
        How many layers were changed back.

    """
    n = 0
    for module in model.modules():
        if type(module) is CpuLinear4bit:
            module.__class__ = bnb.nn.Linear4bit
            n += 1
    return n
