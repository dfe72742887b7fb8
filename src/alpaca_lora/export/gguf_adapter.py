"""A LoRA adapter alone as GGUF, in the form llama.cpp loads over a base GGUF (``--lora``).

llama.cpp's adapter file names each pair after the weight it updates (``blk.0.attn_q.weight.lora_a`` and
``.lora_b``), keeps peft's layouts (A: rank x in, B: out x rank) and applies ``alpha / rank`` times
``B @ A``, with one ``adapter.lora.alpha`` per file. A per-module scale (rsLoRA, rank or alpha patterns)
is folded into each B so that every pair gets exactly peft's scale. The rows of B for q and k projections
are reordered as the base's are (:func:`~alpaca_lora.export.gguf_names.to_gguf_rows`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alpaca_lora.errors import ModelError
from alpaca_lora.export import gguf_quant
from alpaca_lora.export.gguf_names import LlamaShape, from_gguf_rows, gguf_name, rotary_heads, to_gguf_rows
from alpaca_lora.export.gguf_source import ModelSource
from alpaca_lora.export.gguf_verify import compare_logits
from alpaca_lora.export.gguf_write import PROVENANCE_PREFIX
from alpaca_lora.export.plan import base_tensor

ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")


def adapter_pairs(source: ModelSource, shape: LlamaShape) -> tuple[float, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """``(alpha, [(gguf weight name, A, B as stored)])``: B carries each module's scale relative to alpha / r."""
    plan = source.plan
    assert plan is not None  # export_gguf checked the folder is an adapter
    if plan.token_rows or plan.replaced:
        raise ModelError(f"{plan.adapter_dir} trains new tokens; llama.cpp's LoRA GGUF cannot grow the base's "
                         "vocabulary. Export the merged model instead (adapter_only=False)")
    if plan.magnitudes:
        raise ModelError(f"{plan.adapter_dir} is a DoRA adapter; llama.cpp's LoRA GGUF holds A and B only, not "
                         "DoRA's magnitudes. Export the merged model instead (adapter_only=False)")
    first = next(iter(plan.updates.values()))
    alpha = first[2] * first[0].shape[0]  # scale * r of the first module: most files need no folding at all
    pairs = []
    for name, (a, b, scale) in sorted(plan.updates.items()):
        target = gguf_name(name)
        if target is None:
            raise ModelError(f"the adapter updates {name}, which llama.cpp does not store")
        b = b * (scale * a.shape[0] / alpha)  # llama.cpp multiplies by alpha / r: leave exactly `scale`
        heads = rotary_heads(name, shape)
        pairs.append((target, a, to_gguf_rows(b, heads) if heads else b))
    return alpha, pairs


def write_adapter(path: Path, source: ModelSource, shape: LlamaShape, quantization: str,
                  verify: bool) -> dict[str, Any]:
    """Write the adapter of ``source`` to ``path``; return the report's figures (tensor types, verification)."""
    import gguf

    alpha, pairs = adapter_pairs(source, shape)
    writer = gguf.GGUFWriter(path, "llama")
    counts: dict[str, int] = {}
    try:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        writer.add_name(source.folder.name)
        for key, value in source.provenance.items():
            writer.add_string(PROVENANCE_PREFIX + key, value)
        for target, a, b in pairs:
            for suffix, t in (("lora_a", a), ("lora_b", b)):
                qtype = gguf_quant.tensor_type("lora", tuple(t.shape), quantization)
                data = gguf_quant.encode(t, qtype)
                raw = None if data.dtype != np.uint8 else qtype
                writer.add_tensor(f"{target}.{suffix}", data, raw_dtype=raw)
                counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"tensor_types": counts, "lora_alpha": alpha, "adapted_weights": len(pairs),
            "verification": verify_adapter(path, source, shape, quantization) if verify else None}


def verify_adapter(path: Path, source: ModelSource, shape: LlamaShape, quantization: str) -> dict[str, Any]:
    """Base + the adapter read back from ``path`` against base + the source adapter, on the probe batch."""
    from gguf import GGUFReader

    plan = source.plan
    assert plan is not None
    reader = GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: t for t in reader.tensors}

    def stored(name: str) -> torch.Tensor:
        return gguf_quant.decode(tensors[name])

    def written(name: str) -> torch.Tensor:
        w = base_tensor(plan, name)
        if name in plan.updates:
            target = gguf_name(name)
            a, b = stored(f"{target}.lora_a"), stored(f"{target}.lora_b")
            heads = rotary_heads(name, shape)
            w += (alpha / a.shape[0]) * ((from_gguf_rows(b, heads) if heads else b) @ a)
        return w

    result = compare_logits(source.config_dir, source.probe, source.read, written)
    tolerance = gguf_quant.TOLERANCE[quantization]
    result.update(tolerance=tolerance, passed=result["relative_rms_diff"] <= tolerance)
    if not (result["passed"] and math.isfinite(result["max_abs_logit_diff"])):
        raise ModelError(f"GGUF verification failed for the adapter {path.name}: base + adapter logits differ from "
                         f"the source by {result['relative_rms_diff']:.3g} (relative RMS; tolerance "
                         f"{tolerance:g}); the file was not kept")
    return result
