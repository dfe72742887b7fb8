import pytest

from alpaca_lora import ConfigError, estimate_memory

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)


def test_7b_nf4_base_is_about_four_gigabytes():
    est = estimate_memory(LLAMA_7B, compute_dtype="bfloat16")
    assert 3.4e9 < est.parts["base_weights"] < 4.8e9  # QLoRA paper: ~3.5-4 GB of 4-bit 7B weights + fp32 embeddings
    assert est.total == sum(est.parts.values())
    assert est.fits(24 * 1024**3) and not est.fits(2 * 1024**3)


def test_estimate_moves_the_right_way():
    small = estimate_memory(LLAMA_7B, micro_batch_size=1, compute_dtype="bfloat16")
    big = estimate_memory(LLAMA_7B, micro_batch_size=8, compute_dtype="bfloat16")
    assert big.parts["activations"] > 4 * small.parts["activations"]
    no_gc = estimate_memory(LLAMA_7B, gradient_checkpointing=False, compute_dtype="bfloat16")
    gc = estimate_memory(LLAMA_7B, gradient_checkpointing=True, compute_dtype="bfloat16")
    assert no_gc.parts["activations"] > 3 * gc.parts["activations"]
    nf4 = estimate_memory(LLAMA_7B, quantization="nf4", compute_dtype="bfloat16").parts["base_weights"]
    int8 = estimate_memory(LLAMA_7B, quantization="int8", compute_dtype="bfloat16").parts["base_weights"]
    full = estimate_memory(LLAMA_7B, quantization=None, compute_dtype="bfloat16").parts["base_weights"]
    assert nf4 < int8 < full
    r8 = estimate_memory(LLAMA_7B, lora_r=8).parts["lora_weights"]
    assert estimate_memory(LLAMA_7B, lora_r=16).parts["lora_weights"] == 2 * r8


def test_reads_a_model_folder_and_rejects_unknown_fields(tiny_model_dir):
    est = estimate_memory(tiny_model_dir)
    assert est.total > 0 and "activations" in est.summary()
    with pytest.raises(ConfigError, match="micro_batch_size"):
        estimate_memory(tiny_model_dir, micro_batchsize=2)


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch,cutoff_len", [(1, 128), (4, 256)])
def test_estimate_agrees_with_measured_peak_on_the_tiny_model(tiny_model_dir, micro_batch, cutoff_len):
    """Peak RSS of real 4-bit LoRA training steps (fresh interpreter, minus its baseline) within 25%."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_peak.py"
    run = subprocess.run([sys.executable, str(script), "--base-model", str(tiny_model_dir), "--micro-batch",
                          str(micro_batch), "--cutoff-len", str(cutoff_len)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
                                           "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["measured_mb"] > 50  # the loss chunk alone is tens of MB: a real peak was read
    assert 0.75 <= row["ratio"] <= 1.25, row
