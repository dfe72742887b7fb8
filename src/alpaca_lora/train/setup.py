"""Everything before the first step: settings, data, model, LoRA, optimizer, strategy and resume.

Data is validated and tokenized before the model loads, so bad data fails in seconds rather than
after the model has loaded.
"""

from __future__ import annotations

import logging
import math
import os
import random
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alpaca_lora.config import FinetuneConfig, check_field_names
from alpaca_lora.data.collator import InstructionCollator
from alpaca_lora.data.packing import PackedCollator, attention_kind, body_kwargs
from alpaca_lora.data.prompts import get_template
from alpaca_lora.data.sampler import steps_per_epoch
from alpaca_lora.data.sources import load_data
from alpaca_lora.errors import ConfigError
from alpaca_lora.export import layout as art
from alpaca_lora.export.fingerprint import base_fingerprint
from alpaca_lora.kernels.cpu_matmul import resolve_backend
from alpaca_lora.kernels.cpu_memory import release_freed_memory_to_os
from alpaca_lora.kernels.cross_entropy import token_losses_sum
from alpaca_lora.kernels.packed_attention import use_packed_attention
from alpaca_lora.model.load import load_base, load_tokenizer, resolve_compute_dtype, trainable_parameters
from alpaca_lora.model.lora import attach_lora
from alpaca_lora.model.lora_init import initial_factors, is_residual
from alpaca_lora.model.new_tokens import add_to_tokenizer, init_new_rows, peft_settings
from alpaca_lora.train.checkpoint import remove_incomplete, resume
from alpaca_lora.train.distributed import Dist, check_world_size, init_distributed
from alpaca_lora.train.loss_scale import LossScaler
from alpaca_lora.train.metrics import MetricsLogger
from alpaca_lora.train.optim import build_optimizer
from alpaca_lora.train.preflight import preflight_summary
from alpaca_lora.train.run_data import prepare_run_data, records_cache_dir
from alpaca_lora.train.state import Run, RunState
from alpaca_lora.train.strategy import Strategy, choose_strategy

logger = logging.getLogger(__name__)


def resolve_config(config: FinetuneConfig | None, overrides: dict[str, Any]) -> FinetuneConfig:
    """Apply ``overrides`` to ``config`` (or the defaults), rejecting unknown names."""
    if config is not None and not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    check_field_names(overrides, "finetune() keyword arguments")
    return (config or FinetuneConfig()).replace(**overrides) if overrides else (config or FinetuneConfig())


def setup(base_model: str | Path, data: Any, output_dir: Path, cfg: FinetuneConfig, dist: Dist | None = None) -> Run:
    """Validate and tokenize the data, load the model, attach LoRA, build the optimizer and resume if asked.

    Args:
        base_model: A local model folder or a cached Hub id.
        data: Anything :func:`~alpaca_lora.data.records.load_instructions` reads.
        output_dir: The output folder.
        cfg: The run's settings.
        dist: This process's place in a multi-process run (see :mod:`alpaca_lora.train.distributed`);
            None trains in one process.

    Returns:
        The :class:`~alpaca_lora.train.state.Run`, its model prepared by the strategy (sharded
        under FSDP, equal on every process) and its state at the resumed step.

    """
    dist = dist or init_distributed(cfg.device, cfg.ddp_timeout, environ={})
    strategy = choose_strategy(cfg.fsdp, dist)
    if strategy.name == "fsdp" and not cfg.fsdp:
        cfg = cfg.replace(fsdp=True)  # recorded in config.json like a setting given by hand
    check_world_size(dist, cfg.batch_size, cfg.micro_batch_size)
    if cfg.resume_from_checkpoint and not strategy.writes_checkpoints:
        raise ConfigError(f"resume_from_checkpoint with {strategy.name.upper()}: such runs write no resumable "
                          "checkpoints yet; start without resume_from_checkpoint, or resume without FSDP")
    check_output_dir(output_dir)  # a bad output_dir fails now, not after the model has loaded
    get_template(cfg.template)  # and so does a bad template file
    device = dist.device
    dtype = resolve_compute_dtype(cfg.compute_dtype, device)

    # Data first: a bad record is reported before minutes of model loading.
    records, data_format = load_data(data, format=cfg.data_format, column_map=cfg.column_map,
                                     skip_bad_records=cfg.skip_bad_records, cache_dir=records_cache_dir(cfg))
    tokenizer = load_tokenizer(base_model)
    new_tokens = add_to_tokenizer(tokenizer, cfg.add_tokens, cfg.special_tokens)  # before the data is tokenized
    run_data = prepare_run_data(cfg, records, data_format, tokenizer, dist, source=data)
    train_set, val_set, report = run_data.train_set, run_data.val_set, run_data.report
    tokenizer.chat_template = run_data.chat_template  # what the output folder ships (checked at save)
    logger.info("data: %s", report.summary())

    model, _ = load_base(base_model, cfg.quantization, cfg.compute_dtype, device=str(device),
                         quant_storage="compute" if strategy.name == "fsdp" else None, tokenizer=tokenizer,
                         new_tokens=len(new_tokens.ids))
    if cfg.release_cpu_memory and device.type == "cpu":  # after loading, which sets its own threshold
        release_freed_memory_to_os()  # until finetune() ends (restore_memory_settings)
    # from_pretrained returns the model in eval mode; training needs train mode (dropout on), and the
    # 4-bit layers must never run an inference forward before training (see model.modes.dropout_disabled).
    init_new_rows(model, tokenizer, new_tokens)
    model = attach_lora(model, cfg, peft_settings(model, new_tokens, cfg.new_token_training)).train()
    initial_lora = initial_factors(model) if is_residual(cfg.init_lora_weights) else None
    seed_everything(cfg.seed)  # the training randomness (dropout) starts from the seed, whatever loading drew
    matmul = resolve_backend(cfg.cpu_matmul, device, dtype) if strategy.name != "fsdp" else "blas"
    if matmul == "onednn":
        from alpaca_lora.kernels.cpu_linear4bit import use_onednn_4bit_layers

        swapped = use_onednn_4bit_layers(model)
        logger.info("CPU fp32 matmul through oneDNN in %d 4-bit layers and the lm_head", swapped)
    n_trainable, total = trainable_parameters(model)
    logger.info("trainable parameters: %d of %d (%.3f%%)", n_trainable, total, 100 * n_trainable / total)
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]

    per_epoch = steps_per_epoch(len(train_set), cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * per_epoch))
    if dist.is_main:
        logger.info(preflight_summary(base_model, cfg, model, report, val_records=len(val_set or []),
                                      total_steps=total_steps, device=device, dtype=dtype, new_tokens=new_tokens))
    collator = _collator(cfg, strategy, tokenizer, model, dtype)
    lora_b = {id(p) for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n}  # LoRA+'s group
    model, optimizer, scheduler = strategy.prepare(model,
                                                   lambda params: build_optimizer(cfg, params, total_steps, lora_b))

    output_dir.mkdir(parents=True, exist_ok=True)
    for junk in remove_incomplete(output_dir):  # left by a save that was killed
        logger.info("removed %s, an incomplete checkpoint of an earlier run", junk)
    fingerprint = {"base_model": base_fingerprint(base_model), "data": run_data.fingerprint}
    scaler = LossScaler(enabled=dtype == torch.float16 and cfg.loss_scaling)
    resumed_at = resume(cfg, output_dir, fingerprint, model, optimizer, scheduler, scaler)
    metrics = MetricsLogger(output_dir / art.METRICS_FILE, cfg.report_to, output_dir, cfg.to_dict(),
                            keep_until_step=resumed_at, write=dist.is_main)
    fused = partial(_fused_loss_sum, chunk_size=cfg.loss_chunk_size, onednn=matmul == "onednn")
    return Run(cfg=cfg, output_dir=output_dir, base_model=str(base_model), tokenizer=tokenizer, model=model,
               train_set=train_set, val_set=val_set, collator=collator, loss_sum=strategy.loss_function(fused),
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, strategy=strategy, device=device,
               dtype=dtype, total_steps=total_steps, fingerprint=fingerprint, report=report, metrics=metrics,
               lora_names=lora_names, matmul=matmul, data_format=data_format, data_cache_hit=run_data.cache_hit,
               chat_template=run_data.chat_template,
               chat_sample=run_data.chat_sample, initial_lora=initial_lora, state=RunState(step=resumed_at or 0))


def check_output_dir(output_dir: Path) -> None:
    """Raise ConfigError unless ``output_dir`` is a folder, or can be made one, that this process can write."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == output_dir else f"is inside {existing}, which is"
        raise ConfigError(f"output_dir={str(output_dir)!r} {what} a file, not a folder; choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={str(output_dir)!r}: {existing} is not writable by this user; "
                          "choose another output_dir")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (what dropout and the data order draw from)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _collator(cfg: FinetuneConfig, strategy: Strategy, tokenizer: Any, model: Any, dtype: torch.dtype) -> Any:
    if cfg.packing and strategy.supports_packing:
        use_packed_attention(model)
        attention_kind(model)  # refuses an attention that cannot keep records apart
        return PackedCollator()  # boundaries only: no N x N mask
    return InstructionCollator(tokenizer)


def _fused_loss_sum(model: Any, batch: dict[str, torch.Tensor], *, chunk_size: int,
                    onednn: bool) -> tuple[torch.Tensor, int]:
    return token_losses_sum(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                            chunk_size=chunk_size, onednn=onednn, **body_kwargs(batch))
