"""The summary ``finetune`` logs before its first step: what will be trained, on what, for how long.

It answers, before any compute is spent, what a run's first minutes otherwise reveal: the model and
its weight format, how many parameters train, how much of the data survives ``cutoff_len``, how
many tokens and optimizer steps follow, and the estimated peak memory (:func:`estimate_memory`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.config_lora import lora_variants
from alpaca_lora.data.prepare import PrepareReport
from alpaca_lora.errors import AlpacaLoraError
from alpaca_lora.model.load import trainable_parameters
from alpaca_lora.train.memory import GIB, estimate_memory


def preflight_summary(
    base_model: str | Path,
    cfg: FinetuneConfig,
    model: Any,
    report: PrepareReport,
    *,
    val_records: int,
    total_steps: int,
    device: Any,
    dtype: Any,
    new_tokens: Any = None,
) -> str:
    """Return the multi-line preflight summary of a run whose model and data are ready.

    Args:
        base_model: The base model as given to ``finetune``.
        cfg: The run's config.
        model: The model with LoRA attached.
        report: What data preparation kept, dropped and truncated (the training split).
        val_records: Records held out for evaluation.
        total_steps: Optimizer steps the run will take.
        device: The torch device trained on.
        dtype: The resolved compute dtype (a ``torch.dtype``).
        new_tokens: The :class:`~alpaca_lora.model.new_tokens.NewTokens` of the run, or None.

    """
    trainable, total = trainable_parameters(model)
    dtype_name = str(dtype).removeprefix("torch.")
    quant = {"nf4": "4-bit NF4 + double quantization", "fp4": "4-bit FP4 + double quantization",
             "int8": "8-bit (LLM.int8)", None: "none (full precision)"}[cfg.quantization]
    reasons = "".join(f"; {r}: {n}" for r, n in sorted(report.drop_reasons.items()))
    per_step = cfg.batch_size * report.total_tokens / max(1, report.kept)
    try:
        est = estimate_memory(base_model, **{**cfg.to_dict(), "compute_dtype": dtype_name})
        memory = (f"{est.total / GIB:.2f} GiB estimated peak ("
                  + ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.parts.items() if v >= 0.005 * GIB) + ")")
    except AlpacaLoraError as exc:
        memory = f"not estimated ({exc})"
    lines = [
        "preflight:",
        f"  model         {base_model}",
        f"  weights       {quant}; compute {dtype_name} on {device}",
        f"  trainable     {trainable:,} of {total:,} parameters ({100 * trainable / max(1, total):.3f}%), "
        f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {cfg.lora_target_modules}"
        + (f" ({', '.join(variants)})" if (variants := lora_variants(cfg.to_dict())) else ""),
        f"  records       {report.kept} kept for training, {report.dropped} dropped{reasons}, "
        f"{report.truncated} truncated at cutoff_len={cfg.cutoff_len}"
        + (f" ({report.dropped_turns} turns cut off), {report.turns} assistant turns trained"
           if report.turns is not None else "")
        + f"; {val_records} held out for evaluation",
        f"  tokens        {report.total_tokens:,} per epoch ({report.label_tokens:,} with loss), "
        f"about {per_step:,.0f} per step",
        f"  steps         {total_steps} optimizer steps of {cfg.batch_size} examples "
        f"({cfg.gradient_accumulation_steps} micro-batches of {cfg.micro_batch_size})",
        f"  memory        {memory}",
    ]
    if new_tokens is not None and (new_tokens.ids or new_tokens.skipped):
        lines.insert(4, f"  new tokens    {new_tokens.summary()}")
    return "\n".join(lines)
