"""The self-describing output folder: its file names and how to read them back.

A folder written by ``finetune`` holds everything ``merge``, ``generate`` and resume need::

    adapter_model.safetensors   LoRA weights (peft format)
    adapter_config.json         peft LoraConfig (``PeftModel.from_pretrained`` loads the folder)
    prompt_template.json        the exact template used
    finetune_config.json        the full FinetuneConfig
    fingerprint.json            base model (path, architecture, shapes, sampled weights) and data fingerprints
    train_results.json          final metrics (train/eval loss, steps, tokens, runtime)
    metrics.jsonl               one JSON object per logged step
    loss.png                    train and eval loss curves
    tokenizer files             the tokenizer used for training
    checkpoint-N/               resumable checkpoints written while training

No pickle is ever written or read: weights and optimizer state are safetensors, the rest JSON.
Base-model fingerprints are made and compared in :mod:`alpaca_lora.export.fingerprint`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from alpaca_lora import files
from alpaca_lora.model import folder_checks

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
INDEX_FILE = "model.safetensors.index.json"
MERGE_REPORT = "merge_report.json"
"""The index of a sharded safetensors checkpoint (tensor name -> shard file)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "vocab.txt")
"""Files a tokenizer may be saved in (a merge copies those present)."""


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

    Reads only the headers (checked: a damaged file is a ModelError naming it), so it is cheap even
    for a 70B folder.
    """
    shapes: dict[str, list[int]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        shapes.update(files.tensor_shapes(file))
    return shapes


def is_run_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds an adapter written by finetune (or any peft adapter)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def pickle_files(folder: str | Path) -> list[Path]:
    """List files under ``folder`` whose suffix marks a pickle-based format."""
    return [p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES]


def resolve_local(base_model: str | Path) -> Path | None:
    """Return a local folder for ``base_model``: the folder itself, or a Hub id's cached snapshot."""
    return folder_checks.local_model_folder(base_model)
