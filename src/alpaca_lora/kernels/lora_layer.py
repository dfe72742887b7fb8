"""LoRA linear layers with one autograd node for the low-rank update and a cheap dropout mask.

peft computes a LoRA linear as ``base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``. On a CPU
that costs more than the low-rank matmuls themselves: ``nn.Dropout`` draws one Bernoulli sample per
input element through a double-precision path (2.6 ms for a 666 x 576 input on the 2-core
benchmark machine, 10% of a training step), and the clone, the scaling and the sum are three more
passes over the output. With gradient checkpointing every one of them runs twice per step.

The layers here compute the same function, in one autograd node per adapter:

- The keep mask takes 16 random bits per element, four from each 64-bit draw of torch's default
  generator (0.56 ms for the same input). An element is dropped when its 16 bits fall below
  ``round(p * 65536)``, so the dropout rate is ``p`` rounded to a multiple of 1/65536 (0.05 stays
  within 3.1e-6 of itself), and kept values are scaled by the inverse of that exact keep rate, so
  the update stays unbiased. Checkpointing restores the generator state before recomputing a
  layer, so the recomputed mask is the one of the first pass.
- ``u = (x * keep) @ A^T`` and ``out = base + u @ (c * B)^T`` in one ``addmm``, where ``c`` folds
  the LoRA scaling and the dropout's ``1 / (1 - p)`` into the small ``B`` matrix.
- Backward: ``du = c * dy @ B``, ``dB = c * dy^T @ u``, ``dA = du^T @ (x * keep)`` and
  ``dx = (du @ A) * keep``, with no saved copy of the output.

The adapter's parameters and state-dict keys are peft's own (these classes subclass peft's layers
and only replace ``forward``), so saving, loading and merging are unchanged. Anything the fast
path does not cover (merged or disabled adapters, several active adapters, DoRA and other
variants, LoRA bias, mixed-adapter batches, ``fan_in_fan_out``, FSDP's views into its flat
parameter) falls back to peft's forward, logged once per reason. rsLoRA's scale and every
``init_lora_weights`` are computed exactly here (they only change ``scaling`` or the starting weights).
Reduced precision follows peft's dtype rule (the
autocast dtype under autocast, else the adapter's) on every device, autocast on the CPU included.
``FinetuneConfig.fused_lora=False`` keeps peft's layers throughout.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from alpaca_lora.kernels.autocast import active_compute_dtype
from alpaca_lora.kernels.bnb_import import import_bitsandbytes

logger = logging.getLogger(__name__)
bnb = import_bitsandbytes()  # before peft's bnb layers import it

from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

_BITS = 16  # random bits per mask element
_LEVELS = 1 << _BITS


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Draw a dropout mask with 16 random bits per element.

    Args:
        shape: Shape of the mask (the shape of the input it is applied to).
        p: Dropout probability in [0, 1).
        device: Device of the mask.

    Returns:
        ``(dropped, scale)``: a boolean mask that is True where the element is dropped, and the factor
        ``1 / (1 - p')`` that makes the kept values unbiased, where ``p'`` is ``p`` rounded to a
        multiple of 1/65536 (the exact drop rate of the mask).

    """
    dropped_levels = round(p * _LEVELS)
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None)  # the full 64-bit range: every bit uniform
    lanes = words.view(torch.int16)[:n].view(shape)
    dropped = lanes < dropped_levels - (_LEVELS // 2)
    return dropped, _LEVELS / (_LEVELS - dropped_levels)


class _LoraUpdate(torch.autograd.Function):
    """``base_out + c * ((x with dropped elements zeroed) @ A^T) @ B^T`` with hand-written gradients.

    Dtype policy: the products run in ``dtype`` (peft's rule: the autocast dtype when autocast is on,
    else the adapter's; :func:`~alpaca_lora.kernels.autocast.active_compute_dtype`), the output keeps
    ``base_out``'s dtype, and every gradient is returned in its own input's dtype (fp32 for the
    adapter weights, whose ``.grad`` then accumulates in fp32 across micro-batches).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        base_out: torch.Tensor,
        x: torch.Tensor,
        weight_a: torch.Tensor,
        weight_b: torch.Tensor,
        coef: float,
        dropped: torch.Tensor | None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        dtype = dtype or weight_a.dtype
        in_features = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):  # the casts below are the whole policy
            x2 = x.reshape(-1, in_features).to(dtype)  # (N, in)
            xk = x2 if dropped is None else x2.masked_fill(dropped.view(-1, in_features), 0.0)
            u = xk @ weight_a.to(dtype).t()  # (N, r)
            base2 = base_out.reshape(-1, base_out.shape[-1])  # (N, out)
            if base2.dtype == dtype:
                out = torch.addmm(base2, u, weight_b.to(dtype).t(), alpha=coef)
            else:  # e.g. an fp32 base output under bf16 autocast: add in the wider dtype, as peft does
                out = torch.add(base2, u @ weight_b.to(dtype).t(), alpha=coef)
        ctx.coef, ctx.dtype = coef, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(xk, u, weight_a, weight_b, dropped)
        return out.view(base_out.shape).to(base_out.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xk, u, weight_a, weight_b, dropped = ctx.saved_tensors
        coef, dtype = ctx.coef, ctx.dtype
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, out)
        need_base, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = (dy.t() @ u).mul_(coef).to(weight_b.dtype)  # (out, r)
        if need_x or need_a:
            du = (dy @ weight_b.to(dtype)).mul_(coef)  # (N, r)
            if need_a:
                grad_a = (du.t() @ xk).to(weight_a.dtype)  # (r, in)
            if need_x:
                grad_x = du @ weight_a.to(dtype)  # (N, in)
                if dropped is not None:
                    grad_x.masked_fill_(dropped.view(grad_x.shape), 0.0)
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_out if need_base else None), grad_x, grad_a, grad_b, None, None, None


@functools.cache
def _fallback_once(reason: str) -> None:
    """Log, once per process and reason, that layers take peft's forward instead of the fused one."""
    logger.info("fused LoRA path: %s", reason)


class FusedLoraForward:
    """Mixin: peft's LoRA forward, with the common case computed by :class:`_LoraUpdate`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return ``base(x) + scaling * lora_B(lora_A(dropout(x)))`` (peft's semantics)."""
        adapter = self._fast_path_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        base_out = self.base_layer(x)  # type: ignore[attr-defined]
        lora_a = self.lora_A[adapter].weight  # type: ignore[attr-defined]
        lora_b = self.lora_B[adapter].weight  # type: ignore[attr-defined]
        dropout = self.lora_dropout[adapter]  # type: ignore[attr-defined]
        coef = float(self.scaling[adapter])  # type: ignore[attr-defined]
        p = float(getattr(dropout, "p", 0.0))
        dropped = None
        if dropout.training and p > 0:  # the dropout module's own mode, as peft's nn.Dropout would read it
            dropped, scale = dropout_mask(x.shape, p, x.device)
            coef *= scale
        dtype = active_compute_dtype(x.device.type, lora_a.dtype)
        return _LoraUpdate.apply(base_out, x, lora_a, lora_b, coef, dropped, dtype)

    def _fast_path_adapter(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The one adapter the fused path can compute for this call, or None to use peft's forward."""
        if args or kwargs or self.disable_adapters or self.merged:  # type: ignore[attr-defined]
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]  # type: ignore[attr-defined]
        if len(active) != 1:
            return None
        adapter = active[0]
        if adapter in self.lora_variant:  # type: ignore[attr-defined]
            variant = type(self.lora_variant[adapter]).__name__  # type: ignore[attr-defined]
            _fallback_once(f"{variant} (e.g. DoRA's weight norm) is computed by peft's own LoRA forward")
            return None
        if self.lora_bias.get(adapter, False):  # type: ignore[attr-defined]
            _fallback_once("a LoRA bias is computed by peft's own LoRA forward")
            return None
        if getattr(self, "fan_in_fan_out", False):
            return None
        dropout = self.lora_dropout[adapter]  # type: ignore[attr-defined]
        if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
            return None
        weight_a = self.lora_A[adapter].weight  # type: ignore[attr-defined]
        weight_b = self.lora_B[adapter].weight  # type: ignore[attr-defined]
        if weight_b.dtype != weight_a.dtype or not x.is_floating_point():
            return None
        if weight_a._is_view() or weight_b._is_view():  # FSDP's views into its flat parameter
            return None
        return adapter


class FusedLoraLinear(FusedLoraForward, PeftLinear):
    """peft's LoRA layer for ``torch.nn.Linear`` with the fused forward."""


class FusedLoraLinear4bit(FusedLoraForward, PeftLinear4bit):
    """peft's LoRA layer for bitsandbytes' ``Linear4bit`` with the fused forward."""


def register_fused_layers(lora_config: Any, model: torch.nn.Module, targets: str | list[str]) -> bool:
    """Make ``get_peft_model`` build the fused layers, where every targeted linear is of one kind.

    peft matches custom layers with ``isinstance``, and bitsandbytes' 8-bit and 4-bit linears are
    subclasses of ``torch.nn.Linear``, so the mapping is registered only when the targeted modules
    are all plain ``nn.Linear`` or all 4-bit ``Linear4bit``; anything else keeps peft's layers.

    The mapping goes into ``lora_config`` only, nothing global: peft's ``_register_custom_module``
    (0.21, its documented, experimental way to supply custom LoRA layers; there is no public one)
    updates that instance's ``_custom_modules`` dict, which ``LoraModel`` reads for this config alone.

    Args:
        lora_config: The ``peft.LoraConfig`` the adapters will be created from.
        model: The model the adapters will be attached to.
        targets: The ``target_modules`` of ``lora_config``.

    Returns:
        True when the fused layers were registered.

    """
    names = [targets] if isinstance(targets, str) else list(targets)

    def targeted(name: str) -> bool:
        if targets == "all-linear":  # peft's shorthand: every linear but the output layer
            return not name.endswith("lm_head")
        return any(name == t or name.endswith("." + t) for t in names)

    kinds = {type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and targeted(name)}
    if kinds == {torch.nn.Linear}:
        lora_config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    elif kinds == {bnb.nn.Linear4bit}:
        lora_config._register_custom_module({bnb.nn.Linear4bit: FusedLoraLinear4bit})
    else:
        return False
    return True
