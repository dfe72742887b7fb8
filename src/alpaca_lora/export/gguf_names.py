"""Llama tensors as llama.cpp names and lays them out: names, the rotary row order, the hyperparameters.

transformers' Llama applies rotary embeddings to the two halves of each head (``rotate_half``);
llama.cpp's ``llama`` architecture rotates adjacent pairs, as the original checkpoints did. So the rows
of ``q_proj`` and ``k_proj`` (and of a LoRA ``B`` that updates them) are reordered within each head on the
way out (:func:`to_gguf_rows`) and back on the way in (:func:`from_gguf_rows`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from alpaca_lora.errors import ModelError, shown

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaShape:
    """What llama.cpp needs to know of a Llama config (read by :func:`llama_shape`)."""

    n_layers: int
    hidden: int
    intermediate: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any]  # rope_type and its parameters
    vocab_size: int
    tied: bool


def llama_shape(config: Any, where: str) -> LlamaShape:
    """Read a transformers Llama config; anything llama.cpp's ``llama`` graph cannot run is a ModelError."""
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "model_type", None) != "llama" or (archs and archs != ["LlamaForCausalLM"]):
        raise ModelError(f"{where} is a {getattr(config, 'model_type', None)!r} model ({archs}); GGUF export writes "
                         "the Llama architecture (LlamaForCausalLM), the family alpaca_lora trains. Convert other "
                         "architectures with llama.cpp's convert_hf_to_gguf.py")
    if (getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False)
            or getattr(config, "attention_bias", False)):
        settings = {k: getattr(config, k, None) for k in ("hidden_act", "mlp_bias", "attention_bias")}
        raise ModelError(f"{where}: {settings}; GGUF export writes Llama's SiLU MLP and attention without biases")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelError(f"{where}: rope_type {shown(rope_type)} has no GGUF form here (supported: {list(ROPE_TYPES)})")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    n_head = config.num_attention_heads
    return LlamaShape(
        n_layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
        n_head=n_head, n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_head,
        context=config.max_position_embeddings, rms_eps=float(config.rms_norm_eps), rope_theta=float(theta),
        rope={**rope, "rope_type": rope_type}, vocab_size=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)))


def expected_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Every weight a Llama checkpoint of ``shape`` holds, with its shape (a tied output head left out)."""
    h, q, kv = shape.hidden, shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h), "model.norm.weight": (h,)}
    if not shape.tied:
        out["lm_head.weight"] = (shape.vocab_size, h)
    block = {"input_layernorm": (h,), "post_attention_layernorm": (h,), "self_attn.q_proj": (q, h),
             "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
             "mlp.gate_proj": (shape.intermediate, h), "mlp.up_proj": (shape.intermediate, h),
             "mlp.down_proj": (h, shape.intermediate)}
    for i in range(shape.n_layers):
        out.update({f"model.layers.{i}.{part}.weight": dims for part, dims in block.items()})
    return out


def gguf_name(name: str) -> str | None:
    """llama.cpp's name for a transformers Llama tensor; None for one it does not store (rotary tables)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL and kind == "weight":
        return f"{_GLOBAL[stem]}.weight"
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _BLOCK:
        return f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    raise ModelError(f"tensor {shown(name)} is not part of a Llama checkpoint as llama.cpp runs it; GGUF export "
                     "writes plain LlamaForCausalLM weights")


def hf_name(gguf: str) -> str:
    """The transformers name of a llama.cpp tensor name (the inverse of :func:`gguf_name`)."""
    for hf, g in _GLOBAL.items():
        if gguf == f"{g}.weight":
            return f"{hf}.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf)
    inverse = {g: h for h, g in _BLOCK.items()}
    if not (m and m.group(2) in inverse):
        raise ModelError(f"the GGUF holds a tensor {shown(gguf)} that a Llama model does not have")
    return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"


def rotary_heads(name: str, shape: LlamaShape) -> int | None:
    """How many heads a q/k projection's rows hold (None for tensors whose rows are not rotated)."""
    if ".self_attn.q_proj." in name:
        return shape.n_head
    if ".self_attn.k_proj." in name:
        return shape.n_head_kv
    return None


def to_gguf_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves (transformers) to interleaved pairs (llama.cpp)."""
    half = t.shape[0] // heads // 2
    return t.reshape(heads, 2, half, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def from_gguf_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs (llama.cpp) back to halves (transformers)."""
    half = t.shape[0] // heads // 2
    return t.reshape(heads, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def llama3_rope_factors(shape: LlamaShape) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1's rope scaling, the ``rope_freqs`` tensor llama.cpp reads."""
    rope = shape.rope
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float64) / shape.head_dim)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)
