"""finetune(): one call from a model and a data set to a self-describing adapter folder.

The recipe is three named steps: :func:`setup` (config, data, model, optimizer),
:func:`fit` (the training loop) and :func:`save` (the output folder). Data is validated and
tokenized before the model loads, so bad data fails in seconds, not after a model download.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from alpaca_lora.config import FinetuneConfig, check_field_names
from alpaca_lora.data.collator import InstructionCollator
from alpaca_lora.data.packing import PackedCollator, attention_kind, batch_tokens, body_kwargs
from alpaca_lora.data.prepare import data_fingerprint, load_instructions, prepare_dataset, split_dataset
from alpaca_lora.data.prompts import get_template
from alpaca_lora.data.sampler import epoch_batches, steps_per_epoch
from alpaca_lora.errors import CheckpointError, ConfigError, ModelError
from alpaca_lora.export import layout as art
from alpaca_lora.export.fingerprint import base_fingerprint
from alpaca_lora.files import non_finite
from alpaca_lora.kernels.cpu_matmul import resolve_backend
from alpaca_lora.kernels.cpu_memory import release_freed_memory_to_os
from alpaca_lora.kernels.cross_entropy import forward_losses_sum, token_losses_sum
from alpaca_lora.kernels.packed_attention import use_packed_attention
from alpaca_lora.model.load import (
    load_model,
    load_tokenizer,
    resolve_compute_dtype,
    trainable_parameters,
)
from alpaca_lora.model.lora import attach_lora
from alpaca_lora.train.checkpoint import (
    WRITE_ERRORS,
    capture_rng,
    disk_full,
    latest_checkpoint,
    remove_incomplete,
)
from alpaca_lora.train.distributed import (
    Dist,
    check_world_size,
    clip_grad_norm,
    fsdp_requested,
    full_state_dict,
    global_step_shard,
    init_distributed,
    save_fsdp_adapter,
    trainable,
    wrap_fsdp,
)
from alpaca_lora.train.interrupt import StopRequest, stop_requests
from alpaca_lora.train.loss_scale import LossScaler
from alpaca_lora.train.metrics import MetricsLogger, plot_losses
from alpaca_lora.train.optim import build_optimizer
from alpaca_lora.train.preflight import preflight_summary
from alpaca_lora.train.resume import (
    maybe_resume,
    save_run_checkpoint,
    stop_broken_weights,
    stop_diverged,
    stop_interrupted,
)

logger = logging.getLogger(__name__)

@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        adapter_dir: The output folder (adapter, template, config, fingerprints, tokenizer, metrics).
        train_loss: Mean training loss over the last logged window of steps.
        eval_loss: Loss on the validation split at the end, or None without one.
        steps: Optimizer steps completed in total (including steps before a resume).
        tokens_seen: Non-padding tokens trained on in this call.
        runtime_s: Wall time of the training loop alone, in seconds.
        records_kept: Training records after dropping those with no trainable label.
        records_dropped: Records dropped, by reason.
        compute_dtype: The dtype training computed in ("auto" resolved on the training machine).

    """

    adapter_dir: Path
    train_loss: float
    eval_loss: float | None
    steps: int
    tokens_seen: int
    runtime_s: float
    records_kept: int = 0
    records_dropped: dict[str, int] = field(default_factory=dict)
    compute_dtype: str = ""


@dataclass
class _Run:
    """Everything the steps share. Built by setup(), advanced by fit(), written by save()."""

    cfg: FinetuneConfig
    output_dir: Path
    base_model: str
    tokenizer: Any
    model: Any
    train_set: Any
    val_set: Any
    collator: InstructionCollator | PackedCollator
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    total_steps: int
    fingerprint: dict[str, Any]
    metrics: MetricsLogger
    report: Any
    dist: Dist
    lora_names: list[str] = field(default_factory=list)  # LoRA parameter names, recorded before any FSDP wrapping
    matmul: str = "blas"  # the CPU fp32 matmul backend (cpu_matmul.resolve_backend)
    scaler: LossScaler = field(default_factory=LossScaler)  # fp16 dynamic loss scaling (disabled otherwise)
    step: int = 0
    tokens_seen: int = 0
    runtime_s: float = 0.0
    last_eval_loss: float | None = None
    recent_losses: list[float] = field(default_factory=list)
    saved_checkpoint: Path | None = None  # the last checkpoint this run wrote


def finetune(
    base_model: str | Path,
    data: Any,
    output_dir: str | Path = "lora-alpaca",
    *,
    config: FinetuneConfig | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune LoRA adapters on a (4-bit) base model and write a self-describing output folder.

    Args:
        base_model: A local model folder or a cached Hub id; ``default_base_model()`` for the
            embedded SmolLM2-135M.
        data: A .json/.jsonl/.csv/.parquet path, a ``datasets.Dataset``/``DatasetDict`` or a list of
            dicts with instruction/input/output (other common column names are mapped).
        output_dir: Where the adapter, its config, template, fingerprints and checkpoints go.
        config: A :class:`FinetuneConfig`; ``overrides`` are applied on top of it.
        **overrides: Any ``FinetuneConfig`` field, e.g. ``num_epochs=1, lora_r=8``.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        ConfigError: An unknown override (with close matches) or an invalid value.
        DataError: Bad data, named by file and record, or no trainable record left.
        ModelError: The base cannot be loaded or a LoRA target matches nothing.
        CheckpointError: Resuming from a checkpoint of a different run, or a checkpoint that
            cannot be written (a full disk); the last good checkpoint is kept.
        TrainingInterrupted: SIGTERM or a first Ctrl-C stopped training at a step boundary; it
            carries the checkpoint saved there (resume with ``resume_from_checkpoint=True``).
        TrainingDiverged: The loss or gradient became NaN or infinite; the bad update was not
            applied and the last good state is in the checkpoint it carries.

    Example:
        >>> from alpaca_lora import finetune, default_base_model
        >>> result = finetune(default_base_model(), "data.json", "out", num_epochs=1)  # doctest: +SKIP

    """
    cfg = resolve_config(config, overrides)
    dist = init_distributed(cfg.device, cfg.ddp_timeout)
    try:
        with dist.guard("setup"):  # one rank failing to load the data or the model stops them all
            run = setup(base_model, data, Path(output_dir), cfg, dist)
        distribute(run)
        try:
            with stop_requests() as stop:  # SIGTERM / first Ctrl-C: checkpoint at the next step boundary
                fit(run, stop)
                try:
                    return save(run)
                except WRITE_ERRORS as exc:
                    raise CheckpointError(
                        f"could not write the trained adapter to {run.output_dir}: "
                        f"{'the disk is full' if disk_full(exc) else exc}; the last checkpoint is "
                        f"{latest_checkpoint(run.output_dir)}. Free space or choose another output_dir (copy the "
                        "checkpoint-N folders there), then resume with resume_from_checkpoint=True") from None
        finally:
            run.metrics.close()
    finally:
        dist.close()


def resolve_config(config: FinetuneConfig | None, overrides: dict[str, Any]) -> FinetuneConfig:
    """Apply ``overrides`` to ``config`` (or the defaults), rejecting unknown names."""
    if config is not None and not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    check_field_names(overrides, "finetune() keyword arguments")
    return (config or FinetuneConfig()).replace(**overrides) if overrides else (config or FinetuneConfig())


# ---- setup ---------------------------------------------------------------------------------------


def setup(base_model: str | Path, data: Any, output_dir: Path, cfg: FinetuneConfig, dist: Dist | None = None) -> _Run:
    """Validate and tokenize the data, then load the model, attach LoRA and build the optimizer.

    ``dist`` is this process's place in a multi-process run (see :mod:`alpaca_lora.train.distributed`);
    None trains in one process. Local work only: no collective runs here.
    """
    dist = dist or init_distributed(cfg.device, cfg.ddp_timeout, environ={})
    if fsdp_requested() and not cfg.fsdp:
        cfg = cfg.replace(fsdp=True)  # accelerate launch --config_file <an FSDP config>
    check_world_size(dist, cfg.batch_size, cfg.micro_batch_size)
    if cfg.fsdp and cfg.resume_from_checkpoint:
        raise ConfigError("resume_from_checkpoint with fsdp=True: FSDP runs write no resumable checkpoints yet; "
                          "start without resume_from_checkpoint, or resume without FSDP")
    check_output_dir(output_dir)  # a bad output_dir fails now, not after the model has loaded
    _seed_everything(cfg.seed)
    template = get_template(cfg.template)
    device = dist.device
    dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    if cfg.release_cpu_memory and device.type == "cpu":
        release_freed_memory_to_os()
    # Data first: bad data fails before any model is loaded (DESIGN mistake 4).
    records = load_instructions(data, column_map=cfg.column_map, skip_bad_records=cfg.skip_bad_records)
    train_raw, val_raw = split_dataset(records, cfg.val_set_size, cfg.seed)
    tokenizer = load_tokenizer(base_model)
    kwargs = dict(template=template, cutoff_len=cfg.cutoff_len, train_on_inputs=cfg.train_on_inputs,
                  add_eos_token=cfg.add_eos_token)
    train_set, report = prepare_dataset(train_raw, tokenizer, **kwargs)
    val_set = prepare_dataset(val_raw, tokenizer, desc="tokenize eval", **kwargs)[0] if val_raw else None
    logger.info("data: %s", report.summary())

    model, _ = load_model(base_model, cfg.quantization, cfg.compute_dtype, device=str(device),
                          quant_storage="compute" if cfg.fsdp else None)
    # from_pretrained returns the model in eval mode; a no-grad forward of a 4-bit layer in eval mode
    # repacks its weights for CPU inference, after which it no longer back-propagates (see evaluate()).
    model = attach_lora(model, cfg).train()
    matmul = "blas" if cfg.fsdp else resolve_backend(cfg.cpu_matmul, device, dtype)
    if matmul == "onednn":
        from alpaca_lora.kernels.cpu_linear4bit import use_onednn_4bit_layers

        logger.info("CPU fp32 matmul through oneDNN in %d 4-bit layers and the lm_head", use_onednn_4bit_layers(model))
    n_trainable, total = trainable_parameters(model)
    logger.info("trainable parameters: %d of %d (%.3f%%)", n_trainable, total, 100 * n_trainable / total)
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]

    per_epoch = steps_per_epoch(len(train_set), cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * per_epoch))
    if dist.is_main:
        logger.info(preflight_summary(base_model, cfg, model, report, val_records=len(val_set or []),
                                      total_steps=total_steps, device=device, dtype=dtype))
    optimizer, scheduler = build_optimizer(cfg, trainable(model), total_steps)

    output_dir.mkdir(parents=True, exist_ok=True)
    for junk in remove_incomplete(output_dir):  # left by a save that was killed
        logger.info("removed %s, an incomplete checkpoint of an earlier run", junk)
    fingerprint = {"base_model": base_fingerprint(base_model),
                   "data": data_fingerprint(records, source=data if isinstance(data, (str, Path)) else None)}
    run = _Run(cfg=cfg, output_dir=output_dir, base_model=str(base_model), tokenizer=tokenizer, model=model,
               train_set=train_set, val_set=val_set, collator=_collator(cfg, tokenizer, model, dtype),
               optimizer=optimizer,
               scheduler=scheduler, device=device, dtype=dtype, total_steps=total_steps, fingerprint=fingerprint,
               metrics=None, report=report, dist=dist, lora_names=lora_names, matmul=matmul,  # type: ignore[arg-type]
               scaler=LossScaler(enabled=dtype == torch.float16 and cfg.loss_scaling))
    resumed_at = maybe_resume(run)
    run.metrics = MetricsLogger(output_dir / art.METRICS_FILE, cfg.report_to, output_dir, cfg.to_dict(),
                                keep_until_step=resumed_at, write=dist.is_main)
    return run


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


def _collator(cfg: FinetuneConfig, tokenizer: Any, model: Any, dtype: torch.dtype) -> Any:
    if cfg.packing and not cfg.fsdp:  # the FSDP forward takes no packing keywords
        use_packed_attention(model)
        return PackedCollator(attention_kind(model), dtype)
    return InstructionCollator(tokenizer)


def distribute(run: _Run) -> None:
    """Make the ranks agree: rank 0's initial LoRA weights everywhere, then FSDP sharding if asked.

    Under FSDP the optimizer is rebuilt over the sharded parameters (nothing is lost: FSDP runs
    do not resume). A no-op in a single process.
    """
    run.dist.broadcast_parameters(trainable(run.model))
    if run.cfg.fsdp:
        run.model = wrap_fsdp(run.model, run.dist)
        run.optimizer, run.scheduler = build_optimizer(run.cfg, trainable(run.model), run.total_steps)


# ---- fit -------------------------------------------------------------------------------------------


def fit(run: _Run, stop: StopRequest | None = None) -> None:
    """Run the training loop from ``run.step`` to ``run.total_steps``, evaluating and checkpointing.

    Args:
        run: The run built by :func:`setup`.
        stop: Polled after every step; once set, a checkpoint is saved and TrainingInterrupted raised.

    """
    cfg = run.cfg
    lengths = list(run.train_set["length"])
    per_epoch = steps_per_epoch(len(lengths), cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    bar = tqdm(total=run.total_steps, initial=run.step, desc="finetune", unit="step", dynamic_ncols=True,
               disable=not run.dist.is_main)
    epoch_cache: dict[int, list[list[int]]] = {}
    start = time.perf_counter()
    while run.step < run.total_steps:
        epoch, k = divmod(run.step, per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: epoch_batches(lengths, cfg.micro_batch_size, cfg.seed, epoch, cfg.group_by_length)}
        accum = cfg.gradient_accumulation_steps
        rng, tokens_before = capture_rng(), run.tokens_seen
        loss, grad_norm, broken = train_step(run, epoch_cache[epoch][k * accum : (k + 1) * accum])
        if broken:  # the update made weights NaN/inf: nothing of this state may be saved or called good
            bar.close()
            stop_broken_weights(run, loss, grad_norm, broken)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))  # train_step did not apply it
        if skipped:
            run.tokens_seen = tokens_before
            if not (math.isfinite(loss) and run.scaler.enabled and not run.scaler.exhausted()):
                bar.close()
                stop_diverged(run, loss, grad_norm, rng)
            # else an fp16 overflow of the scaled gradients: the scale was halved, the next step retries
        run.step += 1
        run.recent_losses = (run.recent_losses + [loss])[-max(1, cfg.logging_steps):]
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        epoch_end = run.step % per_epoch == 0 or run.step == run.total_steps
        if run.step % cfg.logging_steps == 0 or run.step == run.total_steps or skipped:
            record = {"step": run.step, "epoch": round(run.step / per_epoch, 4), "loss": loss,
                      "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_seen": run.tokens_seen, "elapsed_s": round(time.perf_counter() - start, 3)}
            if run.scaler.enabled:
                record.update(loss_scale=run.scaler.scale, skipped=skipped)
            run.metrics.log(record)
        if run.val_set is not None and (run.step % cfg.eval_steps == 0 if cfg.eval_steps else epoch_end):
            run.last_eval_loss = evaluate(run)
            run.metrics.log({"step": run.step, "eval_loss": run.last_eval_loss})
        if (run.step % cfg.save_steps == 0 if cfg.save_steps else epoch_end) and run.step < run.total_steps:
            save_run_checkpoint(run)
        if stop is not None and stop.aborted:
            raise KeyboardInterrupt  # a second Ctrl-C whose exception Python dropped
        signaled = stop is not None and run.dist.sum([float(stop.signal is not None)])[0] > 0
        if signaled and run.step < run.total_steps:
            bar.close()
            stop_interrupted(run, stop)
    bar.close()
    run.runtime_s = time.perf_counter() - start


def train_step(run: _Run, micro_batches: list[list[int]]) -> tuple[float, float, list[str]]:
    """One optimizer step over ``micro_batches`` (the step's global list).

    Returns ``(mean token loss, grad norm, names of LoRA weights the update made non-finite)``; the
    last is empty unless a finite gradient still pushed a weight to NaN or infinity (an absurd
    learning rate or weight decay), which the caller must treat as a divergence with no good state
    in memory.

    With several processes each rank trains on its share of ``micro_batches`` and the gradients
    are summed over ranks, so every rank ends the step with the single-process gradient. A
    non-finite loss or gradient norm is returned without updating anything (weights, optimizer
    moments, scheduler), so the model stays at its last good state. In fp16 the loss is multiplied
    by the loss scale before ``backward`` and the gradients divided by it before clipping; an
    overflow there (a finite loss with a non-finite norm) halves the scale (:mod:`alpaca_lora.train.loss_scale`).
    """
    model, cfg, dist = run.model, run.cfg, run.dist
    model.train()
    with dist.guard(f"training step {run.step + 1}"):
        passes = global_step_shard(dist, micro_batches, pad=cfg.fsdp)
        batches = [(run.collator([run.train_set[i] for i in idx]), counts) for idx, counts in passes]
        local = [sum(int((b["labels"][:, 1:] != -100).sum()) for b, c in batches if c),
                 sum(batch_tokens(b) for b, c in batches if c)]
    # Normalise by the label tokens of the whole step on all ranks, so every token weighs the same
    # however the step is cut into micro-batches and ranks (a mean of per-batch means would not).
    n_tokens, n_seen = dist.sum(local)
    # FSDP averages gradients over ranks; divide by n_tokens / world_size so the result is their sum.
    denominator = max(1.0, n_tokens) / (dist.world_size if cfg.fsdp else 1)
    total, scale = 0.0, run.scaler.scale  # scale is 1.0 (an exact no-op) unless fp16 loss scaling is on
    with dist.guard(f"training step {run.step + 1}"):
        for batch, counts in batches:
            loss_sum = _loss_sum(run, batch)
            (loss_sum * scale / denominator if counts else loss_sum * 0.0).backward()
            total += float(loss_sum.detach()) if counts else 0.0
    params = trainable(model)
    (total,) = dist.sum([total])
    if not cfg.fsdp:
        dist.sum_gradients(params)
    run.scaler.unscale(params)
    norm = clip_grad_norm(model, params, cfg.max_grad_norm, cfg.fsdp)
    loss, grad_norm = total / max(1.0, n_tokens), float(norm)
    broken: list[str] = []
    if math.isfinite(loss) and math.isfinite(grad_norm):
        run.optimizer.step()
        run.scheduler.step()
        broken = non_finite_weights(run)
    run.scaler.update(overflow=math.isfinite(loss) and not math.isfinite(grad_norm))
    run.optimizer.zero_grad(set_to_none=True)
    run.tokens_seen += int(n_seen)
    return loss, grad_norm, broken


def non_finite_weights(run: _Run) -> list[str]:
    """Names of the trainable weights holding a NaN or an infinity after an update (empty when all are finite).

    One flag per tensor and a single host sync; names are looked up only on the rare bad path. Under
    FSDP each rank holds a shard, so the ranks add their verdicts; otherwise every rank holds the same
    weights and no collective is needed.
    """
    params = trainable(run.model)
    bad = float(torch.stack([torch.isfinite(p).all().logical_not() for p in params]).any()) if params else 0.0
    if run.cfg.fsdp:
        (bad,) = run.dist.sum([bad])
    if not bad:
        return []
    names = [n for n, p in run.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    return names or ["(a weight shard of another process)"]


def _loss_sum(run: _Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of token losses of one micro-batch (FSDP must go through the wrapped model's forward)."""
    if not run.cfg.fsdp:
        return batch_loss(run, batch)[0]
    batch = {k: v.to(run.device) for k, v in batch.items()}
    with _autocast(run):
        return forward_losses_sum(run.model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]


@torch.no_grad()
def evaluate(run: _Run) -> float:
    """Mean token loss over the validation split (batches sorted by length, no dropout, shared by the ranks).

    Only the dropout layers are switched to eval mode. ``model.eval()`` would also put the
    bitsandbytes 4-bit layers in inference mode, and on the CPU their first inference forward
    repacks the 4-bit weights in place: later training forwards then read them wrongly (logits off
    by ~0.8 on SmolLM2-135M, and the loss climbs after the first evaluation).
    """
    dropouts = [m for m in run.model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    lengths = list(run.val_set["length"])
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    size = run.cfg.micro_batch_size
    total, n = 0.0, 0
    with run.dist.guard("evaluation"):
        for idx, counts in global_step_shard(run.dist, [order[s : s + size] for s in range(0, len(order), size)],
                                             pad=run.cfg.fsdp):
            batch = run.collator([run.val_set[i] for i in idx])
            s = _loss_sum(run, batch)
            k = int((batch["labels"][:, 1:] != -100).sum())
            total, n = (total + float(s), n + k) if counts else (total, n)
    for m in dropouts:
        m.train()
    total, n = run.dist.sum([total, n])
    return total / max(1.0, n)


def batch_loss(run: _Run, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token losses over the label positions of one collated (padded or packed) batch."""
    batch = {k: v.to(run.device) for k, v in batch.items()}
    with _autocast(run):
        return token_losses_sum(run.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                chunk_size=run.cfg.loss_chunk_size, onednn=run.matmul == "onednn",
                                **body_kwargs(batch))


def _autocast(run: _Run) -> Any:
    if run.dtype == torch.float32:
        return torch.autocast(run.device.type, enabled=False)
    return torch.autocast(run.device.type, dtype=run.dtype)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- save ------------------------------------------------------------------------------------------


def save(run: _Run) -> FinetuneResult:
    """Write the adapter and everything needed to merge, generate or resume, and return the result.

    Every rank evaluates and returns the result; only rank 0 writes files.
    """
    out = run.output_dir
    eval_loss = run.last_eval_loss
    if run.val_set is not None and not any("eval_loss" in r and r["step"] == run.step for r in run.metrics.records):
        eval_loss = evaluate(run)
        run.metrics.log({"step": run.step, "eval_loss": eval_loss})
    train_loss = float(np.mean(run.recent_losses)) if run.recent_losses else float("nan")
    result = FinetuneResult(adapter_dir=out, train_loss=train_loss, eval_loss=eval_loss, steps=run.step,
                            tokens_seen=run.tokens_seen, runtime_s=run.runtime_s, records_kept=run.report.kept,
                            records_dropped=dict(run.report.drop_reasons),
                            compute_dtype=str(run.dtype).removeprefix("torch."))
    state = full_state_dict(run.model) if run.cfg.fsdp else None  # a collective: all ranks gather
    with run.dist.guard("save"):
        if run.dist.is_main:
            if state is not None:
                save_fsdp_adapter(run.model.module, state, run.lora_names, out)
            else:
                run.model.save_pretrained(out, safe_serialization=True)
            _check_adapter(out, len(run.lora_names))
            run.tokenizer.save_pretrained(out)
            get_template(run.cfg.template).save(out / art.TEMPLATE_FILE)
            run.cfg.save(out / art.CONFIG_FILE)
            art.write_json(out / art.FINGERPRINT_FILE, run.fingerprint)
            art.write_json(out / art.RESULTS_FILE, {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in result.__dict__.items()})
            plot_losses(run.metrics.records, out / art.PLOT_FILE)
    return result


def _check_adapter(folder: Path, expected: int) -> None:
    """Refuse to finish with an empty adapter file (the failure of tloen/alpaca-lora#293)."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / art.ADAPTER_WEIGHTS))
    if not saved or len(saved) != expected:
        raise ModelError(f"{folder / art.ADAPTER_WEIGHTS} holds {len(saved)} tensors, expected {expected}; "
                         "the adapter was not saved correctly, please report this with your peft version")
    bad = non_finite(saved)
    if bad:  # every step checks its weights, so this is a last line of defence, never a normal outcome
        (folder / art.ADAPTER_WEIGHTS).unlink()
        raise ModelError(f"the trained adapter holds NaN or infinite values ({bad[:3]}...), so it was not kept; "
                         f"resume from the last checkpoint in {folder} with a lower learning_rate")


