"""Attach LoRA adapters to a loaded base: which linear layers they go on, and the peft wrapping itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.errors import ModelError, shown

ATTENTION_PROJECTIONS = {
    # Llama, Mistral, Qwen, Gemma and most Llama-family models
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Return the distinct leaf names of the linear layers in ``model`` (4-bit and 8-bit included)."""
    names = set()
    for full_name, module in model.named_modules():
        if _is_linear(module):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def adapter_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers a LoRA adapter may go on: every linear layer but the output head.

    The output head (``lm_head``) is left out: it is tied to the input embedding in many models,
    the fused loss reads its weight directly, and peft saves an adapter on it only as a full copy.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for full_name, module in model.named_modules():
        if _is_linear(module) and module is not head:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model: torch.nn.Module, targets: str | list[str]) -> str | list[str]:
    """Turn ``lora_target_modules`` into what peft expects, checking that every name is an adaptable layer.

    Args:
        model: The base model.
        targets: "attention" (the q/k/v/o projections), "all-linear", or a list of module names.

    Raises:
        ModelError: A name is the output head, the embedding or another non-linear module, or
            matches no module; the message lists the names that can be adapted.

    """
    available = adapter_module_names(model)
    if targets == "all-linear":
        return "all-linear"  # peft's "all-linear" leaves the output head out too
    if targets == "attention":
        wanted = ATTENTION_PROJECTIONS["llama"]
        found = [n for n in wanted if n in available]
        if not found:
            raise ModelError(
                f"lora_target_modules='attention' found none of {wanted} in this model; "
                f"pass a list chosen from its linear modules: {available}"
            )
        return found
    names = [targets] if isinstance(targets, str) else list(targets)
    kinds = {full.rsplit(".", 1)[-1]: type(m).__name__ for full, m in model.named_modules() if full}
    problems = []
    for name in (n for n in names if n not in available):
        if name in linear_module_names(model):
            problems.append(f"{name!r} is the output head, not a decoder layer")
        elif name in kinds:
            problems.append(f"{name!r} is not a linear layer (it is a {kinds[name]})")
        else:
            problems.append(f"{shown(name, 60)} matches no module")
    if problems:
        raise ModelError(
            f"lora_target_modules: {'; '.join(problems)}. LoRA adapters go on the linear layers of the decoder "
            f"blocks; this model's are {available} (or pass 'attention' or 'all-linear')"
        )
    return names


def attach_lora(model: Any, config: Any, token_settings: dict[str, Any] | None = None) -> Any:
    """Freeze the base, enable gradient checkpointing if asked, and wrap it with LoRA adapters.

    Args:
        model: A model from :func:`~alpaca_lora.model.load.load_model`.
        config: A :class:`~alpaca_lora.config.FinetuneConfig` (lora_* fields, gradient_checkpointing).
        token_settings: ``LoraConfig`` fields that train new tokens' embedding rows beside LoRA
            (:func:`alpaca_lora.model.new_tokens.peft_settings`).

    Returns:
        A ``peft.PeftModel`` whose only trainable parameters are the LoRA weights (kept in fp32; with DoRA
        also a magnitude vector per adapted layer). The random LoRA A matrices come from ``config.seed``
        alone; the caller's random state is left as it was. ``init_lora_weights`` other than "default"
        may have changed the base weights too (PiSSA and OLoRA leave the residual there; see
        :mod:`alpaca_lora.model.lora_init`).

    Raises:
        ModelError: No trainable parameter was attached, or PiSSA / LoftQ on a 4-bit base cannot read the
            base's full-precision weights from its folder.

    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from alpaca_lora.model import lora_init

    targets = resolve_target_modules(model, config.lora_target_modules)
    # The non-reentrant kind recomputes a layer only as far as its backward needs (it skips the MLP's
    # down projection), which is faster for the same gradients (docs/performance.md has the figures).
    gc_kwargs = {"use_reentrant": False}
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    # Under FSDP the norms must keep the storage dtype of the 4-bit weights (one dtype per FSDP
    # unit), so skip prepare_model_for_kbit_training, which casts them to fp32.
    if quantized and not getattr(config, "fsdp", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    init = getattr(config, "init_lora_weights", "default")
    quantized_4bit = getattr(model, "is_loaded_in_4bit", False)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=getattr(config, "use_rslora", False),
        use_dora=getattr(config, "use_dora", False),
        init_lora_weights=lora_init.peft_init(init, quantized_4bit),
        **(token_settings or {}),
    )
    if getattr(config, "fused_lora", False):
        from alpaca_lora.kernels.lora_layer import register_fused_layers

        register_fused_layers(lora, model, targets)
    with _seeded(config.seed):  # LoRA A is random: reproducible from the seed, the caller's RNG untouched
        peft_model = get_peft_model(model, lora)
        if lora_init.computed_here(init, quantized_4bit):
            lora_init.apply_init(peft_model, init, _base_folder(model))
            if lora_init.is_residual(init):  # checkpoints say what they are: A and B on a residual base
                peft_model.peft_config["default"].init_lora_weights = init
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if n_trainable == 0:
        raise ModelError("LoRA attached no trainable parameters; check lora_target_modules")
    return peft_model


def _base_folder(model: Any) -> Path:
    """The local folder the base was loaded from (its safetensors hold the full-precision weights)."""
    from alpaca_lora.model.folder_checks import local_model_folder

    name = getattr(model, "name_or_path", "") or ""
    folder = local_model_folder(name) if name else None
    if folder is None:
        raise ModelError(f"the base model's folder ({name!r}) is not on this machine; PiSSA and LoftQ on a 4-bit "
                         "base read its full-precision weights from there. Load the base from a local folder")
    return folder


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's generators for the block and restore their states on exit.

    CUDA is seeded (and restored) only once initialised: a seed given before that would be queued and
    applied at its initialisation, outliving the block.
    """
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        yield
