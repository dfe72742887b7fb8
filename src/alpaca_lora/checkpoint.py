"""Resumable checkpoints in safetensors + JSON: adapter, optimizer, scheduler, RNG and data position.

A checkpoint is written into a temporary folder beside its final place and renamed into place
only when complete, so a crash or a kill mid-save leaves the previous checkpoint intact. Older
checkpoints are removed only after the new one is in place. Nothing is pickled.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alpaca_lora.artifacts import ADAPTER_WEIGHTS, CHECKPOINT_PREFIX, read_json, write_json
from alpaca_lora.errors import CheckpointError

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RNG_TENSORS = "rng_state.safetensors"
RNG_META = "rng_state.json"


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


def save_checkpoint(
    output_dir: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
    state: dict[str, Any], keep: int,
) -> Path:
    """Write ``checkpoint-{step}`` atomically, then rotate old ones so ``keep`` remain.

    Args:
        output_dir: The run folder.
        step: Optimizer steps completed.
        model: The peft model (only adapter weights are saved).
        optimizer: The optimizer; its tensors go to safetensors, the rest to JSON.
        scheduler: A ``torch.optim.lr_scheduler`` object.
        state: Trainer state (step, tokens seen, fingerprints, ...), JSON-serialisable.
        keep: Number of newest checkpoints to keep.

    Returns:
        The checkpoint folder.

    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=output_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        write_json(tmp / OPTIMIZER_META, meta)
        write_json(tmp / SCHEDULER_FILE, _jsonable(scheduler.state_dict()))
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / RNG_TENSORS))
        write_json(tmp / RNG_META, rng_meta)
        write_json(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final} ({exc.strerror or exc}); the previous checkpoint is kept. "
            "Free disk space or choose another output_dir, then resume with resume_from_checkpoint=True"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG state from ``folder``; return its trainer state."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {STATE_FILE}); pick another one")
    state = read_json(folder / STATE_FILE)
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"checkpoint {folder} holds adapter weights this model lacks: {unexpected[:5]}")
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / OPTIMIZER_TENSORS)),
                                                   read_json(folder / OPTIMIZER_META)))
    scheduler.load_state_dict(read_json(folder / SCHEDULER_FILE))
    _set_rng_state(load_file(str(folder / RNG_TENSORS)), read_json(folder / RNG_META))
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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
