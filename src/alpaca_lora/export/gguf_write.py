"""Write a Llama model as one GGUF file, streaming: header and metadata first, then tensor by tensor.

Every tensor's name, shape and type is known before a byte is written (the GGUF header lists them), so
the file is written in one pass holding one tensor at a time, as ``merge`` writes safetensors.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_lora.errors import ModelError
from alpaca_lora.export import gguf_quant
from alpaca_lora.export.gguf_names import (
    LlamaShape,
    expected_shapes,
    gguf_name,
    llama3_rope_factors,
    rotary_heads,
    to_gguf_rows,
)
from alpaca_lora.export.gguf_source import ModelSource
from alpaca_lora.export.gguf_vocab import Vocab, add_vocab

logger = logging.getLogger(__name__)

PROVENANCE_PREFIX = "alpaca_lora."
"""GGUF metadata keys this library adds (base model, data fingerprint, LoRA settings)."""


def tensor_plan(source: ModelSource, shape: LlamaShape, quantization: str) -> list[tuple[str, str, Any]]:
    """``(gguf name, transformers name, GGML type)`` of every tensor the file holds, in file order.

    Raises:
        ModelError: A weight the config calls for is missing or has another shape, or the checkpoint holds
            one it does not (llama.cpp would refuse to load the file).

    """
    expected = expected_shapes(shape)
    for name, dims in expected.items():
        if name not in source.shapes:
            raise_missing(source, name)
        if tuple(source.shapes[name]) != dims:
            raise ModelError(f"{name} in {source.config_dir} has shape {list(source.shapes[name])}, the config "
                             f"calls for {list(dims)}; the checkpoint and config.json do not match")
    plan = []
    for name in source.names:
        target = gguf_name(name)
        if target is None or (name == "lm_head.weight" and shape.tied):
            continue  # rotary tables are recomputed; a tied output head is the embedding
        if name not in expected:
            raise ModelError(f"{source.config_dir} holds {name}, which its config.json has no place for "
                             f"({shape.n_layers} layers); the checkpoint and config do not match")
        plan.append((target, name, gguf_quant.tensor_type(target, expected[name], quantization)))
    return sorted(plan, key=lambda t: _order(t[0]))


def write_gguf(path: Path, source: ModelSource, shape: LlamaShape, vocab: Vocab, quantization: str) -> dict[str, int]:
    """Write the GGUF file ``path``; return how many tensors were written in each GGML type."""
    import gguf
    from tqdm.auto import tqdm

    plan = tensor_plan(source, shape, quantization)
    writer = gguf.GGUFWriter(path, "llama")
    try:
        _add_metadata(writer, source, shape, quantization)
        add_vocab(writer, vocab)
        extra = [("rope_freqs.weight", llama3_rope_factors(shape))] if shape.rope["rope_type"] == "llama3" else []
        for name, t in extra:
            writer.add_tensor_info(name, tuple(t.shape), np.dtype(np.float32), t.numel() * 4)
        for target, name, qtype in plan:
            _add_info(writer, target, tuple(source.shapes[name]), qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, t in extra:
            writer.write_tensor_data(t.numpy())
        counts: dict[str, int] = {}
        for _, name, qtype in tqdm(plan, desc=f"gguf {quantization}", unit="tensor", leave=False):
            t = source.read(name)
            heads = rotary_heads(name, shape)
            writer.write_tensor_data(gguf_quant.encode(to_gguf_rows(t, heads) if heads else t, qtype))
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
    finally:
        writer.close()
    return counts


def raise_missing(source: ModelSource, name: str) -> None:
    """A ModelError for a tensor every Llama checkpoint has."""
    raise ModelError(f"{source.config_dir} has no {name}; the checkpoint is incomplete: copy or download it again")


def _order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if parts[0] == "token_embd":
        return (-1, name)
    return (int(parts[1]), name) if parts[0] == "blk" else (1 << 30, name)


def _add_info(writer: Any, name: str, dims: tuple[int, ...], qtype: Any) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype in (T.F32, T.F16):
        dtype = np.dtype(np.float32 if qtype == T.F32 else np.float16)
        writer.add_tensor_info(name, dims, dtype, math.prod(dims) * dtype.itemsize)
    else:
        byte_shape = quants.quant_shape_to_byte_shape(dims, qtype)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)


def _add_metadata(writer: Any, source: ModelSource, shape: LlamaShape, quantization: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(source.folder.name)
    writer.add_file_type(gguf_quant.file_type(quantization))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab_size)
    if shape.head_dim * shape.n_head != shape.hidden:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    if shape.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(shape.rope["factor"]))
    base = source.provenance.get("base_model")
    if base:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base)
    for key, value in source.provenance.items():
        writer.add_string(PROVENANCE_PREFIX + key, value)
    gen = source.generation
    if "temperature" in gen:
        writer.add_sampling_temp(float(gen["temperature"]))
    if "top_p" in gen:
        writer.add_sampling_top_p(float(gen["top_p"]))
    if "top_k" in gen:
        writer.add_sampling_top_k(int(gen["top_k"]))
    if "repetition_penalty" in gen:
        writer.add_sampling_penalty_repeat(float(gen["repetition_penalty"]))
