"""The self-describing output folder: file names, fingerprints and how to read them back.

A folder written by ``finetune`` holds everything ``merge``, ``generate`` and resume need::

    adapter_model.safetensors   LoRA weights (peft format)
    adapter_config.json         peft LoraConfig (``PeftModel.from_pretrained`` loads the folder)
    prompt_template.json        the exact template used
    finetune_config.json        the full FinetuneConfig
    fingerprint.json            base model (path, config hash, tensor shapes) and data fingerprints
    train_results.json          final metrics (train/eval loss, steps, tokens, runtime)
    metrics.jsonl               one JSON object per logged step
    loss.png                    train and eval loss curves
    tokenizer files             the tokenizer used for training
    checkpoint-N/               resumable checkpoints written while training

No pickle is ever written or read: weights and optimizer state are safetensors, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from alpaca_lora import files
from alpaca_lora.errors import ModelError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TEMPLATE_FILE = "prompt_template.json"
CONFIG_FILE = "finetune_config.json"
FINGERPRINT_FILE = "fingerprint.json"
RESULTS_FILE = "train_results.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINT_PREFIX = "checkpoint-"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (temp file + rename) and return ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: Path, expect: type | tuple[type, ...] = dict) -> Any:
    """Read a JSON file of the output folder that must hold ``expect`` (a ModelError naming the file if not)."""
    return files.read_json(path, expect=expect, fix="the folder is damaged; re-run the export or training")


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Return ``{tensor name: shape}`` for every ``*.safetensors`` file in ``folder``.

    Reads only the JSON headers, so it is cheap even for a 70B folder.
    """
    shapes: dict[str, list[int]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                shapes[name] = list(meta["shape"])
    return shapes


def base_fingerprint(base_model: str | Path) -> dict[str, Any]:
    """Fingerprint a base model: where it came from, a hash of its config and of its tensor shapes.

    Args:
        base_model: A local model folder or a Hub id (resolved from the local cache when present).

    Returns:
        A JSON-serialisable dict. ``config_sha256`` and ``shapes_sha256`` identify the weights'
        architecture; ``weights_sha256`` hashes the safetensors headers (names, dtypes, offsets).

    """
    folder = resolve_local(base_model)
    fp: dict[str, Any] = {"name_or_path": str(base_model)}
    if folder is None:
        return fp
    fp["resolved_path"] = str(folder.resolve())
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        arch_keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size")
        fp["architecture"] = {k: config.get(k) for k in arch_keys}
    shapes = safetensors_shapes(folder)
    if shapes:
        canonical = json.dumps(sorted(shapes.items()), separators=(",", ":"))
        fp["shapes_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
        fp["num_tensors"] = len(shapes)
        fp["num_parameters"] = sum(_prod(s) for s in shapes.values())
    return fp


def resolve_local(base_model: str | Path) -> Path | None:
    """Return a local folder for ``base_model``: the folder itself, or a Hub id's cached snapshot."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base_model), local_files_only=True))
    except Exception:  # not cached or not a valid id: nothing local to fingerprint
        return None


def fingerprints_match(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Return the differences between two base fingerprints (empty when they match)."""
    diffs = []
    for key in ("architecture", "shapes_sha256"):
        if key in recorded and key in actual and recorded[key] != actual[key]:
            diffs.append(f"{key}: adapter was trained on {recorded[key]}, this base has {actual[key]}")
    return diffs


def resolve_adapter_base(adapter_dir: Path, base_model: str | Path | None = None) -> tuple[str, Path, list[str]]:
    """Find the base model of an adapter folder on this machine and compare it with the recorded one.

    Args:
        adapter_dir: A folder written by finetune (or any peft adapter folder).
        base_model: An explicit base; None tries the fingerprint's resolved path and name, then
            peft's ``base_model_name_or_path``.

    Returns:
        ``(name, local folder, fingerprint differences)``; the caller decides whether differences
        are fatal.

    Raises:
        ModelError: No candidate exists locally; the message lists what was tried.

    """
    fp_file = Path(adapter_dir) / FINGERPRINT_FILE
    recorded = (read_json(fp_file) if fp_file.is_file() else {}).get("base_model", {})
    lora = read_json(Path(adapter_dir) / ADAPTER_CONFIG)
    candidates = [base_model] if base_model is not None else [
        recorded.get("resolved_path"), recorded.get("name_or_path"), lora.get("base_model_name_or_path")]
    for candidate in filter(None, candidates):
        folder = resolve_local(candidate)
        if folder is not None:
            name = str(base_model or recorded.get("name_or_path") or candidate)
            return name, folder, fingerprints_match(recorded, base_fingerprint(folder))
    if base_model is None:
        raise ModelError(f"{adapter_dir} records no base model that exists on this machine (tried "
                         f"{[c for c in candidates if c]}); pass base_model= with a local folder of the base")
    raise ModelError(f"base_model={str(base_model)!r} is neither a local folder nor a Hub id in the local cache; "
                     "download it first or pass a local folder")


def is_run_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds an adapter written by finetune (or any peft adapter)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def pickle_files(folder: str | Path) -> list[Path]:
    """List files under ``folder`` whose suffix marks a pickle-based format."""
    return [p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES]


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
