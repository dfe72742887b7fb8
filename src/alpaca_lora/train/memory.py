"""Preflight memory estimate of a fine-tuning run, by part, from the model config alone.

The estimate is analytic (no weights are loaded): bytes of the quantized base, the LoRA weights,
their gradients and AdamW state, the activations kept for the backward pass (with or without
gradient checkpointing) and the lm_head + loss chunk. It is meant to answer "will this fit on my
GPU, and if not, what do I change" before a run starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alpaca_lora import files
from alpaca_lora.config import FinetuneConfig, check_field_names
from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.export.layout import resolve_local
from alpaca_lora.kernels.cross_entropy import cpu_chunk_rows
from alpaca_lora.model.load import resolve_compute_dtype

GIB = 1024**3


@dataclass
class MemoryEstimate:
    """Estimated peak memory of a run.

    Attributes:
        parts: Bytes by part (base_weights, lora_weights, lora_gradients, optimizer_state,
            activations, logits_and_loss, workspace).
        total: Sum of the parts, in bytes.
        assumptions: What the estimate assumed (dtype, tokens per micro-batch, ...).

    """

    parts: dict[str, int]
    total: int
    assumptions: dict[str, Any] = field(default_factory=dict)

    def fits(self, budget_bytes: int) -> bool:
        """True when the total is within ``budget_bytes``."""
        return self.total <= budget_bytes

    def summary(self) -> str:
        """A table of the parts in GiB, then the total."""
        width = max(len(k) for k in self.parts)
        rows = [f"{k.ljust(width)}  {v / GIB:8.3f} GiB" for k, v in self.parts.items()]
        rows.append(f"{'total'.ljust(width)}  {self.total / GIB:8.3f} GiB")
        return "\n".join(rows)


def projection_shapes(mc: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each Llama projection, from a ``config.json`` dict."""
    h, i, heads = mc["hidden_size"], mc["intermediate_size"], mc["num_attention_heads"]
    kv = mc.get("num_key_value_heads") or heads
    hd = mc.get("head_dim") or h // heads
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
"""Sizes of config.json the estimate needs, each a positive int."""


def _model_config(base_model: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(base_model, dict):
        mc, source = base_model, "the config dict"
    else:
        folder = resolve_local(base_model)
        if folder is None or not (folder / "config.json").is_file():
            raise ModelError(f"no config.json found for {base_model!s}; pass a local model folder or a config dict")
        source = str(folder / "config.json")
        mc = files.read_json(folder / "config.json", fix="restore the config.json that came with the weights")
    bad = [k for k in REQUIRED_KEYS if not (isinstance(mc.get(k), int) and not isinstance(mc.get(k), bool)
                                           and mc[k] > 0)]
    bad += [k for k in ("num_key_value_heads", "head_dim") if mc.get(k) is not None and not (
        isinstance(mc[k], int) and not isinstance(mc[k], bool) and mc[k] > 0)]
    if bad:
        raise ModelError(f"{source} needs positive integer sizes for {bad} (it has "
                         f"{shown({k: mc.get(k) for k in bad}, 200)}); estimate_memory reads a Llama-family config")
    return mc


def estimate_memory(base_model: str | Path | dict[str, Any], **overrides: Any) -> MemoryEstimate:
    """Estimate the peak memory of ``finetune(base_model, ..., **overrides)``.

    Args:
        base_model: A model folder, a cached Hub id, or a config dict (``hidden_size``,
            ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
            ``num_key_value_heads``, ``vocab_size``, ``tie_word_embeddings``).
        **overrides: ``FinetuneConfig`` fields (micro_batch_size, cutoff_len, lora_r, quantization,
            gradient_checkpointing, ...). ``compute_dtype="auto"`` is taken as bf16 (a GPU), or with
            ``device="cpu"`` as what this CPU would use (bf16 with native bf16 products, else fp32).
            Every position of a micro-batch is assumed to carry a label
            (the worst case for the label-only loss chunk).

    Returns:
        A :class:`MemoryEstimate`.

    """
    check_field_names(overrides, "estimate_memory() keyword arguments")
    cfg = FinetuneConfig().replace(**overrides)
    mc = _model_config(base_model)
    h, i, n_layers = mc["hidden_size"], mc["intermediate_size"], mc["num_hidden_layers"]
    heads = mc["num_attention_heads"]
    kv = mc.get("num_key_value_heads") or heads
    hd = mc.get("head_dim") or h // heads
    vocab = mc["vocab_size"]
    tied = mc.get("tie_word_embeddings", False)
    # "auto" is taken as a GPU's bf16/fp16 unless device="cpu" says where it will run.
    gpu_auto = cfg.compute_dtype == "auto" and cfg.device != "cpu"
    act = 2 if gpu_auto else resolve_compute_dtype(cfg.compute_dtype, torch.device("cpu")).itemsize

    shapes = projection_shapes(mc)
    linear = n_layers * sum(a * b for a, b in shapes.values())
    other = vocab * h * (1 if tied else 2) + n_layers * 2 * h + h
    if cfg.quantization in ("nf4", "fp4"):
        # 4 bits per weight + one 8-bit absmax per 64-weight block (double quantization) + fp32
        # non-quantized tensors (peft's k-bit preparation upcasts them).
        base = linear // 2 + linear // 64 + other * 4
    elif cfg.quantization == "int8":
        base = linear + linear // 32 + other * 4
    else:
        base = (linear + other) * act

    targets = _targets(cfg.lora_target_modules)
    lora_params = n_layers * cfg.lora_r * sum(a + b for name, (a, b) in shapes.items() if name in targets)
    adapted_out = sum(shapes[t][1] for t in targets if t in shapes)  # output rows of one layer's adapted weights
    if cfg.use_dora:
        lora_params += n_layers * adapted_out  # one trained magnitude per output row
    new_tokens = len(cfg.add_tokens or []) + len(cfg.special_tokens or [])  # at most: known ones are skipped
    if new_tokens:  # their embedding (and untied lm_head) rows train, or those whole layers ("full")
        rows = vocab + new_tokens if cfg.new_token_training == "full" else new_tokens
        lora_params += rows * h * (1 if tied else 2)
    tokens = cfg.micro_batch_size * cfg.cutoff_len
    # Tensors kept for backward per token per layer: the inputs of the two norms, sdpa's query, key,
    # value and output, the MLP's gate, up and activation (frozen 4-bit layers keep only their
    # weights), and each LoRA layer's input: with dropout its own masked copy plus a one-byte mask.
    lora_inputs = sum(shapes[t][0] for t in targets if t in shapes)
    per_layer = (2 * h + 2 * heads * hd + 2 * kv * hd + 3 * i) * act
    per_layer += lora_inputs * (act + 1 if cfg.lora_dropout > 0 else act)
    if cfg.use_dora:  # the base output and the LoRA output are kept apart for the magnitude's gradient
        per_layer += adapted_out * act
    if cfg.gradient_checkpointing:
        activations = n_layers * tokens * h * act + tokens * per_layer
    else:
        activations = n_layers * tokens * per_layer
    chunk = min(cfg.loss_chunk_size, tokens)
    if cfg.device == "cpu":  # the loss caps a CPU chunk's logits
        chunk = cpu_chunk_rows(chunk, vocab)
    # fp32 logits turned in place into their gradient, plus logsumexp's temporary; gathered hidden
    logits = chunk * vocab * 4 * 2 + tokens * h * act
    parts = {
        "base_weights": int(base),
        "lora_weights": lora_params * 4,
        "lora_gradients": lora_params * 4,
        "optimizer_state": lora_params * 8,
        "activations": int(activations),
        "logits_and_loss": int(logits),
        "workspace": int(0.05 * base) + 40 * 1024**2,
    }
    if cfg.use_dora:  # each forward builds W + s B A of one adapted weight in fp32 for its row norms
        parts["workspace"] += 2 * 4 * max((a * b for name, (a, b) in shapes.items() if name in targets), default=0)
    if cfg.device == "cpu" and (cfg.init_lora_weights.startswith("pissa") or cfg.init_lora_weights == "olora"):
        parts["initial_adapter_copy"] = lora_params * 4  # kept to save the adapter as a plain LoRA
    return MemoryEstimate(parts=parts, total=sum(parts.values()),
                          assumptions={"compute_bytes": act, "tokens_per_micro_batch": tokens,
                                       "lora_parameters": lora_params, "quantized_parameters": linear})


def _targets(spec: str | list[str]) -> set[str]:
    if spec == "attention":
        return {"q_proj", "k_proj", "v_proj", "o_proj"}
    if spec == "all-linear":
        return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    return set([spec] if isinstance(spec, str) else spec)


# ---- will it fit, and what to change -----------------------------------------------------------

GPU_RESERVE = GIB
"""Margin left on a GPU for the CUDA context and allocator fragmentation, which the estimate does not count."""


def parse_memory_size(text: str | int) -> int:
    """Bytes from an int or a size like ``"24GB"``, ``"24GiB"``, ``"80G"`` or ``"16000MB"``.

    GPU memory is sold in binary units (a "24 GB" card has 24 GiB), so ``GB``, ``G`` and ``GiB`` all
    mean 2**30 bytes here, and ``MB``/``M``/``MiB`` 2**20.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    units = {"": GIB, "G": GIB, "M": 1024**2, "T": 1024**4}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GMT]?)(?:I?B)?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"gpu_memory={text!r}: give a size like '24GB', '80GiB' or '16000MB'")
    return int(float(match.group(1)) * units[match.group(2)])


def suggest_changes(base_model: str | Path | dict[str, Any], budget_bytes: int,
                    **overrides: Any) -> list[tuple[str, MemoryEstimate]]:
    """Changes, applied one after another, that bring the estimate within ``budget_bytes``.

    They come in order of what they cost: gradient checkpointing (compute), a smaller loss chunk,
    a smaller micro-batch with the same global batch (speed, not results), 4-bit weights, then a
    shorter ``cutoff_len`` (it changes the data: more examples are truncated).

    Returns:
        ``(description, estimate after this and the earlier changes)`` pairs, up to the first that
        fits; empty when the run fits as it is. The last estimate may still not fit.

    """
    cfg = FinetuneConfig().replace(**overrides)
    est = estimate_memory(base_model, **cfg.to_dict())
    steps: list[tuple[str, MemoryEstimate]] = []

    def apply(text: str, **change: Any) -> bool:
        nonlocal cfg, est
        cfg = cfg.replace(**change)
        est = estimate_memory(base_model, **cfg.to_dict())
        steps.append((text, est))
        return est.fits(budget_bytes)

    if est.fits(budget_bytes):
        return steps
    if not cfg.gradient_checkpointing and apply("gradient_checkpointing=True", gradient_checkpointing=True):
        return steps
    if cfg.loss_chunk_size > 256 and apply("loss_chunk_size=256", loss_chunk_size=256):
        return steps
    while cfg.micro_batch_size > 1:
        mb = cfg.micro_batch_size // 2
        while cfg.batch_size % mb:
            mb -= 1
        if apply(f"micro_batch_size={mb} (batch_size stays {cfg.batch_size}: more accumulation steps)",
                 micro_batch_size=mb):
            return steps
    if cfg.quantization != "nf4" and apply("quantization='nf4'", quantization="nf4"):
        return steps
    while cfg.cutoff_len > 128:
        if apply(f"cutoff_len={cfg.cutoff_len // 2} (check truncation with `alpaca-lora inspect`)",
                 cutoff_len=cfg.cutoff_len // 2):
            return steps
    return steps


def format_fit(base_model: str | Path | dict[str, Any], gpu_bytes: int, overrides: dict[str, Any]) -> str:
    """Say whether the run fits a GPU of ``gpu_bytes`` (keeping :data:`GPU_RESERVE` free) and what to change if not."""
    budget = gpu_bytes - GPU_RESERVE
    est = estimate_memory(base_model, **overrides)
    head = (f"GPU memory {gpu_bytes / GIB:.1f} GiB, of which {budget / GIB:.1f} GiB usable "
            f"({GPU_RESERVE / GIB:.0f} GiB kept for the CUDA context and fragmentation)")
    if est.fits(budget):
        return f"{head}\nfits: estimated peak {est.total / GIB:.2f} GiB ({est.total / budget:.0%} of usable)"
    lines = [head, f"does NOT fit: estimated peak {est.total / GIB:.2f} GiB; change, in this order:"]
    steps = suggest_changes(base_model, budget, **overrides)
    for text, after in steps:
        lines.append(f"  {text:<70} -> {after.total / GIB:.2f} GiB")
    if not steps or not steps[-1][1].fits(budget):
        lines.append("  still too large: use a smaller base model or a GPU with more memory")
    return "\n".join(lines)
