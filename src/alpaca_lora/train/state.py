"""What a fine-tuning run holds: its fixed parts (:class:`Run`) and its progress (:class:`RunState`).

:func:`alpaca_lora.train.setup.setup` builds a :class:`Run`; the training loop in
:mod:`alpaca_lora.train.recipe` is the only code that advances its :class:`RunState`, and a
checkpoint records it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alpaca_lora.config import FinetuneConfig

if TYPE_CHECKING:
    from alpaca_lora.data.collator import InstructionCollator
    from alpaca_lora.data.packing import PackedCollator
    from alpaca_lora.data.prepare import PrepareReport
    from alpaca_lora.train.loss_scale import LossScaler
    from alpaca_lora.train.metrics import MetricsLogger
    from alpaca_lora.train.strategy import LossFunction, Strategy


@dataclass
class RunState:
    """The progress of a run: what a checkpoint saves and a resume restores, besides the tensors.

    Attributes:
        step: Optimizer steps completed.
        tokens_seen: Non-padding tokens trained on (all processes together).
        runtime_s: Wall time of the training loop, in seconds.
        last_eval_loss: The newest validation loss, or None before the first evaluation.
        recent_losses: Training losses of the last ``logging_steps`` steps.
        saved_checkpoint: The checkpoint this run wrote last, or None.

    """

    step: int = 0
    tokens_seen: int = 0
    runtime_s: float = 0.0
    last_eval_loss: float | None = None
    recent_losses: list[float] = field(default_factory=list)
    saved_checkpoint: Path | None = None


@dataclass
class Run:
    """Everything a run is built from, made once by ``setup`` and then only read.

    Attributes:
        cfg: The run's settings.
        output_dir: The output folder.
        base_model: The base model as given.
        tokenizer: The base model's tokenizer.
        model: The peft model (FSDP-wrapped once the strategy prepared it).
        train_set: Tokenized training records (``input_ids``, ``labels``, ``length``).
        val_set: Tokenized validation records, or None.
        collator: Turns a list of records into a micro-batch.
        loss_sum: ``(model, batch) -> summed token loss`` of one collated micro-batch.
        optimizer: AdamW over the LoRA weights.
        scheduler: Its learning-rate schedule.
        scaler: fp16 dynamic loss scaling (disabled otherwise).
        strategy: How the processes share a step (one process, replicas, or FSDP shards).
        device: The compute device of this process.
        dtype: The compute dtype ("auto" resolved).
        total_steps: Optimizer steps the run ends at.
        fingerprint: Base model and data fingerprints, checked on resume.
        report: What data preparation kept and dropped.
        metrics: The metrics logger.
        lora_names: Names of the LoRA parameters, taken before any wrapping.
        matmul: The CPU fp32 matrix-product backend, "onednn" or "blas".
        data_format: "alpaca", "messages" or "sharegpt" (what the data was read as).
        data_cache_hit: Whether the tokenized data came from the cache (see :mod:`alpaca_lora.data.token_cache`).
        chat_template: The chat template the output folder ships (the one conversations were rendered with;
            for Alpaca records the Alpaca template as a chat template).
        chat_sample: A training conversation (normalized messages, tools) and its training text, rendered
            again from the saved folder at save time.
        initial_lora: For PiSSA and OLoRA, the starting ``(A0, B0)`` of each adapted module, with which the
            saved adapter is converted to a plain LoRA on the original base (:mod:`alpaca_lora.model.lora_init`).
        state: The progress, advanced by the training loop.

    """

    cfg: FinetuneConfig
    output_dir: Path
    base_model: str
    tokenizer: Any
    model: Any
    train_set: Any
    val_set: Any
    collator: InstructionCollator | PackedCollator
    loss_sum: LossFunction
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: LossScaler
    strategy: Strategy
    device: torch.device
    dtype: torch.dtype
    total_steps: int
    fingerprint: dict[str, Any]
    report: PrepareReport
    metrics: MetricsLogger
    lora_names: list[str]
    matmul: str = "blas"
    data_format: str = "alpaca"
    data_cache_hit: bool = False
    chat_template: str = ""
    chat_sample: tuple[list[dict[str, Any]], str, str] | None = None
    initial_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    state: RunState = field(default_factory=RunState)
