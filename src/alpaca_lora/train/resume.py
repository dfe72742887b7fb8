"""A running fit and its checkpoints: resume from one, write one, and stop with one saved.

Divergence and interrupts stop training here, each saving the last good state and raising an error
that says where it is and how to go on.
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alpaca_lora.errors import CheckpointError, TrainingDiverged, TrainingInterrupted
from alpaca_lora.export.fingerprint import fingerprints_match
from alpaca_lora.train.checkpoint import RngState, latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from alpaca_lora.train.interrupt import StopRequest

if TYPE_CHECKING:
    from alpaca_lora.train.recipe import _Run

logger = logging.getLogger(__name__)

# Fields that may change between a checkpoint and its resume without changing what was trained.
RESUMABLE_CHANGES = {"num_epochs", "max_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                     "resume_from_checkpoint", "report_to", "device", "packing",
                     "release_cpu_memory", "ddp_timeout", "cpu_matmul"}


def maybe_resume(run: _Run) -> int | None:
    """Load the checkpoint ``resume_from_checkpoint`` names into ``run``; return its step, or None without one."""
    target = run.cfg.resume_from_checkpoint
    if not target:
        return None
    folder = latest_checkpoint(run.output_dir) if target is True else Path(target)
    if folder is None:
        raise CheckpointError(
            f"resume_from_checkpoint=True but {run.output_dir} holds no complete checkpoint; "
            "start without resume_from_checkpoint or pass the path of a checkpoint folder"
        )
    if not Path(folder).is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist; pass a checkpoint-N folder of this run")
    state = read_state(Path(folder))
    check_compatible(state, run, Path(folder))
    state = load_checkpoint(Path(folder), run.model, run.optimizer, run.scheduler)
    if "loss_scale" in state:  # written by every checkpoint since fp16 loss scaling
        run.scaler.load_state_dict(state["loss_scale"])
    run.step = state["step"]
    logger.info("resumed from %s at step %d", folder, run.step)
    return run.step


def check_compatible(state: dict[str, Any], run: _Run, folder: Path) -> None:
    """Refuse a checkpoint written with other settings, another base model or other data."""
    saved, now = state.get("config", {}), run.cfg.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE_CHANGES and k in saved and saved[k] != now[k]]
    if changed:
        raise CheckpointError(f"checkpoint {folder} was written with a different config ({'; '.join(changed)}); "
                              "resume with the same settings or start a new output_dir")
    diffs = fingerprints_match(state.get("fingerprint", {}).get("base_model", {}),
                                   run.fingerprint["base_model"])
    if state.get("fingerprint", {}).get("data", {}).get("sha256") != run.fingerprint["data"]["sha256"]:
        diffs.append("the training data differs from the data the checkpoint was trained on")
    if diffs:
        raise CheckpointError(f"checkpoint {folder} belongs to another run: {'; '.join(diffs)}")


def save_run_checkpoint(run: _Run, rng: RngState | None = None) -> Path | None:
    """Rank 0 writes ``checkpoint-N`` (every rank resumes from it; FSDP runs write none yet)."""
    if run.cfg.fsdp:
        logger.warning("step %d: no checkpoint written, FSDP runs do not write resumable checkpoints yet", run.step)
        return None
    state = {"step": run.step, "tokens_seen": run.tokens_seen, "total_steps": run.total_steps,
             "config": run.cfg.to_dict(), "fingerprint": run.fingerprint, "loss_scale": run.scaler.state_dict()}
    folder = None
    with run.dist.guard(f"checkpoint at step {run.step}"):
        if run.dist.is_main:
            folder = save_checkpoint(run.output_dir, run.step, run.model, run.optimizer, run.scheduler, state,
                                     keep=run.cfg.save_total_limit, rng=rng)
    run.saved_checkpoint = folder
    return folder


def stop_diverged(run: _Run, loss: float, grad_norm: float, rng: RngState) -> None:
    """Log the bad step visibly, save the last good state (``rng`` from before the step) and raise."""
    step = run.step + 1
    run.metrics.log({"step": step, "loss": loss, "grad_norm": grad_norm, "diverged": True})
    folder = run.saved_checkpoint
    if run.step > 0 and (folder is None or folder.name != f"checkpoint-{run.step}"):
        folder = save_run_checkpoint(run, rng)
    kept = (f"the last good state (step {run.step}) is in {folder}" if run.step > 0 else
            "no step had completed (a NaN at once points at the base model's weights or at compute_dtype)")
    what = f"the training loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
    if math.isfinite(loss) and run.scaler.exhausted():
        what += f" with the fp16 loss scale already down to {run.scaler.scale:g}"
    raise TrainingDiverged(
        f"{what} at step {step}; that update was not applied and {kept}. Likely fixes: a lower learning_rate "
        f"(now {run.cfg.learning_rate}), gradient clipping with max_grad_norm=1.0 (now {run.cfg.max_grad_norm}), "
        "a longer warmup_ratio, compute_dtype='bfloat16' or 'float32' instead of float16, or a look at the "
        "records of that step for very long or garbled text. Start a new output_dir with the fix (a resume "
        "keeps the settings of the run).",
        step=step, checkpoint=folder if run.step > 0 else None)


def stop_broken_weights(run: _Run, loss: float, grad_norm: float, names: list[str]) -> None:
    """Stop after an update that made LoRA weights non-finite, saving nothing of the broken state.

    Unlike a non-finite loss or gradient, this is found after the optimizer stepped: the weights and
    moments in memory are damaged and no checkpoint of them is written. The error names the newest
    checkpoint on disk, which was finite when written.
    """
    step = run.step + 1
    run.metrics.log({"step": step, "loss": loss, "grad_norm": grad_norm, "diverged": True,
                     "non_finite_weights": len(names)})
    folder = latest_checkpoint(run.output_dir)
    kept = (f"the last good state is {folder}" if folder is not None else
            "no checkpoint had been written, so nothing of this run is kept")
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise TrainingDiverged(
        f"the update of step {step} made LoRA weights NaN or infinite ({listed}) although its loss ({loss:.4g}) "
        f"and gradient norm ({grad_norm:.4g}) were finite; {kept}. The learning_rate ({run.cfg.learning_rate}) or "
        f"weight_decay ({run.cfg.weight_decay}) is far too large: lower it and start a new output_dir.",
        step=step, checkpoint=folder)


def stop_interrupted(run: _Run, stop: StopRequest) -> None:
    """Save a checkpoint at this step boundary and raise TrainingInterrupted saying how to resume.

    In a multi-process run every rank stops at the same step (the request is summed over ranks);
    a rank that did not receive the signal itself reports SIGTERM.
    """
    sig = stop.signal or signal.SIGTERM
    folder = run.saved_checkpoint
    if folder is None or folder.name != f"checkpoint-{run.step}":
        folder = save_run_checkpoint(run)
    raise TrainingInterrupted(
        f"training stopped by {sig.name} after step {run.step} of {run.total_steps}; the state is saved in "
        f"{folder}. Resume with the same base model, data and settings plus resume_from_checkpoint=True "
        f"(Python: finetune(..., resume_from_checkpoint=True); command line: alpaca-lora finetune ... "
        f"--output_dir {run.output_dir} --resume_from_checkpoint true)",
        signal_name=sig.name, signal_number=int(sig), step=run.step, checkpoint=folder)
