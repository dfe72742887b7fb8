"""The benchmark compares like with like: both recipes see the same probe batch and get the same loss."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_worker.py"


@pytest.mark.slow
def test_baseline_and_alpaca_lora_agree_on_the_probe_batch(tiny_model_dir, shared_data, tmp_path):
    results = {}
    for recipe in ("baseline", "alpaca_lora"):
        out = tmp_path / f"{recipe}.json"
        subprocess.run([sys.executable, str(WORKER), "--recipe", recipe, "--model-dir", str(tiny_model_dir),
                        "--data-dir", str(shared_data), "--cutoff", "256", "--micro-batch", "4", "--steps", "2",
                        "--records", "24", "--out", str(out)], check=True, capture_output=True, timeout=300)
        results[recipe] = json.loads(out.read_text())
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
    first = {"step_s": [9.0, 1.0, 2.0], "step_tokens": [10, 10, 10], "warmup": 1, "peak_rss_mb": 500.0,
             "rss_start_mb": 100.0, "probe_loss": 1.0, "probe_label_tokens": 3}
    second = {**first, "step_s": [9.0, 4.0, 5.0], "peak_rss_mb": 700.0, "rss_start_mb": 120.0}
    pooled = bench_train.pooled([first, second])
    # rates 10, 5, 2.5, 2 tokens/s after the warm-up steps: the median is 3.75; warm-up steps never count
    assert pooled["median_tokens_per_s"] == pytest.approx(3.75)
    assert pooled["peak_rss_mb"] == 700.0 and pooled["repeats"] == 2 and pooled["rss_start_mb"] == 110.0
