"""finetune(): one call from a model and a data set to a self-describing adapter folder.

The recipe is three steps: :func:`~alpaca_lora.train.setup.setup` (settings, data, model,
optimizer), :func:`fit` (the training loop, one optimizer step per iteration, read top to bottom)
and :func:`save` (the output folder).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.data.labels import record_label_tokens
from alpaca_lora.data.pipeline import column
from alpaca_lora.data.prompts import get_template
from alpaca_lora.data.sampler import epoch_batches, steps_per_epoch
from alpaca_lora.errors import CheckpointError, ModelError
from alpaca_lora.export import layout as art
from alpaca_lora.export.chat_template import check_saved_chat_template
from alpaca_lora.files import non_finite
from alpaca_lora.kernels.cpu_memory import restore_memory_settings
from alpaca_lora.kernels.modes import dropout_disabled
from alpaca_lora.model.lora_init import to_plain_lora
from alpaca_lora.train import stops
from alpaca_lora.train.checkpoint import WRITE_ERRORS, capture_rng, disk_full, latest_checkpoint, save_run_checkpoint
from alpaca_lora.train.distributed import init_distributed
from alpaca_lora.train.generation_eval import GENERATION_KEYS, generation_sample, generation_scores
from alpaca_lora.train.interrupt import StopRequest, stop_requests
from alpaca_lora.train.metrics import plot_losses
from alpaca_lora.train.setup import resolve_config, setup
from alpaca_lora.train.state import Run
from alpaca_lora.train.strategy import quiet_replica, trainable


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
        eval_scores: With ``eval_generate_samples``: the last evaluation's generation metrics
            (``eval_exact_match``, ``eval_bleu``, ``eval_rouge_l``, ``eval_chrf``); empty otherwise.

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
    eval_scores: dict[str, float] = field(default_factory=dict)


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
        with quiet_replica(dist):
            with dist.guard("setup"):  # one rank failing to load the data or the model stops them all
                run = setup(base_model, data, Path(output_dir), cfg, dist)
            try:
                with stop_requests() as stop:  # SIGTERM / first Ctrl-C: checkpoint at the next step boundary
                    fit(run, stop)
                    return save(run)
            finally:
                run.metrics.close()
    finally:
        if cfg.release_cpu_memory and dist.device.type == "cpu":
            restore_memory_settings()  # glibc's own thresholds again, for whatever the process does next
        dist.close()


def fit(run: Run, stop: StopRequest | None = None) -> None:
    """Train from ``run.state.step`` to ``run.total_steps``, logging, evaluating and checkpointing.

    Each iteration is one optimizer step over ``gradient_accumulation_steps`` micro-batches: every
    micro-batch's summed token loss is divided by the label tokens of the whole step (known from the
    records before any forward), so every token weighs the same however the step is cut into
    micro-batches and processes. A step whose loss or gradient is not finite is not applied.

    Args:
        run: The run built by :func:`~alpaca_lora.train.setup.setup`.
        stop: Asked after every step; once set, a checkpoint is saved and TrainingInterrupted raised.

    Raises:
        TrainingDiverged: A non-finite loss or gradient (the last good state is checkpointed), or
            an update that made weights non-finite (nothing of it is saved).
        TrainingInterrupted: ``stop`` was set; the checkpoint of this step boundary is saved.

    """
    cfg, state, strategy, model = run.cfg, run.state, run.strategy, run.model
    lengths = column(run.train_set, "length")  # (N,) int32: no per-record Python objects
    per_epoch = steps_per_epoch(len(lengths), cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    accum = cfg.gradient_accumulation_steps
    bar = tqdm(total=run.total_steps, initial=state.step, desc="finetune", unit="step", dynamic_ncols=True,
               disable=not strategy.is_main)
    order: dict[int, list[list[int]]] = {}
    sample = _generation_sample(run)  # the same validation records at every evaluation
    start = time.perf_counter()
    while state.step < run.total_steps:
        epoch, k = divmod(state.step, per_epoch)
        if epoch not in order:
            order = {epoch: epoch_batches(lengths, cfg.micro_batch_size, cfg.seed, epoch, cfg.group_by_length)}
        micro_batches = order[epoch][k * accum : (k + 1) * accum]  # the step's, the same on every process
        rng = capture_rng()  # restored with the last good state if this step diverges

        # 1. Every process counts the step's label tokens from the records, then runs its micro-batches:
        #    collate -> forward -> backward of the summed loss over that count.
        records = {i: run.train_set[i] for batch in micro_batches for i in batch}
        label_tokens = sum(record_label_tokens(records[i]["labels"]) for i in records)
        divisor = strategy.loss_divisor(label_tokens)
        scale = run.scaler.scale  # 1.0, an exact no-op, unless fp16 loss scaling is on
        model.train()
        local_loss = 0.0
        with strategy.guard(f"training step {state.step + 1}"):
            for indices, counts in strategy.shard(micro_batches):
                loss_sum = micro_batch_loss(run, run.collator([records[i] for i in indices]))[0]
                (loss_sum * scale / divisor if counts else loss_sum * 0.0).backward()
                local_loss += float(loss_sum.detach()) if counts else 0.0

        # 2. One small all-reduce: the step's summed loss, and whether any process was asked to stop.
        loss_total, stop_votes = strategy.reduce([local_loss, float(stop is not None and stop.signal is not None)])
        loss = loss_total / max(1, label_tokens)

        # 3. The gradient of the whole step on every process, unscaled (fp16) and clipped.
        params = trainable(model)
        strategy.sync_gradients(params)
        run.scaler.unscale(params)
        grad_norm = strategy.clip(model, params, cfg.max_grad_norm)

        # 4. Apply the update only when the loss and the gradient are finite.
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        broken: list[str] = []
        if applied:
            run.optimizer.step()
            run.scheduler.step()
            broken = strategy.non_finite_weights(model)
        run.scaler.update(overflow=math.isfinite(loss) and not math.isfinite(grad_norm))
        run.optimizer.zero_grad(set_to_none=True)
        if broken:  # the weights in memory are damaged: nothing of this state may be saved
            bar.close()
            run.metrics.log({"step": state.step + 1, "loss": loss, "grad_norm": grad_norm, "diverged": True,
                             "non_finite_weights": len(broken)})
            raise stops.broken_weights(run, loss, grad_norm, broken, latest_checkpoint(run.output_dir))
        if not applied and not (math.isfinite(loss) and run.scaler.enabled and not run.scaler.exhausted()):
            bar.close()  # diverged; only an fp16 overflow of the scaled gradients retries with half the scale
            run.metrics.log({"step": state.step + 1, "loss": loss, "grad_norm": grad_norm, "diverged": True})
            folder = state.saved_checkpoint
            if state.step > 0 and (folder is None or folder.name != f"checkpoint-{state.step}"):
                folder = save_run_checkpoint(run, rng)
            raise stops.diverged(run, loss, grad_norm, folder)

        # 5. Book-keeping: progress, metrics, evaluation, checkpoints, a requested stop.
        state.step += 1
        if applied:
            state.tokens_seen += int(sum(int(lengths[i]) for i in records))
        state.recent_losses = (state.recent_losses + [loss])[-max(1, cfg.logging_steps):]
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        epoch_end = state.step % per_epoch == 0 or state.step == run.total_steps
        if state.step % cfg.logging_steps == 0 or state.step == run.total_steps or not applied:
            record = {"step": state.step, "epoch": round(state.step / per_epoch, 4), "loss": loss,
                      "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_seen": state.tokens_seen, "elapsed_s": round(time.perf_counter() - start, 3)}
            if run.scaler.enabled:
                record.update(loss_scale=run.scaler.scale, skipped=not applied)
            run.metrics.log(record)
        if run.val_set is not None and (state.step % cfg.eval_steps == 0 if cfg.eval_steps else epoch_end):
            evaluate_and_log(run, sample)
        if (state.step % cfg.save_steps == 0 if cfg.save_steps else epoch_end) and state.step < run.total_steps:
            save_run_checkpoint(run)
        if stop is not None and stop.aborted:
            raise KeyboardInterrupt  # a second Ctrl-C whose exception Python dropped
        if stop_votes > 0 and state.step < run.total_steps:
            bar.close()
            folder = state.saved_checkpoint
            if folder is None or folder.name != f"checkpoint-{state.step}":
                folder = save_run_checkpoint(run)
            raise stops.interrupted(run, (stop.signal if stop else None) or signal.SIGTERM, folder)
    bar.close()
    state.runtime_s = time.perf_counter() - start


def micro_batch_loss(run: Run, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed token loss and label-token count of one collated (padded or packed) micro-batch."""
    batch = {k: v.to(run.device) for k, v in batch.items()}
    with autocast(run.device, run.dtype):
        return run.loss_sum(run.model, batch)


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Mixed precision in ``dtype`` on ``device``; plain fp32 (autocast off) for float32."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate_and_log(run: Run, sample: list[tuple[list[int], str]]) -> None:
    """Evaluate the loss (and, with a sample, the generation metrics) and log them as one record."""
    run.state.last_eval_loss = evaluate(run)
    record: dict[str, Any] = {"step": run.state.step, "eval_loss": run.state.last_eval_loss}
    if sample:
        record.update(generation_scores(run, sample))
    run.metrics.log(record)


def _generation_sample(run: Run) -> list[tuple[list[int], str]]:
    n = run.cfg.eval_generate_samples
    return generation_sample(run.val_set, n, run.tokenizer) if n and run.val_set is not None else []


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean token loss over the validation split (batches sorted by length, dropout off, shared by the processes)."""
    order = np.argsort(column(run.val_set, "length"), kind="stable").tolist()
    size = run.cfg.micro_batch_size
    total, n = 0.0, 0
    with dropout_disabled(run.model), run.strategy.guard("evaluation"):
        for idx, counts in run.strategy.shard([order[s : s + size] for s in range(0, len(order), size)]):
            s, k = micro_batch_loss(run, run.collator([run.val_set[i] for i in idx]))
            if counts:
                total, n = total + float(s), n + k
    total, n = run.strategy.reduce([total, n])
    return total / max(1.0, n)


def save(run: Run) -> FinetuneResult:
    """Write the adapter and everything needed to merge, generate or resume, and return the result.

    Every process evaluates and returns the result; only rank 0 writes files.

    Raises:
        CheckpointError: The output folder cannot be written (a full disk); the last checkpoint is named.

    """
    out, state = run.output_dir, run.state
    if run.val_set is not None and not any("eval_loss" in r and r["step"] == state.step for r in run.metrics.records):
        evaluate_and_log(run, _generation_sample(run))
    eval_loss = state.last_eval_loss
    scored = [r for r in run.metrics.records if GENERATION_KEYS[0] in r]
    result = FinetuneResult(
        adapter_dir=out, train_loss=float(np.mean(state.recent_losses)) if state.recent_losses else float("nan"),
        eval_loss=eval_loss, steps=state.step, tokens_seen=state.tokens_seen, runtime_s=state.runtime_s,
        records_kept=run.report.kept, records_dropped=dict(run.report.drop_reasons),
        compute_dtype=str(run.dtype).removeprefix("torch."),
        eval_scores={k: scored[-1][k] for k in GENERATION_KEYS if k in scored[-1]} if scored else {})
    write_adapter = run.strategy.gather_adapter(run.model, run.lora_names)  # a collective under FSDP
    try:
        with run.strategy.guard("save"):
            if run.strategy.is_main:
                write_adapter(out)
                _check_adapter(out, len(run.lora_names) + _token_tensors(run.model))
                if run.initial_lora is not None:  # PiSSA / OLoRA: a plain LoRA on the original base
                    to_plain_lora(out / art.ADAPTER_WEIGHTS, out / art.ADAPTER_CONFIG, run.initial_lora)
                run.tokenizer.save_pretrained(out)  # with run.chat_template as its chat template
                if run.chat_sample is not None:
                    check_saved_chat_template(out, *run.chat_sample)
                if run.data_format == "alpaca":
                    get_template(run.cfg.template).save(out / art.TEMPLATE_FILE)
                run.cfg.save(out / art.CONFIG_FILE)
                art.write_json(out / art.FINGERPRINT_FILE, run.fingerprint)
                art.write_json(out / art.RESULTS_FILE, {k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in result.__dict__.items()})
                plot_losses(run.metrics.records, out / art.PLOT_FILE)
    except WRITE_ERRORS as exc:
        raise CheckpointError(
            f"could not write the trained adapter to {out}: {'the disk is full' if disk_full(exc) else exc}; "
            f"the last checkpoint is {latest_checkpoint(out)}. Free space or choose another output_dir (copy the "
            "checkpoint-N folders there), then resume with resume_from_checkpoint=True") from None
    return result


def _token_tensors(model: Any) -> int:
    """How many new-token tensors the adapter file holds: rows (trainable tokens) or whole layers (modules_to_save)."""
    from peft import get_peft_model_state_dict

    if not any("trainable_tokens_delta" in n or "modules_to_save" in n for n, _ in model.named_parameters()):
        return 0
    return sum("lora_" not in k for k in get_peft_model_state_dict(model, save_embedding_layers=False))


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
