"""The benchmark compares like with like: both recipes see the same probe batch and get the same loss."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_worker.py"


def _run_both(model_dir, data_dir, tmp_path, *args: str) -> dict[str, dict]:
    """Run bench_worker.py for both recipes with ``args``; return each recipe's JSON result."""
    results = {}
    for recipe in ("baseline", "alpaca_lora"):
        out = tmp_path / f"{recipe}.json"
        subprocess.run([sys.executable, str(WORKER), "--recipe", recipe, "--model-dir", str(model_dir),
                        "--data-dir", str(data_dir), *args, "--out", str(out)],
                       check=True, capture_output=True, timeout=300)
        results[recipe] = json.loads(out.read_text())
    return results


@pytest.mark.slow
def test_baseline_and_alpaca_lora_agree_on_the_probe_batch(tiny_model_dir, shared_data, tmp_path):
    results = _run_both(tiny_model_dir, shared_data, tmp_path, "--cutoff", "256", "--micro-batch", "4",
                        "--steps", "2", "--records", "24")
    base, ours = results["baseline"], results["alpaca_lora"]
    print({k: (base[k], ours[k]) for k in ("probe_loss", "probe_label_tokens", "median_tokens_per_s", "peak_rss_mb")})
    assert base["probe_label_tokens"] == ours["probe_label_tokens"] > 0
    assert abs(base["probe_loss"] - ours["probe_loss"]) < 1e-4
    # the same micro-batches in the same order: the same real tokens per step
    assert base["step_tokens"] == ours["step_tokens"]
    assert all(r["median_tokens_per_s"] > 0 and r["peak_rss_mb"] > r["rss_start_mb"] for r in (base, ours))


def test_repeated_runs_pool_their_timed_steps_and_keep_the_highest_peak():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import bench_train
    finally:
        sys.path.remove(str(WORKER.parent))
    first = {"step_s": [9.0, 1.0, 2.0], "step_tokens": [10, 10, 10], "step_flops": [1e14, 1e14, 1e14], "warmup": 1,
             "peak_rss_mb": 500.0, "rss_start_mb": 100.0, "probe_loss": 1.0, "probe_label_tokens": 3}
    second = {**first, "step_s": [9.0, 4.0, 5.0], "peak_rss_mb": 700.0, "rss_start_mb": 120.0}
    pooled = bench_train.pooled([first, second])
    # rates 10, 5, 2.5, 2 tokens/s after the warm-up steps: the median is 3.75; warm-up steps never count
    assert pooled["median_tokens_per_s"] == pytest.approx(3.75)
    assert pooled["model_tflops_per_s"] == pytest.approx(37.5)
    assert pooled["peak_rss_mb"] == 700.0 and pooled["repeats"] == 2 and pooled["rss_start_mb"] == 110.0
    assert pooled["mfu"] is None and pooled["peak_vram_mb"] is None  # a CPU run has neither
    # on a GPU the memory target is about allocated VRAM, not the process's RSS
    gpu = bench_train.pooled([{**first, "peak_vram_mb": 300.0, "mfu": 0.2, "peak_bf16_tflops": 100.0},
                              {**second, "peak_vram_mb": 400.0, "mfu": 0.1, "peak_bf16_tflops": 100.0}])
    assert gpu["peak_vram_mb"] == 400.0 and gpu["mfu"] == pytest.approx(0.375)
    assert bench_train.peak_mb(gpu) == 400.0 and bench_train.peak_mb(pooled) == 700.0


def _gpu_metrics():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import gpu_metrics
    finally:
        sys.path.remove(str(WORKER.parent))
    return gpu_metrics


def test_model_flops_match_torch_flop_counter_on_a_forward_pass():
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    gm = _gpu_metrics()
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 1000, (1, 50))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    # eager attention multiplies the whole 50 x 50 square (the causal mask is added afterwards)
    parts = gm.flop_parts(config, [50], 50, causal=False)
    assert sum(parts.values()) == counter.get_total_flops()
    causal = gm.flop_parts(config, [50], 50)
    assert causal["attention"] == parts["attention"] * (50 * 51 // 2) / 2500
    # a step: frozen layers forward + input gradient (2x), LoRA and attention 3x, lm_head on labels 2x
    lora = gm.flop_parts(config, [30, 20], 7, 16, ["q_proj", "v_proj"])
    assert lora["lora"] == 2 * 2 * 16 * (64 + 64 + 64 + 32) * 50
    step = gm.train_flops(config, [30, 20], 7, 16, ["q_proj", "v_proj"])
    assert step == 2 * lora["linear"] + 3 * lora["lora"] + 3 * lora["attention"] + 2 * lora["lm_head"]
    # packed records attend only to themselves: fewer attention pairs than one 50-token record
    assert lora["attention"] < gm.flop_parts(config, [50], 7)["attention"]


def test_longest_fitting_doubles_then_bisects_to_the_resolution():
    gm = _gpu_metrics()
    found = gm.longest_fitting(lambda n: n <= 5000, start=1024, cap=65536, resolution=256)
    assert 5000 - 256 < found["longest"] <= 5000 and not found["capped"]
    assert [n for n in found["tried"] if n <= 4096] == [1024, 2048, 4096] and found["tried"][8192] is False
    assert gm.longest_fitting(lambda n: True, start=1024, cap=8192) == {
        "longest": 8192, "capped": True, "tried": {1024: True, 2048: True, 4096: True, 8192: True}}
    assert gm.longest_fitting(lambda n: n <= 300, start=1024, resolution=256)["longest"] == 256
    assert gm.longest_fitting(lambda n: False, start=1024, resolution=256)["longest"] == 0


def test_gpu_peaks_are_looked_up_by_device_name():
    gm = _gpu_metrics()
    assert gm.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gm.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gm.peak_bf16_flops("NVIDIA A10G") == 70e12 and gm.peak_bf16_flops("NVIDIA A10") == 125e12
    assert gm.peak_bf16_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert gm.peak_bf16_flops("Some Future GPU") is None


@pytest.mark.slow
def test_context_probe_trains_one_record_of_exactly_the_cutoff(tiny_model_dir, shared_data, tmp_path):
    results = _run_both(tiny_model_dir, shared_data, tmp_path, "--cutoff", "300", "--micro-batch", "1",
                        "--steps", "2", "--warmup", "0", "--records", "2", "--context-probe", "--vram-cap-gb", "24",
                        "--no-split")
    for r in results.values():
        assert r["fits"] is True and r["step_tokens"] == [300, 300]
        assert r["model_tflops_per_s"] > 0 and len(r["step_flops"]) == 2 and "mfu" not in r  # no GPU, no MFU
    assert results["baseline"]["step_flops"] == results["alpaca_lora"]["step_flops"]
