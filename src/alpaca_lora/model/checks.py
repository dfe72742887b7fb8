"""Checks of a base model before and after loading: its folder, its tokenizer against its embedding.

A local folder is checked before any weight is read (no device or FIFO, no custom code, intact
safetensors headers, a config.json the weights cover), the tokenizer's special ids and size against
the embedding, and the finished load for tensors it left unfilled or dropped. Each failure is a
``ModelError`` naming the file at fault and the fix, never a half-loaded model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from alpaca_lora import files
from alpaca_lora.errors import ModelError, shown
from alpaca_lora.model import folder_checks

SPECIAL_TOKENS = ("pad", "eos", "bos", "unk")


def check_special_tokens(tokenizer: Any, source: str | Path) -> None:
    """Refuse a tokenizer whose pad, EOS, BOS or unknown token has an id outside ``0 .. len(tokenizer) - 1``.

    A hand-edited ``tokenizer.json`` or ``tokenizer_config.json`` can give a special token such an
    id; the collator would pad with it and the embedding lookup fail deep inside training.

    Raises:
        ModelError: Naming ``source``, the token, its id and the files to repair.

    """
    size = len(tokenizer)
    for kind in SPECIAL_TOKENS:
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and not 0 <= token_id < size:
            token = getattr(tokenizer, f"{kind}_token", None)
            raise ModelError(
                f"the tokenizer of {source!s} gives its {kind} token {shown(token, 60)} the id {token_id}, outside "
                f"its vocabulary of {size:,} ids (0 to {size - 1:,}); repair tokenizer.json, tokenizer_config.json "
                f"and special_tokens_map.json so that the {kind} token is one of the vocabulary's tokens"
                + (", or remove the pad token (a missing one is set to UNK or EOS)" if kind == "pad" else "")
            )


def check_vocabulary(tokenizer: Any, embedding_rows: int, source: str | Path, new_tokens: int = 0) -> None:
    """Refuse a tokenizer with more token ids than the model has embedding rows (``new_tokens`` not counted).

    Raises:
        ModelError: Naming ``source`` and both sizes; a token id past the embedding would fail the
            embedding lookup (an IndexError, or a device-side assert on a GPU) once the data holds it.

    """
    if len(tokenizer) - new_tokens > embedding_rows:
        raise ModelError(
            f"the tokenizer of {source!s} has {len(tokenizer) - new_tokens:,} tokens but the model's embedding has "
            f"{embedding_rows:,} rows (config.json vocab_size); pass the tokenizer the model was trained with, "
            "or resize the embedding first (model.resize_token_embeddings(len(tokenizer)), then save_pretrained)"
        )


def check_loading_info(info: dict[str, Any], base_model: str | Path) -> None:
    """Refuse a load that left model tensors unfilled or dropped tensors of the files.

    transformers initialises a missing tensor randomly and only logs it; a dropped one means the
    model built is not the one saved.
    """
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        found = "; ".join(f"{what} {len(names)}: {shown(names[:5], 300)}" for what, names in (
            ("missing from the weight files", missing), ("in the files but not in the model", unexpected),
            ("of another shape", mismatched)) if names)
        raise ModelError(f"the weights of {base_model!s} do not match its config.json ({found}); the folder is "
                         "damaged or its files come from different models: download or copy it again")



def check_base_folder(folder: Path) -> int | None:
    """Check a local base-model folder before any weight is loaded; return its embedding rows.

    In order: no device or FIFO among its files, no custom code (``auto_map``), ``config.json`` a
    JSON object, every safetensors header intact (a truncated download is caught here), and the
    model config.json describes (built on the meta device, so no memory is allocated whatever sizes
    it claims) needs no more weights, and no other shapes, than the files hold. Costs a read of the
    headers, not of the weights.

    Args:
        folder: The local folder of the base model.

    Returns:
        Rows of the model's input embedding (what the tokenizer must fit), or None when the config
        describes no input embedding.

    Raises:
        ModelError: Naming the file at fault and the fix.

    """
    folder_checks.refuse_special_files(folder)
    folder_checks.refuse_custom_code(folder)
    config_file = folder / "config.json"
    config = files.read_json(config_file, expect=dict, fix="restore the config.json that came with the weights")
    weights = _weight_files(folder)
    shapes: dict[str, list[int]] = {}
    for file in weights:
        shapes.update(files.tensor_shapes(file))
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and not 0 <= layers <= len(shapes):
        raise ModelError(f"{config_file} says num_hidden_layers={layers}, but the weight files hold {len(shapes)} "
                         "tensors in all; restore the config.json that came with the weights")
    meta = _meta_model(folder, config_file)
    if "quantization_config" not in config:  # a pre-quantized checkpoint stores packed tensors: sizes differ
        _check_weights_cover(meta, shapes, config_file, weights)
    embedding = meta.get_input_embeddings()
    return getattr(embedding, "num_embeddings", None)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a load reads: those the index names when there is one, else all; headers checked."""
    present = files.check_weight_files(folder)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        index = files.read_json(index_file, fix="restore the index that came with the weight files")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"{index_file} has no weight_map of file names; restore the index that came with "
                             "the weight files")
        named = sorted({folder / v for v in weight_map.values()})
        absent = [p.name for p in named if p not in present]
        if absent:
            raise ModelError(f"{index_file} names weight files that are not in {folder}: {shown(absent)}; "
                             "download the missing shards")
        return named
    if not present:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ModelError(
            f"{folder} holds no *.safetensors weights" + (f" (only {shown(pickles)})" if pickles else "")
            + "; only safetensors weights are loaded, since a pickle file can run code when read. Convert .bin "
            "weights with transformers' save_pretrained(safe_serialization=True) in a trusted environment"
        )
    return present


def _meta_model(folder: Path, config_file: Path) -> torch.nn.Module:
    """The model config.json describes, built on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the real load reports what matters; this one is only measured
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure to build the model is the config's
        raise ModelError(f"{config_file} does not describe a causal LM transformers can build "
                         f"({type(exc).__name__}: {shown(str(exc), 300)}); restore the config.json that came with "
                         "the weights") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_weights_cover(meta: torch.nn.Module, shapes: dict[str, list[int]], config_file: Path,
                         weights: list[Path]) -> None:
    """Refuse a config whose model needs more (or other-shaped) tensors than the weight files hold."""
    needed, seen = {}, set()
    for name, tensor in meta.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # tied weights are stored once
            seen.add(id(tensor))
            needed[name] = list(tensor.shape)
    other_shape = [f"{n}: {shapes[n]} in the files, {s} by config.json" for n, s in needed.items()
                   if n in shapes and shapes[n] != s]
    in_files = sum(math.prod(s) for s in shapes.values())
    in_model = sum(math.prod(s) for s in needed.values())
    if other_shape or in_model > in_files:
        absent = [n for n in needed if n not in shapes]
        detail = (f"{len(other_shape)} of another shape: {shown(other_shape[:3], 300)}" if other_shape else
                  f"{in_model:,} weights needed, {in_files:,} in the files"
                  + (f"; absent: {shown(absent[:5], 300)}" if absent else ""))
        raise ModelError(f"{config_file} does not describe the weights in {shown([w.name for w in weights])} "
                         f"({detail}); the weight files are incomplete or config.json belongs to another model: "
                         "download the folder again or restore its own config.json")
