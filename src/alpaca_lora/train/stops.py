"""The errors that end a run early, each saying where the last good state is and how to go on.

The training loop decides when to stop and saves what may be saved; these functions only word
the error it raises.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

from alpaca_lora.errors import TrainingDiverged, TrainingInterrupted
from alpaca_lora.train.state import Run


def diverged(run: Run, loss: float, grad_norm: float, checkpoint: Path | None) -> TrainingDiverged:
    """A non-finite loss or gradient at the next step; ``checkpoint`` holds the state before it (None at step 0)."""
    step, done = run.state.step + 1, run.state.step
    kept = (f"the last good state (step {done}) is in {checkpoint}" if done > 0 else
            "no step had completed (a NaN at once points at the base model's weights or at compute_dtype)")
    what = f"the training loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
    if math.isfinite(loss) and run.scaler.exhausted():
        what += f" with the fp16 loss scale already down to {run.scaler.scale:g}"
    return TrainingDiverged(
        f"{what} at step {step}; that update was not applied and {kept}. Likely fixes: a lower learning_rate "
        f"(now {run.cfg.learning_rate}), gradient clipping with max_grad_norm=1.0 (now {run.cfg.max_grad_norm}), "
        "a longer warmup_ratio, compute_dtype='bfloat16' or 'float32' instead of float16, or a look at the "
        "records of that step for very long or garbled text. Start a new output_dir with the fix (a resume "
        "keeps the settings of the run).",
        step=step, checkpoint=checkpoint if done > 0 else None)


def broken_weights(run: Run, loss: float, grad_norm: float, names: list[str],
                   checkpoint: Path | None) -> TrainingDiverged:
    """An update that made LoRA weights non-finite although its loss and gradient were finite.

    The weights and moments in memory are damaged, so nothing of them may be saved: ``checkpoint``
    is the newest one on disk, which was finite when written (None when there is none).
    """
    step = run.state.step + 1
    kept = (f"the last good state is {checkpoint}" if checkpoint is not None else
            "no checkpoint had been written, so nothing of this run is kept")
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return TrainingDiverged(
        f"the update of step {step} made LoRA weights NaN or infinite ({listed}) although its loss ({loss:.4g}) "
        f"and gradient norm ({grad_norm:.4g}) were finite; {kept}. The learning_rate ({run.cfg.learning_rate}) or "
        f"weight_decay ({run.cfg.weight_decay}) is far too large: lower it and start a new output_dir.",
        step=step, checkpoint=checkpoint)


def interrupted(run: Run, sig: signal.Signals, checkpoint: Path | None) -> TrainingInterrupted:
    """A stop asked for by ``sig`` (SIGTERM or a first Ctrl-C), with the checkpoint saved at this step boundary."""
    return TrainingInterrupted(
        f"training stopped by {sig.name} after step {run.state.step} of {run.total_steps}; the state is saved in "
        f"{checkpoint}. Resume with the same base model, data and settings plus resume_from_checkpoint=True "
        f"(Python: finetune(..., resume_from_checkpoint=True); command line: alpaca-lora finetune ... "
        f"--output_dir {run.output_dir} --resume_from_checkpoint true)",
        signal_name=sig.name, signal_number=int(sig), step=run.state.step, checkpoint=checkpoint)
