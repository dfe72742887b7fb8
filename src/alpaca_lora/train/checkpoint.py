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
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from alpaca_lora.errors import CheckpointError, shown
from alpaca_lora.export.layout import ADAPTER_WEIGHTS, CHECKPOINT_PREFIX, write_json
from alpaca_lora.files import load_safetensors, non_finite, read_json

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
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    bad = non_finite({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}) + non_finite(tensors)
    if bad:  # training stops before this can happen; a checkpoint must never hold a state that is not good
        raise CheckpointError(f"refusing to write {final}: {', '.join(bad[:3])} hold NaN or infinite values; "
                              f"the last good checkpoint is {latest_checkpoint(output_dir)}")
    rng_tensors, rng_meta = rng if rng is not None else capture_rng()
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_TAG}", dir=output_dir))
        model.save_pretrained(tmp, safe_serialization=True)
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
    optimizer_state = _checked_optimizer_state(folder, moments, meta, optimizer)
    scheduler_state = _check_scheduler_state(folder, scheduler_state, scheduler)
    _check_rng_state(folder, *rng)
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
    _set_rng_state(*rng)
    return state


def get_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft model, as ``set_peft_model_state_dict`` takes them back."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _checked_optimizer_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                             optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Rebuild the optimizer state and check it fits ``optimizer``'s parameters, shape by shape."""
    where = f"checkpoint {folder}: the optimizer state"
    fix = "the checkpoint is damaged or from another run; resume from an earlier checkpoint-N folder or start again"
    groups = meta.get("param_groups")
    ours = optimizer.state_dict()["param_groups"]
    if not (isinstance(groups, list) and len(groups) == len(ours) and all(isinstance(g, dict) for g in groups)
            and [len(g.get("params", [])) if isinstance(g.get("params"), list) else -1 for g in groups]
            == [len(g["params"]) for g in ours]):
        raise CheckpointError(f"{where} has parameter groups that do not match this run's; {fix}")
    for g, o in zip(groups, ours, strict=True):
        for key, value in g.items():
            mine = list(o[key]) if isinstance(o.get(key), tuple) else o.get(key)
            items = list(zip(value, mine, strict=False)) if isinstance(value, list) and isinstance(mine, list) else []
            if key != "params" and key in o and (not _same_kind(value, mine) or (isinstance(value, list) and (
                    len(value) != len(mine) or not all(_same_kind(a, b) for a, b in items)))):
                raise CheckpointError(f"{where}: {key}={shown(value, 40)} where this run has {shown(o[key], 40)}; "
                                      f"{fix}")
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        raise CheckpointError(f"{where} is damaged ({OPTIMIZER_META}); {fix}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        state = _unflatten_optimizer(tensors, {"scalars": scalars, "param_groups": groups})
    except (ValueError, TypeError, AttributeError):
        raise CheckpointError(f"{where} has tensors named in no known way; {fix}") from None
    for idx, values in state["state"].items():
        if not 0 <= idx < len(params):
            raise CheckpointError(f"{where} names parameter {idx}, but this run has {len(params)}; {fix}")
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[idx].shape:
                raise CheckpointError(f"{where}: {key} of parameter {idx} has shape {list(value.shape)}, the "
                                      f"parameter {list(params[idx].shape)}; {fix}")
    return state


def _check_scheduler_state(folder: Path, saved: dict[str, Any], scheduler: Any) -> dict[str, Any]:
    """Return the scheduler state to load: all of this run's keys, each of the type this run's scheduler holds.

    A scheduler's ``load_state_dict`` sets every key it is given as an attribute, so a hand-edited file
    could replace any of them; keys this scheduler does not have (from another torch version) are dropped.
    """
    ours = _jsonable(scheduler.state_dict())
    missing = [k for k in ours if k not in saved]
    if missing:
        raise CheckpointError(f"checkpoint {folder}: the scheduler state lacks {missing[:5]}; the checkpoint is "
                              "damaged or from another torch version. Resume from an earlier checkpoint-N folder or "
                              "start again")
    kept = {k: v for k, v in saved.items() if k in ours}
    for key, value in kept.items():
        mine = ours[key]
        pairs = list(zip(value, mine, strict=False)) if isinstance(value, list) and isinstance(mine, list) else []
        if not _same_kind(value, mine) or (isinstance(value, list) and (
                len(value) != len(mine) or not all(_same_kind(a, b) for a, b in pairs))):
            raise CheckpointError(f"checkpoint {folder}: the scheduler state has {key}={shown(value, 60)} where this "
                                  f"run's scheduler has {shown(mine, 60)}; the checkpoint is damaged or from another "
                                  "run. Resume from an earlier checkpoint-N folder or start again")
    return kept


def _same_kind(a: Any, b: Any) -> bool:
    """Same JSON kind: numbers match numbers (finite ones), other values match their own type."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isfinite(a)
    return type(a) is type(b)


def _check_rng_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Check the RNG state has the shapes Python, NumPy and torch will accept, before any is set."""
    fix = "the checkpoint is damaged; resume from an earlier checkpoint-N folder or start again"
    cpu, keys = tensors.get("torch_cpu"), tensors.get("numpy_keys")
    ok = (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.shape == torch.get_rng_state().shape
          and isinstance(keys, torch.Tensor) and keys.shape == (624,)
          and bool(((keys >= 0) & (keys < 2**32)).all()))
    ok = ok and all(k in ("torch_cpu", "numpy_keys") or (k.startswith("torch_cuda_") and t.dtype == torch.uint8
                                                          and t.dim() == 1) for k, t in tensors.items())
    py, np_meta = meta.get("python"), meta.get("numpy")
    ok = ok and isinstance(py, list) and len(py) == 3 and isinstance(py[1], list) and len(py[1]) == 625 \
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in py[1][:624]) \
        and isinstance(py[1][624], int) and 0 <= py[1][624] <= 624 \
        and isinstance(np_meta, list) and len(np_meta) == 4 and np_meta[0] == "MT19937" \
        and isinstance(np_meta[1], int) and 0 <= np_meta[1] <= 624 and isinstance(np_meta[2], int) \
        and isinstance(np_meta[3], (int, float))
    if not ok:
        raise CheckpointError(f"checkpoint {folder}: the random-number state ({RNG_TENSORS}, {RNG_META}) is "
                              f"damaged; {fix}")


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
