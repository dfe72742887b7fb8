"""The benchmark compares like with like: both recipes see the same probe batch and get the same loss."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_worker.py"


def _run_both(model_dir, data_dir, tmp_path, *args: str,
              recipes: tuple[str, ...] = ("baseline", "alpaca_lora")) -> dict[str, dict]:
    """Run bench_worker.py for each of ``recipes`` with ``args``; return each recipe's JSON result."""
    results = {}
    for recipe in recipes:
        out = tmp_path / f"{recipe}.json"
        proc = subprocess.run([sys.executable, str(WORKER), "--recipe", recipe, "--model-dir", str(model_dir),
                               "--data-dir", str(data_dir), *args, "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{recipe}: {proc.stderr[-3000:]}"
        results[recipe] = json.loads(out.read_text())
    return results


def _benchmark_module(name: str):
    """Import ``benchmarks/<name>.py`` (the folder is not a package)."""
    import importlib

    sys.path.insert(0, str(WORKER.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(WORKER.parent))


def _bench_train():
    return _benchmark_module("bench_train")


@pytest.mark.slow
def test_all_recipes_agree_on_the_probe_batch(tiny_model_dir, shared_data, tmp_path):
    """Trainer + peft, TRL padded and packed, and alpaca_lora (fp32): one probe loss, the same label tokens."""
    results = _run_both(tiny_model_dir, shared_data, tmp_path, "--cutoff", "256", "--micro-batch", "4",
                        "--steps", "2", "--records", "24", "--compute-dtype", "float32", "--no-split",
                        recipes=("baseline", "trl", "trl_packed", "alpaca_lora"))
    base, ours = results["baseline"], results["alpaca_lora"]
    print({r: (v["probe_loss"], v["step_tokens"], v["median_tokens_per_s"]) for r, v in results.items()})
    for recipe, r in results.items():
        assert r["probe_label_tokens"] == base["probe_label_tokens"] > 0, recipe
        assert abs(r["probe_loss"] - base["probe_loss"]) < 1e-4, recipe
        assert r["compute_dtype_resolved"] == "float32" and r["steps_timed"] == 1, recipe
        assert r["median_tokens_per_s"] > 0 and r["peak_rss_mb"] > r["rss_start_mb"], recipe
    # the same micro-batches in the same order: the same real tokens per step, the same FLOPs
    assert base["step_tokens"] == ours["step_tokens"] == results["trl"]["step_tokens"]
    assert base["step_flops"] == results["trl"]["step_flops"] == ours["step_flops"]
    assert results["trl"]["config"]["gradient_checkpointing"] is True and not results["trl"]["config"]["packing"]
    # TRL's packed rows: up to 4 x 256 real tokens a step, more than the padded micro-batches hold, no FLOP counts
    packed = results["trl_packed"]
    assert packed["config"]["packing_strategy"] == "bfd" and packed["step_flops"] is None
    assert all(0 < n <= 4 * 256 for n in packed["step_tokens"]) and sum(packed["step_tokens"]) > sum(
        base["step_tokens"])


@pytest.mark.slow
def test_alpaca_lora_auto_dtype_is_finetune_default(tiny_model_dir, shared_data, tmp_path):
    import torch

    from alpaca_lora.model.load import resolve_compute_dtype

    ours = _run_both(tiny_model_dir, shared_data, tmp_path, "--cutoff", "128", "--micro-batch", "2",
                     "--steps", "1", "--warmup", "0", "--records", "8", "--no-split", recipes=("alpaca_lora",))
    expected = str(resolve_compute_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert ours["alpaca_lora"]["compute_dtype_resolved"] == expected


def _pool(tokens_per_s: float, peak: float, probe: float, dtype: str = "float32", tflops: float | None = 0.1):
    return {"median_tokens_per_s": tokens_per_s, "peak_rss_mb": peak, "rss_start_mb": 100.0, "probe_loss": probe,
            "probe_label_tokens": 50, "model_tflops_per_s": tflops, "mfu": None, "compute_dtype_resolved": dtype,
            "repeats": 2}


def test_headline_judges_each_target_against_the_faster_trl_configuration():
    bt = _bench_train()
    pools = {"baseline": _pool(100, 4000, 2.0), "trl": _pool(90, 6000, 2.0), "trl_packed": _pool(120, 7000, 2.0),
             "alpaca_lora": _pool(310, 2000, 2.00005, tflops=0.1)}
    runs = {r: [p] for r, p in pools.items()}
    h = bt.headline("smollm2-135m", 512, 4, 2, pools, runs, {"float32": 180.0, "bfloat16": 400.0})
    assert h["trl_best"] == "trl_packed"
    assert h["vs"]["trl_packed"]["tokens_per_s_ratio"] == pytest.approx(310 / 120)
    assert h["vs"]["trl_packed"]["peak_ratio"] == pytest.approx(2000 / 7000)
    assert h["alpaca_lora_fraction_of_matmul_peak"] == pytest.approx(100 / 180)
    assert h["targets"] == {"tokens_per_s_vs_trl_best >= 2.5": True, "peak_memory_vs_trl_best <= 0.4": True,
                            "tokens_per_s_vs_baseline >= 2.5": True, "probe losses within 0.0001": True,
                            "model FLOP/s >= 50% of the float32 matmul peak": True}
    # a slower run, memory over 0.4x, a probe loss off by more than fp32's tolerance: each target fails on its own
    pools["alpaca_lora"] = _pool(280, 3000, 2.001, tflops=0.05)
    h = bt.headline("smollm2-135m", 512, 4, 2, pools, runs, {"float32": 180.0, "bfloat16": 400.0})
    assert h["targets"] == {"tokens_per_s_vs_trl_best >= 2.5": False, "peak_memory_vs_trl_best <= 0.4": False,
                            "tokens_per_s_vs_baseline >= 2.5": True, "probe losses within 0.0001": False,
                            "model FLOP/s >= 50% of the float32 matmul peak": False}
    # bf16 (the default on a CPU with native bf16): the bf16 tolerance and the 25% goal against the bf16 peak
    pools["alpaca_lora"] = _pool(310, 2000, 2.01, dtype="bfloat16", tflops=0.12)
    h = bt.headline("smollm2-135m", 512, 4, 2, pools, runs, {"float32": 180.0, "bfloat16": 400.0})
    assert h["targets"][f"probe losses within {bt.BF16_PROBE_TOLERANCE:g}"] is True
    assert h["targets"]["model FLOP/s >= 25% of the bfloat16 matmul peak"] is True
    # without TRL (not installed, or its runs failed): no TRL targets, no invented figures
    del pools["trl"], pools["trl_packed"]
    h = bt.headline("smollm2-135m", 512, 4, 2, pools, runs, None)
    assert "trl_best" not in h and not any("trl" in t for t in h["targets"]) and set(h["vs"]) == {"baseline"}


def test_memory_growth_tells_linear_from_quadratic():
    bt = _bench_train()
    lengths = [512, 1024, 2048, 4096, 8192]
    linear = bt.memory_growth(lengths, [900 + 0.05 * n for n in lengths])
    quadratic = bt.memory_growth(lengths, [900 + 1e-5 * n * n for n in lengths])
    assert linear == pytest.approx(7680 / 3584) and quadratic == pytest.approx((8192**2 - 512**2) / (4096**2 - 512**2))
    assert bt.memory_growth(lengths[:2], [1.0, 2.0]) is None and bt.memory_growth(lengths[:3], [5.0, 5.0, 6.0]) is None


def test_matmul_peak_is_measured_for_both_cpu_dtypes():
    peaks = _bench_train().matmul_peak_gflops(sizes=(128, 256), reps=2)
    assert set(peaks) == {"float32", "bfloat16"} and all(v > 0.1 for v in peaks.values())


def test_repeated_runs_pool_their_timed_steps_and_keep_the_highest_peak():
    bench_train = _bench_train()
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
    return _benchmark_module("gpu_metrics")


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
