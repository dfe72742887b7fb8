"""Fingerprints of a base model, and finding an adapter's base on this machine by its recorded one.

A fingerprint records where a base came from, its architecture, its tensor shapes and a sampled
digest of its weights; merge, generate and resume compare the recorded one with the base at hand
so an adapter is never silently applied to a model it was not trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from alpaca_lora import files
from alpaca_lora.errors import ModelError, shown
from alpaca_lora.export import layout as art
from alpaca_lora.model import folder_checks

SAMPLE_BYTES = 4096
"""Bytes read from each end of every tensor for the weights fingerprint."""


def weights_digest(folder: Path) -> str | None:
    """A sha256 of the weights of ``folder`` that reads a sample, never all of them.

    It hashes, in tensor-name order, each tensor's name, dtype, shape and the first and last
    :data:`SAMPLE_BYTES` of its data (all of a small tensor). Every tensor contributes, so a model
    trained further, fine-tuned in full or initialised with another seed differs in it, while a copy
    of the folder, or a re-sharding of the same weights, does not. A 70B model is read for some
    6 MB (two reads per tensor).

    Returns:
        The hex digest, or None when the folder holds no safetensors file.

    """
    samples: dict[str, bytes] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        header, data_start = files.safetensors_header(file)
        entries = sorted((meta["data_offsets"], name, meta) for name, meta in header.items() if name != "__metadata__")
        with open(file, "rb") as fh:
            for (begin, end), name, meta in entries:
                head = min(end - begin, SAMPLE_BYTES)
                fh.seek(data_start + begin)
                data = fh.read(head)
                if end - begin > head:
                    fh.seek(data_start + max(begin + head, end - SAMPLE_BYTES))
                    data += fh.read(end - max(begin + head, end - SAMPLE_BYTES))
                described = json.dumps([name, meta["dtype"], meta["shape"]], separators=(",", ":")).encode()
                samples[name] = described + data
    if not samples:
        return None
    digest = hashlib.sha256()
    for name in sorted(samples):
        digest.update(len(samples[name]).to_bytes(8, "little") + samples[name])
    return digest.hexdigest()


def base_fingerprint(base_model: str | Path) -> dict[str, Any]:
    """Fingerprint a base model: where it came from and, when it is on this machine, what it holds.

    Args:
        base_model: A local model folder or a Hub id (resolved from the local cache when present).

    Returns:
        A JSON-serialisable dict with ``name_or_path`` always. When ``base_model`` resolves to a local
        folder, also ``resolved_path``; ``architecture`` (config.json's sizes) when it has a config.json;
        and, when it holds safetensors files, ``shapes_sha256`` (every tensor's name and shape: tells
        models of another shape apart), ``weights_sha256`` (:func:`weights_digest`: tells apart models of
        the same shape with other weights), ``num_tensors`` and ``num_parameters``. No other hash is
        written: the config, the tokenizer and the full weights are not hashed.

    Raises:
        ModelError: The folder's config.json or a safetensors header is damaged.

    """
    folder = art.resolve_local(base_model)
    fp: dict[str, Any] = {"name_or_path": str(base_model)}
    if folder is None:
        return fp
    fp["resolved_path"] = str(folder.resolve())
    config_file = folder / "config.json"
    if config_file.is_file():
        config = art.read_json(config_file)
        arch_keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size")
        fp["architecture"] = {k: config.get(k) for k in arch_keys}
    shapes = art.safetensors_shapes(folder)
    if shapes:
        canonical = json.dumps(sorted(shapes.items()), separators=(",", ":"))
        fp["shapes_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
        fp["weights_sha256"] = weights_digest(folder)
        fp["num_tensors"] = len(shapes)
        fp["num_parameters"] = sum(math.prod(s) for s in shapes.values())
    return fp


FINGERPRINT_KEYS = ("architecture", "shapes_sha256", "weights_sha256")
"""Keys of a base fingerprint that must agree; a key missing on either side (an older folder) is not compared."""


def fingerprints_match(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Return the differences between two base fingerprints (empty when they match)."""
    diffs = []
    for key in FINGERPRINT_KEYS:
        if key in recorded and key in actual and recorded[key] != actual[key]:
            if key == "weights_sha256":
                diffs.append(f"weights_sha256: the weights differ (same shapes: another checkpoint or seed); adapter "
                             f"was trained on {str(recorded[key])[:12]}..., this base has {str(actual[key])[:12]}...")
            else:
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
        ModelError: No candidate exists locally (the message lists what was tried), or the adapter
            folder or the base asks to run its own code (``auto_map``).

    """
    folder_checks.refuse_special_files(adapter_dir)
    folder_checks.refuse_custom_code(adapter_dir)
    fp_file = Path(adapter_dir) / art.FINGERPRINT_FILE
    recorded = (art.read_json(fp_file) if fp_file.is_file() else {}).get("base_model", {})
    if not isinstance(recorded, dict):  # treating it as absent would switch the base check off
        raise ModelError(f"{fp_file}: 'base_model' is {shown(recorded, 60)}, not a JSON object; the folder is "
                         "damaged: copy it again, or delete fingerprint.json to skip the base check knowingly")
    lora = art.read_json(Path(adapter_dir) / art.ADAPTER_CONFIG)
    candidates = [base_model] if base_model is not None else [
        recorded.get("resolved_path"), recorded.get("name_or_path"), lora.get("base_model_name_or_path")]
    candidates = [c for c in candidates if isinstance(c, (str, Path)) and str(c)]
    for candidate in candidates:
        folder = art.resolve_local(candidate)
        if folder is not None:
            folder_checks.refuse_special_files(folder)  # before anything reads it for the adapter
            folder_checks.refuse_custom_code(folder)
            name = str(base_model or recorded.get("name_or_path") or candidate)
            return name, folder, fingerprints_match(recorded, base_fingerprint(folder))
    if base_model is None:
        raise ModelError(f"{adapter_dir} records no base model that exists on this machine (tried "
                         f"{shown(candidates)}); pass base_model= with a local folder of the base")
    raise ModelError(f"base_model={str(base_model)!r} is neither a local folder nor a Hub id in the local cache; "
                     "download it first or pass a local folder")
