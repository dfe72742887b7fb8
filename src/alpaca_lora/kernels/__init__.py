"""Computation the library does itself: the LoRA layer, fused linear cross-entropy, CPU matrix products and memory."""
