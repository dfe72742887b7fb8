"""Verify a written GGUF: read it back and compare its logits with the source model's on a probe batch.

The file is read with the ``gguf`` package's reader, each tensor decoded to fp32 (quantization included)
and its rows put back in transformers' order; a streamed model skeleton then runs the probe batch once
with the source weights and once with the file's. The figures (largest logit difference, relative to the
largest logit, and top-1 agreement) go into the export report; a difference beyond the quantization's
tolerance (:data:`alpaca_lora.export.gguf_quant.TOLERANCE`) is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.errors import ModelError
from alpaca_lora.export import gguf_quant
from alpaca_lora.export.gguf_names import LlamaShape, from_gguf_rows, gguf_name, rotary_heads
from alpaca_lora.export.gguf_source import ModelSource
from alpaca_lora.export.gguf_vocab import Vocab
from alpaca_lora.export.safetensors_stream import skeleton, streamed_logits

logger = logging.getLogger(__name__)

WEIGHT_TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 2e-2, "Q6_K": 4e-2, "Q5_K": 6e-2, "Q5_0": 6e-2,
                    "Q5_1": 6e-2, "Q4_K": 0.15, "Q4_0": 0.15, "Q4_1": 0.15}
"""Largest relative error ||file - source|| / ||source|| of one tensor, per GGML type (measured: docs/export.md)."""


def gguf_tensors(path: Path, shape: LlamaShape) -> tuple[Any, Callable[[str], torch.Tensor]]:
    """The reader of ``path`` and a source of its tensors by transformers name (fp32, transformers layout)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}

    def read(name: str) -> torch.Tensor:
        target = gguf_name(name)
        if target is None or target not in tensors:
            raise ModelError(f"{path} has no tensor for {name} ({target}); the file is incomplete")
        t = tensors[target]
        w = gguf_quant.decode(t)
        heads = rotary_heads(name, shape)
        return from_gguf_rows(w, heads) if heads else w

    return reader, read


def compare_logits(config_dir: Path, probe: torch.Tensor, source: Callable[[str], torch.Tensor],
                   written: Callable[[str], torch.Tensor], vocab_size: int | None = None) -> dict[str, Any]:
    """Logits of ``probe`` from the source weights and from the written ones, as export-report figures.

    ``vocab_size`` overrides the config's (an adapter's new tokens grew the embedding).
    """
    model = skeleton(config_dir, vocab_size)
    with torch.no_grad():
        ref = streamed_logits(model, probe, source)  # (B, T, V)
        got = streamed_logits(model, probe, written)
    diff = (got - ref).abs()
    scale = float(ref.abs().max())
    spread = (ref - ref.mean(-1, keepdim=True)).pow(2).mean().sqrt()  # RMS of the logits about each row's mean
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "max_abs_logit": scale, "relative_max_diff": float(diff.max()) / max(scale, 1e-12),
            "relative_rms_diff": float(diff.pow(2).mean().sqrt() / spread.clamp_min(1e-12)),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "probe_shape": list(probe.shape)}


def check_weights(reader: Any, written: Callable[[str], torch.Tensor], names: list[str],
                  source: Callable[[str], torch.Tensor]) -> dict[str, float]:
    """Each tensor of the file against the source: the worst relative error per GGML type, or a ModelError.

    A misplaced or mis-ordered tensor is off by about 1.4 (as much as an unrelated one); quantization adds
    at most :data:`WEIGHT_TOLERANCE` of its type.
    """
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    worst: dict[str, float] = {}
    for name in names:
        target = gguf_name(name)
        if target is None or target not in types:
            continue  # rotary tables; a tied output head
        w, ref = written(name), source(name)
        error = float((w - ref).norm() / ref.norm().clamp_min(1e-30))
        kind = types[target]
        worst[kind] = max(worst.get(kind, 0.0), error)
        bound = WEIGHT_TOLERANCE.get(kind, 0.4)
        if not error <= bound:
            raise ModelError(f"{target} ({name}) reads back {error:.3g} away from the source (relative error; "
                             f"{kind} allows {bound:g}): the tensor is misplaced or damaged; the file was not kept. "
                             "Please report this")
    return worst


def check_metadata(reader: Any, shape: LlamaShape) -> None:
    """The hyperparameters llama.cpp reads must be the config's."""
    expected = {"llama.block_count": shape.n_layers, "llama.embedding_length": shape.hidden,
                "llama.feed_forward_length": shape.intermediate, "llama.attention.head_count": shape.n_head,
                "llama.attention.head_count_kv": shape.n_head_kv, "llama.rope.dimension_count": shape.head_dim,
                "llama.context_length": shape.context, "llama.rope.freq_base": shape.rope_theta,
                "llama.attention.layer_norm_rms_epsilon": shape.rms_eps}
    for key, value in expected.items():
        field = reader.fields.get(key)
        got = field.contents() if field is not None else None
        if got is None or abs(float(got) - float(value)) > 1e-6 * max(1.0, abs(float(value))):
            raise ModelError(f"{key} reads back as {got}, the model's config says {value}; the file was not kept. "
                             "Please report this")


def verify_gguf(path: Path, source: ModelSource, shape: LlamaShape, vocab: Vocab, quantization: str) -> dict[str, Any]:
    """Read ``path`` back and check metadata, tensors and logits against the source; the figures, or a ModelError."""
    reader, written = gguf_tensors(path, shape)
    fields = reader.fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != len(vocab.tokens):
        raise ModelError(f"{path} read back with a vocabulary of {0 if tokens is None else len(tokens.data)} tokens, "
                         f"{len(vocab.tokens)} were written; the file is damaged (is the disk full?)")
    template = fields.get("tokenizer.chat_template")
    if vocab.chat_template and (template is None or template.contents() != vocab.chat_template):
        raise ModelError(f"{path} read back without the training chat template; the file is damaged")
    check_metadata(reader, shape)
    weights = check_weights(reader, written, source.names, source.read)
    result = compare_logits(source.config_dir, source.probe, source.read, written, source.config.vocab_size)
    tolerance = gguf_quant.TOLERANCE[quantization]
    result.update(weight_relative_error=weights, tolerance=tolerance, passed=result["relative_rms_diff"] <= tolerance)
    logger.info("gguf check (%s): logits off by %.3g (relative RMS; tolerance %.3g), top-1 agreement %.1f%%",
                quantization, result["relative_rms_diff"], tolerance, 100 * result["top1_agreement"])
    if not result["passed"]:
        raise ModelError(
            f"GGUF verification failed for {path.name}: its logits differ from the source model's by "
            f"{result['relative_rms_diff']:.3g} (relative RMS; tolerance {tolerance:g} for {quantization}); the file "
            "was not kept. Try a finer quantization (q8_0, f16); if f16 fails too, please report it")
    return result
