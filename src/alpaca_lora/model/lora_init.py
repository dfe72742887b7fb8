"""LoRA initialisations beyond peft's default, and the plain-LoRA form their adapters are saved in.

``FinetuneConfig.init_lora_weights`` picks how A and B start; peft computes most of them, and this
module the ones it cannot compute on our bases:

- **PiSSA on a 4-bit base** (QPiSSA, Meng et al. 2024). peft's PiSSA needs a full-precision weight. Here
  each adapted weight is read in full precision from the base's safetensors, A and B are its top-r
  singular factors (peft's formula), and the residual ``W - s B A`` is quantized into the 4-bit layer in
  place of ``Q(W)``: the residual has a smaller range than ``W``, so it quantizes with a smaller error.
- **LoftQ** (Li et al. 2023), one step with the base's own NF4 weights kept: A and B from the top-r SVD
  of the quantization error ``W - Q(W)``, so ``Q(W) + s B A`` starts closer to ``W``. (peft's
  ``replace_lora_weights_loftq`` does the same, on CUDA only.)

An adapter trained from PiSSA or OLoRA adds to the residual ``W - s B0 A0``, not to ``W``.
:func:`to_plain_lora` rewrites the saved adapter as a plain LoRA on ``W`` (peft's own conversion):
rank ``2r``, ``A' = [A; A0]``, ``B' = [B, -B0]``, alpha doubled (times sqrt 2 with rsLoRA, whose scale is
alpha / sqrt(r)), so merge, generate, the GGUF export and other tools read it as any LoRA adapter.
Checkpoints keep the raw form, which resuming needs (the residual is recomputed from the seed).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from alpaca_lora import files
from alpaca_lora.errors import ModelError

logger = logging.getLogger(__name__)

RESIDUAL_INITS = ("pissa", "olora")
"""Initialisations that move part of each weight into the adapter (``pissa_niter_N`` is PiSSA too)."""
_PEFT_PREFIX = "base_model.model."


def is_residual(init: str) -> bool:
    """Whether ``init`` leaves the base holding a residual, so that the saved adapter must be converted."""
    return init.startswith("pissa") or init == "olora"


def computed_here(init: str, quantized_4bit: bool) -> bool:
    """Whether :func:`apply_init` computes ``init`` (PiSSA on a 4-bit base, LoftQ) rather than peft."""
    return quantized_4bit and (init == "loftq" or init.startswith("pissa"))


def peft_init(init: str, quantized_4bit: bool) -> bool | str:
    """The ``LoraConfig.init_lora_weights`` value for ``FinetuneConfig.init_lora_weights``.

    What :func:`apply_init` computes starts from peft's default (``True``).
    """
    return True if init == "default" or computed_here(init, quantized_4bit) else init


def apply_init(model: Any, init: str, base_dir: Path, adapter: str = "default") -> int:
    """Compute the initialisations peft cannot do here (see the module docs) on every adapted 4-bit layer.

    Args:
        model: The peft model, just wrapped (A and B at peft's default).
        init: ``FinetuneConfig.init_lora_weights``.
        base_dir: The base model's folder; its safetensors give each weight in full precision.
        adapter: The adapter name.

    Returns:
        How many layers were initialised here (0 when peft did it all).

    Raises:
        ModelError: A weight cannot be read from ``base_dir`` or its shape differs from the layer's.

    """
    if not computed_here(init, True):
        return 0
    from alpaca_lora.kernels.bnb_import import import_bitsandbytes

    bnb = import_bitsandbytes()
    layers = [(name, m) for name, m in model.named_modules()
              if hasattr(m, "lora_A") and adapter in m.lora_A and isinstance(m.get_base_layer(), bnb.nn.Linear4bit)]
    if not layers:
        return 0
    where = {name: file for file in files.check_weight_files(base_dir) for name in files.tensor_shapes(file)}
    for name, layer in layers:
        tensor_name = name.removeprefix(_PEFT_PREFIX) + ".weight"
        weight = layer.get_base_layer().weight
        if tensor_name not in where:
            raise ModelError(f"init_lora_weights={init!r} reads each adapted weight in full precision, but "
                             f"{base_dir} has no tensor {tensor_name}; pass the base model's own folder")
        w = _read(where[tensor_name], tensor_name)
        quantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        if w.shape != quantized.shape:
            raise ModelError(f"{base_dir}: {tensor_name} is {tuple(w.shape)} but the loaded layer is "
                             f"{tuple(quantized.shape)}; the folder does not hold the loaded base")
        scale = float(layer.scaling[adapter])
        rank = layer.r[adapter]
        if init == "loftq":
            a, b = _top_factors(w - quantized, rank, scale, None)
        else:
            niter = int(init.rsplit("_", 1)[1]) if init != "pissa" else None
            a, b = _top_factors(w, rank, scale, niter)
            _requantize(weight, w - scale * (b @ a), bnb)
        layer.lora_A[adapter].weight.data = a.to(layer.lora_A[adapter].weight.dtype).contiguous()
        layer.lora_B[adapter].weight.data = b.to(layer.lora_B[adapter].weight.dtype).contiguous()
        if adapter in getattr(layer, "lora_magnitude_vector", {}):  # DoRA: the magnitude of the new start
            layer.lora_magnitude_vector[adapter].update_layer(
                base_layer=layer.get_base_layer(), lora_A=layer.lora_A[adapter].weight,
                lora_B=layer.lora_B[adapter].weight, scaling=scale)
    logger.info("init_lora_weights=%r: %d 4-bit layers initialised from %s", init, len(layers), base_dir)
    return len(layers)


def _read(file: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, as fp32."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        return fh.get_tensor(name).float()


def _top_factors(w: torch.Tensor, rank: int, scale: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scale * B @ A`` the best rank-``rank`` approximation of ``w`` (``(out, in)``, fp32).

    Both take the square root of the singular values, as peft's PiSSA does; ``niter`` uses a randomized
    SVD with that many iterations (torch's generator, seeded by the caller).
    """
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scale)
    return root[:, None] * vh, u * root[None, :]  # A (r, in), B (out, r)


def _requantize(weight: Any, value: torch.Tensor, bnb: Any) -> None:
    """Store ``value`` in the 4-bit parameter ``weight`` in place, with its own quantization settings."""
    state = weight.quant_state
    data, new_state = bnb.functional.quantize_4bit(
        value.to(state.dtype).contiguous(), blocksize=state.blocksize, compress_statistics=weight.compress_statistics,
        quant_type=state.quant_type, quant_storage=weight.data.dtype)
    weight.data = data
    weight.quant_state = new_state


def initial_factors(model: Any, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The starting ``(A0, B0)`` of every adapted layer (fp32 copies on the CPU), keyed by module name."""
    return {name: (m.lora_A[adapter].weight.detach().float().cpu().clone(),
                   m.lora_B[adapter].weight.detach().float().cpu().clone())
            for name, m in model.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


def to_plain_lora(weights_file: Path, config_file: Path, initial: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Rewrite a saved adapter (trained from a residual init) as a plain LoRA on the original base.

    See the module docs. ``weights_file`` and ``config_file`` are the adapter's safetensors and
    ``adapter_config.json``; ``initial`` is :func:`initial_factors` taken right after initialisation.

    Raises:
        ModelError: The saved adapter and ``initial`` do not pair up (a module is missing on one side).

    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights_file))
    config = files.read_json(config_file)
    converted: dict[str, torch.Tensor] = {}
    done = set()
    for key, value in tensors.items():
        module = key.rsplit(".lora_", 1)[0]
        start = initial.get(module)  # saved keys are module names + ".lora_A.weight" (the adapter name dropped)
        if ".lora_A." in key and start is not None:
            converted[key] = torch.cat([value.float(), start[0]], dim=0).to(value.dtype).contiguous()
            done.add(module)
        elif ".lora_B." in key and start is not None:
            converted[key] = torch.cat([value.float(), -start[1]], dim=1).to(value.dtype).contiguous()
        else:
            converted[key] = value
    if len(done) != len(initial):
        raise ModelError(f"{weights_file}: {len(initial) - len(done)} of {len(initial)} adapted modules have no "
                         "saved LoRA pair to convert; the adapter was not saved correctly, please report this")
    r, alpha = int(config["r"]), config["lora_alpha"]
    config["lora_alpha"] = alpha * math.sqrt(2) if config.get("use_rslora") else 2 * alpha  # same scale at rank 2r
    config["r"] = 2 * r
    config["init_lora_weights"] = True
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ModelError(f"{config_file}: per-module {key} cannot be converted here; please report this")
    save_file(converted, str(weights_file), metadata={"format": "pt"})
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
