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
