"""A checkpoint's training state as safetensors + JSON: optimizer, scheduler and random-number state.

Each is split into tensors (safetensors) and plain values (JSON), never pickled, and checked on the
way back against what this run's optimizer, scheduler and Python, NumPy and torch generators
accept, before anything is restored.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alpaca_lora.errors import CheckpointError, shown

OPTIMIZER_META = "optimizer.json"
RNG_TENSORS = "rng_state.safetensors"
RNG_META = "rng_state.json"

RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]


def checked_optimizer_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
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
        state = unflatten_optimizer(tensors, {"scalars": scalars, "param_groups": groups})
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


def checked_scheduler_state(folder: Path, saved: dict[str, Any], scheduler: Any) -> dict[str, Any]:
    """Return the scheduler state to load: all of this run's keys, each of the type this run's scheduler holds.

    A scheduler's ``load_state_dict`` sets every key it is given as an attribute, so a hand-edited file
    could replace any of them; keys this scheduler does not have (from another torch version) are dropped.
    """
    ours = jsonable(scheduler.state_dict())
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


def check_rng_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
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


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into its tensors (by ``"<param>.<key>"``) and its JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param_state in sd["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Join what :func:`flatten_optimizer` split back into an optimizer state dict."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def jsonable(sd: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``sd`` that JSON holds as they are (a scheduler's plain settings)."""
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


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Set the Python, NumPy and torch generators to a state from :func:`capture_rng` (checked first)."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
