"""Resumable checkpoints in safetensors + JSON: adapter, optimizer, scheduler, RNG and data position.

A checkpoint is written into a hidden temporary folder beside its final place, flushed to disk and
renamed into place only when complete, so a crash, a kill or a full disk mid-save leaves the
previous checkpoint intact. A folder is removed by first renaming it to a hidden name, so a kill
mid-removal never leaves a half-deleted folder that looks complete. Older checkpoints are removed
only after the new one is in place. Hidden leftovers of a killed save are ignored by
:func:`list_checkpoints` and deleted by :func:`remove_incomplete`. Nothing is pickled.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.errors import CheckpointError, shown
from alpaca_lora.export.fingerprint import fingerprints_match
from alpaca_lora.export.layout import ADAPTER_WEIGHTS, CHECKPOINT_PREFIX, write_json
from alpaca_lora.files import load_safetensors, non_finite, read_json
from alpaca_lora.train.checkpoint_state import (
    OPTIMIZER_META,
    RNG_META,
    RNG_TENSORS,
    RngState,
    capture_rng,
    check_rng_state,
    checked_optimizer_state,
    checked_scheduler_state,
    flatten_optimizer,
    jsonable,
    restore_rng,
)

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
OPTIMIZER_TENSORS = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
_TMP_TAG = ".tmp-"  # .checkpoint-N.tmp-XXXX: being written
_OLD_TAG = ".old-"  # .checkpoint-N.old-XXXX: being removed

if TYPE_CHECKING:
    from alpaca_lora.train.loss_scale import LossScaler
    from alpaca_lora.train.state import Run

logger = logging.getLogger(__name__)
WRITE_ERRORS = (OSError, SafetensorError)  # what a failed write raises


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Return the complete checkpoints in ``output_dir``, oldest first."""
    found = []
    for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = p.name[len(CHECKPOINT_PREFIX) :]
        if p.is_dir() and suffix.isdigit() and (p / STATE_FILE).is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """Return the newest complete checkpoint in ``output_dir``, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete the hidden folders a killed save or removal left in ``output_dir``; return them.

    Only this process may write checkpoints into ``output_dir`` while it trains, so any such
    folder found at the start of a run is junk.
    """
    junk = [p for p in Path(output_dir).glob(f".{CHECKPOINT_PREFIX}*")
            if p.is_dir() and (_TMP_TAG in p.name or _OLD_TAG in p.name)]
    for p in junk:
        shutil.rmtree(p, ignore_errors=True)
    return junk


def save_checkpoint(
    output_dir: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
    state: dict[str, Any], keep: int, rng: RngState | None = None,
) -> Path:
    """Write ``checkpoint-{step}`` atomically, then rotate old ones so ``keep`` remain.

    Args:
        output_dir: The run folder.
        step: Optimizer steps completed.
        model: The peft model (only adapter weights are saved, with its ``save_pretrained``).
        optimizer: The optimizer; its tensors go to safetensors, the rest to JSON.
        scheduler: A ``torch.optim.lr_scheduler`` object.
        state: Trainer state (step, tokens seen, fingerprints, ...), JSON-serialisable.
        keep: Number of newest checkpoints to keep.
        rng: RNG state to record, from :func:`capture_rng`; None records the current state.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: A write failed (a full disk, no permission, ...); the message names the
            folder and the fix, the temporary folder is removed and earlier checkpoints are kept.

    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tensors, meta = flatten_optimizer(optimizer.state_dict())
    bad = non_finite({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}) + non_finite(tensors)
    if bad:  # training stops before this can happen; a checkpoint must never hold a state that is not good
        raise CheckpointError(f"refusing to write {final}: {', '.join(bad[:3])} hold NaN or infinite values; "
                              f"the last good checkpoint is {latest_checkpoint(output_dir)}")
    rng_tensors, rng_meta = rng if rng is not None else capture_rng()
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_TAG}", dir=output_dir))
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        write_json(tmp / OPTIMIZER_META, meta)
        write_json(tmp / SCHEDULER_FILE, jsonable(scheduler.state_dict()))
        save_file(rng_tensors, str(tmp / RNG_TENSORS))
        write_json(tmp / RNG_META, rng_meta)
        write_json(tmp / STATE_FILE, state)
        _fsync_tree(tmp)
        if final.exists():
            _discard(final)
        tmp.rename(final)
        _fsync_dir(output_dir)
    except WRITE_ERRORS as exc:  # safetensors reports a full disk as SafetensorError, not OSError
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(final, exc, latest_checkpoint(output_dir))) from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        _discard(old)
    return final


def disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (an OSError or a SafetensorError) says the disk or quota is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left" in str(exc) or "os error 28" in str(exc)


def _write_failure(final: Path, exc: BaseException, previous: Path | None) -> str:
    cause = "the disk is full" if disk_full(exc) else (getattr(exc, "strerror", None) or str(exc))
    kept = f"the last good checkpoint, {previous}, is kept" if previous else "no earlier checkpoint exists"
    return (f"could not write checkpoint {final}: {cause}; {kept}. Free space in {final.parent} or choose "
            "another output_dir (copy the checkpoint-N folders there), then resume with resume_from_checkpoint=True")


def _discard(folder: Path) -> None:
    """Remove ``folder``: rename it to a hidden name first (atomic), then delete its files."""
    trash = folder.with_name(f".{folder.name}{_OLD_TAG}{os.getpid()}")
    try:
        folder.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself, so a power loss cannot reorder the rename."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows; NTFS journals the rename itself
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_state(folder: Path) -> dict[str, Any]:
    """Read and check ``trainer_state.json`` of a checkpoint (a CheckpointError naming the file if damaged)."""
    path = Path(folder) / STATE_FILE
    fix = "resume from an earlier checkpoint-N folder or start again"
    state = read_json(path, error=CheckpointError, fix=fix)
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: step={shown(step, 40)} is not a step count; the file is damaged, {fix}")
    for key in ("config", "fingerprint", "loss_scale"):
        if key in state and not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: {key!r} is {shown(state[key], 40)}, not a JSON object; the file is "
                                  f"damaged, {fix}")
    return state


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG state from ``folder``; return its trainer state.

    Every file is checked before anything is restored: a damaged, hand-edited or non-finite
    checkpoint leaves the model, optimizer and scheduler as they were.

    Raises:
        CheckpointError: ``folder`` is incomplete, damaged, holds NaN/infinite values or state that
            does not fit this model, optimizer or scheduler.

    """
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {STATE_FILE}); pick another one")
    fix = "resume from an earlier checkpoint-N folder or start again"
    state = read_state(folder)
    weights = load_safetensors(folder / ADAPTER_WEIGHTS, error=CheckpointError)
    moments = load_safetensors(folder / OPTIMIZER_TENSORS, error=CheckpointError)
    meta = read_json(folder / OPTIMIZER_META, error=CheckpointError, fix=fix)
    scheduler_state = read_json(folder / SCHEDULER_FILE, error=CheckpointError, fix=fix)
    rng = load_safetensors(folder / RNG_TENSORS, error=CheckpointError), read_json(folder / RNG_META,
                                                                                   error=CheckpointError, fix=fix)
    bad = non_finite(weights) + non_finite(moments)
    if bad:
        raise CheckpointError(f"checkpoint {folder} holds NaN or infinite values ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}): it is not a good state; {fix}")
    optimizer_state = checked_optimizer_state(folder, moments, meta, optimizer)
    scheduler_state = checked_scheduler_state(folder, scheduler_state, scheduler)
    check_rng_state(folder, *rng)
    current = {k: v.detach().clone() for k, v in get_adapter_state(model).items()}
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # a tensor of another shape than the model's
        set_peft_model_state_dict(model, current)
        raise CheckpointError(f"checkpoint {folder} holds adapter weights that do not fit this model "
                              f"({shown(str(exc), 300)}); resume with the same lora_r and targets") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        set_peft_model_state_dict(model, current)
        raise CheckpointError(f"checkpoint {folder} holds adapter weights this model lacks: {unexpected[:5]}")
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    restore_rng(*rng)
    return state


def get_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft model, as ``set_peft_model_state_dict`` takes them back."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)  # new tokens: their rows, not the matrices


# ---- a run's checkpoints: write one, resume from one -------------------------------------------

# Fields that may change between a checkpoint and its resume without changing what was trained.
RESUMABLE_CHANGES = {"num_epochs", "max_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                     "resume_from_checkpoint", "report_to", "device", "packing",
                     "release_cpu_memory", "ddp_timeout", "cpu_matmul", "data_cache_dir", "data_num_proc"}


def save_run_checkpoint(run: Run, rng: RngState | None = None) -> Path | None:
    """Write ``checkpoint-N`` of ``run`` on rank 0 (every rank resumes from it); None where none can be written.

    Args:
        run: The run; its state gives N.
        rng: The random-number state to record (from before a step that is being undone); None for now's.

    """
    if not run.strategy.writes_checkpoints:
        logger.warning("step %d: no checkpoint written, %s runs do not write resumable checkpoints yet",
                       run.state.step, run.strategy.name.upper())
        return None
    state = {"step": run.state.step, "tokens_seen": run.state.tokens_seen, "total_steps": run.total_steps,
             "config": run.cfg.to_dict(), "fingerprint": run.fingerprint, "loss_scale": run.scaler.state_dict()}
    folder = None
    with run.strategy.guard(f"checkpoint at step {run.state.step}"):
        if run.strategy.is_main:
            folder = save_checkpoint(run.output_dir, run.state.step, run.model, run.optimizer, run.scheduler, state,
                                     keep=run.cfg.save_total_limit, rng=rng)
    run.state.saved_checkpoint = folder
    return folder


def resume(cfg: FinetuneConfig, output_dir: Path, fingerprint: dict[str, Any], model: Any,
           optimizer: torch.optim.Optimizer, scheduler: Any, scaler: LossScaler) -> int | None:
    """Restore the checkpoint ``cfg.resume_from_checkpoint`` names; return its step, or None without one.

    Raises:
        CheckpointError: No checkpoint to resume from, a damaged one, or one of another run (other
            settings, base model or data).

    """
    target = cfg.resume_from_checkpoint
    if not target:
        return None
    folder = latest_checkpoint(output_dir) if target is True else Path(target)
    if folder is None:
        raise CheckpointError(f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint; "
                              "start without resume_from_checkpoint or pass the path of a checkpoint folder")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist; pass a checkpoint-N folder of this run")
    check_compatible(read_state(folder), cfg, fingerprint, folder)
    state = load_checkpoint(folder, model, optimizer, scheduler)
    if "loss_scale" in state:  # written by every checkpoint since fp16 loss scaling
        scaler.load_state_dict(state["loss_scale"])
    logger.info("resumed from %s at step %d", folder, state["step"])
    return state["step"]


def check_compatible(state: dict[str, Any], cfg: FinetuneConfig, fingerprint: dict[str, Any], folder: Path) -> None:
    """Refuse a checkpoint written with other settings, another base model or other data."""
    saved, now = state.get("config", {}), cfg.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE_CHANGES and k in saved and saved[k] != now[k]]
    if changed:
        raise CheckpointError(f"checkpoint {folder} was written with a different config ({'; '.join(changed)}); "
                              "resume with the same settings or start a new output_dir")
    diffs = fingerprints_match(state.get("fingerprint", {}).get("base_model", {}), fingerprint["base_model"])
    if state.get("fingerprint", {}).get("data", {}).get("sha256") != fingerprint["data"]["sha256"]:
        diffs.append("the training data differs from the data the checkpoint was trained on")
    if diffs:
        raise CheckpointError(f"checkpoint {folder} belongs to another run: {'; '.join(diffs)}")
