"""What the benchmark reports beside tokens/s: model FLOPs, MFU, and the longest context under a memory cap.

Model FLOPs count the arithmetic a LoRA step needs, not what an implementation happens to run:

- each frozen linear layer: its forward product (2 FLOPs per weight per token) and the gradient
  of its input (2 more); no weight gradient, since the weight is frozen;
- each LoRA adapter: forward, input gradient and weight gradient (6 FLOPs per parameter per token);
- causal attention: the score and value products of each query against the keys before it, in
  the forward pass (``4 x heads x head_dim`` FLOPs per query-key pair) and twice that backward;
- lm_head: forward and input gradient, on the positions that carry a label only (the loss needs
  no logits elsewhere);
- the recomputation of gradient checkpointing is not counted (it is overhead, not model work).

Both recipes train on the same records, so they get the same model FLOPs, and their MFU ratio is
their tokens/s ratio. MFU divides the achieved model FLOP/s by the GPU's dense bf16 peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alpaca_lora.train.memory import projection_shapes

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets, matched
# against ``torch.cuda.get_device_name()``; the first matching key wins, so longer names come first.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
}

def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak in FLOP/s of a GPU named like ``torch.cuda.get_device_name()``, or None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def flop_parts(config: Any, lengths: Sequence[int], label_tokens: int, lora_r: int = 0,
               lora_targets: Sequence[str] = (), causal: bool = True) -> dict[str, float]:
    """Forward FLOPs of a Llama-shaped model over records of ``lengths`` tokens, each attending only to itself.

    Args:
        config: A transformers ``LlamaConfig``.
        lengths: Token count of each record (packed or padded, padding excluded).
        label_tokens: Positions that go through lm_head (the label positions).
        lora_r: LoRA rank (0: no adapters).
        lora_targets: Projection names carrying an adapter.
        causal: Count only the query-key pairs a causal mask keeps (False: the full square).

    Returns:
        FLOPs (multiply and add counted separately) by part: ``linear`` (the decoder layers'
        projections), ``lora``, ``attention`` (scores and values) and ``lm_head``.

    """
    shapes = projection_shapes(config.to_dict())
    tokens = sum(lengths)
    layers = config.num_hidden_layers
    linear = layers * sum(a * b for a, b in shapes.values())
    lora = layers * lora_r * sum(a + b for name, (a, b) in shapes.items() if name in lora_targets)
    width = shapes["q_proj"][1]  # heads x head_dim
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    return {"linear": 2.0 * linear * tokens, "lora": 2.0 * lora * tokens, "attention": 4.0 * layers * width * pairs,
            "lm_head": 2.0 * config.hidden_size * config.vocab_size * label_tokens}


def train_flops(config: Any, lengths: Sequence[int], label_tokens: int, lora_r: int,
                lora_targets: Sequence[str]) -> float:
    """Model FLOPs of one LoRA training step (forward and backward) on the given records; see the module doc."""
    p = flop_parts(config, lengths, label_tokens, lora_r, lora_targets)
    return 2 * p["linear"] + 3 * p["lora"] + 3 * p["attention"] + 2 * p["lm_head"]


def longest_fitting(fits: Callable[[int], bool], start: int = 1024, cap: int = 65536,
                    resolution: int = 256) -> dict[str, Any]:
    """The longest length that ``fits``: doubling from ``start``, then bisecting to ``resolution``.

    Args:
        fits: Runs the workload at a length and says whether it fit (assumed monotone).
        start: First length tried.
        cap: Longest length tried; reaching it is reported as ``capped``.
        resolution: Bisection stops when the bracket is this narrow.

    Returns:
        ``{"longest": L or 0, "capped": bool, "tried": {length: fitted}}``.

    """
    tried: dict[int, bool] = {}

    def attempt(n: int) -> bool:
        tried[n] = fits(n)
        return tried[n]

    ok, bad = 0, None
    n = start
    while n <= cap:
        if attempt(n):
            ok = n
            n *= 2
        else:
            bad = n
            break
    if bad is None:
        return {"longest": ok, "capped": True, "tried": tried}
    lo = ok if ok else 0
    while bad - lo > resolution:
        mid = (lo + bad) // 2 // resolution * resolution or resolution
        if mid <= lo or mid >= bad:
            break
        if attempt(mid):
            lo = mid
        else:
            bad = mid
    return {"longest": lo, "capped": False, "tried": tried}
