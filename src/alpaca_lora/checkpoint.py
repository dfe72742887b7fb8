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
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alpaca_lora.artifacts import ADAPTER_WEIGHTS, CHECKPOINT_PREFIX, read_json, write_json
from alpaca_lora.errors import CheckpointError

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RNG_TENSORS = "rng_state.safetensors"
RNG_META = "rng_state.json"
_TMP_TAG = ".tmp-"  # .checkpoint-N.tmp-XXXX: being written
_OLD_TAG = ".old-"  # .checkpoint-N.old-XXXX: being removed

RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]
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
    rng_tensors, rng_meta = rng if rng is not None else capture_rng()
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_TAG}", dir=output_dir))
        model.save_pretrained(tmp, safe_serialization=True)
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        write_json(tmp / OPTIMIZER_META, meta)
        write_json(tmp / SCHEDULER_FILE, _jsonable(scheduler.state_dict()))
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


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG state from ``folder``; return its trainer state.

    Raises:
        CheckpointError: ``folder`` is incomplete, damaged or holds weights this model lacks.

    """
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {STATE_FILE}); pick another one")
    try:
        state = read_json(folder / STATE_FILE)
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
        optimizer_state = _unflatten_optimizer(load_file(str(folder / OPTIMIZER_TENSORS)),
                                               read_json(folder / OPTIMIZER_META))
        scheduler_state = read_json(folder / SCHEDULER_FILE)
        rng = load_file(str(folder / RNG_TENSORS)), read_json(folder / RNG_META)
    except Exception as exc:  # safetensors, OS and JSON errors: the folder is damaged
        raise CheckpointError(f"checkpoint {folder} is damaged ({type(exc).__name__}: {exc}); resume from an "
                              "earlier checkpoint-N folder or start again") from None
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"checkpoint {folder} holds adapter weights this model lacks: {unexpected[:5]}")
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    _set_rng_state(*rng)
    return state


# ---- optimizer state <-> safetensors + JSON ---------------------------------------------------


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param_state in sd["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _jsonable(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sd.items() if isinstance(v, (int, float, str, list, bool, type(None)))}


# ---- RNG state ---------------------------------------------------------------------------------


def capture_rng() -> RngState:
    """Return the Python, NumPy, torch CPU and CUDA generator states (tensors, JSON metadata)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                                float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
