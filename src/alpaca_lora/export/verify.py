"""Verify a merge: the written export's logits against the base plus the unmerged adapter.

Verification streams like the merge: a model skeleton with its parameters on the meta device runs a
probe batch, each module's weights loaded just before it runs and dropped after. Three passes (plain
base, merged fp32 weights, base + the unmerged adapter applied by peft's own LoRA layers) give the
logits that must agree (merged vs unmerged, as in peft's merge tests) and must differ (adapter vs base).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.errors import ModelError
from alpaca_lora.export.plan import MergePlan, base_tensor, merged_tensor, tensor_files, unmerged_tensor
from alpaca_lora.export.safetensors_stream import read_tensor, skeleton, streamed_logits

logger = logging.getLogger(__name__)

# Merged and unmerged fp32 logits may differ by rounding: 1e-4 plus 1e-5 of the largest logit (a
# 30-layer model with logits near 30 rounds to about 1e-4 on its own; a wrong merge is off by far more).
VERIFY_ATOL = 1e-4
VERIFY_RTOL = 1e-5


def verify_merge(plan: MergePlan, out: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Compare merged, unmerged (peft) and plain-base logits on a probe batch, streaming the weights."""
    written = tensor_files(out)
    ids = plan.probe_ids

    def base(name: str) -> torch.Tensor:
        return base_tensor(plan, name)

    def merged(name: str) -> torch.Tensor:
        m = merged_tensor(plan, name)
        w = read_tensor(written, name)
        # The file must hold exactly the merged tensor, cast; compared in row blocks to bound memory.
        rows = zip(w.reshape(-1).split(2**20), m.reshape(-1).split(2**20), strict=True)
        if w.shape != m.shape or not all(torch.equal(a, b.to(a.dtype)) for a, b in rows):
            raise ModelError(f"{name} in the written export differs from the merged tensor; the disk may be full")
        return m

    def cast(name: str) -> torch.Tensor:
        w = read_tensor(written, name)
        return w.float() if w.is_floating_point() else w

    model = skeleton(plan.base_dir, plan.vocab_size)
    with torch.no_grad():
        plain = streamed_logits(model, ids, base)
        merged_logits = streamed_logits(model, ids, merged)
        cast_logits = merged_logits if dtype == torch.float32 else streamed_logits(model, ids, cast)
        # Last: injecting peft's LoRA layers changes the skeleton for good.
        lora_config = copy.deepcopy(plan.adapter.config)  # as peft read it, checked in plan_merge
        # Exactly the modules the adapter holds weights for (a deeper base has layers it never saw).
        lora_config.target_modules = {n.removesuffix(".weight") for n in plan.updates}
        lora_config.init_lora_weights = False  # the weights come from the adapter; no initialiser runs on meta
        lora_config.trainable_token_indices = None  # new-token rows and layers: written into the base for the
        lora_config.modules_to_save = None  # reference
        reference = streamed_logits(model, ids, _with_lora(plan, lambda n: unmerged_tensor(plan, n)),
                                    lora_config)
    diff = float((merged_logits - reference).abs().max())
    effect = float((reference - plain).abs().max())
    cast_diff = float((cast_logits - reference).abs().max())
    scale = float(reference.abs().max())
    tolerance = VERIFY_ATOL + VERIFY_RTOL * scale
    result = {"max_abs_logit_diff": diff, "tolerance": tolerance, "max_abs_logit": scale,
              "adapter_effect_max_abs_logit_diff": effect, "export_dtype_max_abs_logit_diff": cast_diff,
              "probe_shape": list(ids.shape), "passed": True}
    logger.info("merge check: max |merged - unmerged| = %.3g (tolerance %.3g), adapter effect %.3g",
                diff, tolerance, effect)
    if not diff <= tolerance:
        raise ModelError(f"merge verification failed: merged and unmerged logits differ by {diff:.3g} "
                         f"(> {tolerance:.3g} = {VERIFY_ATOL:g} + {VERIFY_RTOL:g} x the largest logit {scale:.3g}, "
                         "in fp32); please report this with your peft version. verify=False skips the check")
    if effect == 0.0:
        raise ModelError(f"the adapter in {plan.adapter_dir} does not change the model's logits at all: it is "
                         "untrained or was saved empty (tloen/alpaca-lora#293); re-run finetune")
    return result



def _with_lora(plan: MergePlan, base: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Source for a peft-injected skeleton: the adapter's tensors, and base_layer weights from ``base``.

    The adapter gives LoRA A and B, and with DoRA each layer's magnitude.
    """
    def source(name: str) -> torch.Tensor:
        m = re.fullmatch(r"(.+)\.lora_([AB])\.[^.]+\.weight", name)
        if m:
            a, b, _ = plan.updates[f"{m.group(1)}.weight"]
            return a if m.group(2) == "A" else b
        m = re.fullmatch(r"(.+)\.lora_magnitude_vector\.[^.]+\.weight", name)
        if m:
            return plan.magnitudes[f"{m.group(1)}.weight"]
        return base(name.replace(".base_layer.", "."))

    return source
