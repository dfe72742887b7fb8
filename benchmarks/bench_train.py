"""Training speed and memory: alpaca_lora.finetune against the baseline recipe, side by side.

Usage::

    python benchmarks/bench_train.py --quick          # ~10 minutes on a 2-core CPU
    python benchmarks/bench_train.py                  # the full sweeps (an hour or more on a CPU)
    python benchmarks/bench_train.py --gpu            # CUDA: 1B-class shape, bf16, cutoff 2048 (a few minutes)
    python benchmarks/bench_train.py --gpu --plan     # print what --gpu would run, run nothing

Every configuration runs in a fresh process (``bench_worker.py``), baseline and alpaca_lora back to
back (the headline pair two or three times, alternating, pooled), on the same random-init weights
(saved once per model shape), the same real records from ``../shared/data`` (GSM8K + GPTeacher
roleplay + toolformer, shuffled), the same SmolLM2 tokenizer,
``cutoff_len``, micro-batch, LoRA r16/alpha32/dropout 0.05 on q,k,v,o and ``train_on_inputs=False``.
The baseline is transformers ``Trainer`` + peft + bitsandbytes NF4 (double quant) with
``prepare_model_for_kbit_training`` and ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``.

Reported per run: non-padding tokens/s (median over the steps after warm-up), peak RSS (CPU) or
peak allocated VRAM (CUDA), the loss of both recipes on the same probe batch before training (same
math, so they must agree) and its label-token count, the step split between the model body and
lm_head + loss (first pair only), and achieved model FLOP/s (``gpu_metrics.train_flops``). On CUDA
also MFU (against the GPU's dense bf16 peak) and, for each recipe, the longest single record that
trains under a 24 GB cap (``torch.cuda.set_per_process_memory_fraction``).
Results: ``benchmarks/results/bench_<mode>.json`` and ``.png``.

``--gpu`` is the GPU check's plan (``benchmarks/gpu_check.sh``): the headline pair once on a
random-init Llama-3.2-1B body with SmolLM2's vocabulary (1.07 B parameters), ``compute_dtype``
bfloat16 for both recipes, ``cutoff_len`` 2048, micro-batch 8, then the longest context of each
under 24 GB among 8k to 128k tokens, four capped probes at a time, within ``--time-budget``; no
ablations or sweeps. A failed run there is recorded in the JSON (``errors``) instead of ending the
benchmark. ``--data FILE`` (a JSON list of Alpaca records) replaces ``../shared/data``, and
``--base DIR`` (any folder with SmolLM2's tokenizer and config.json, weights not needed) replaces
``default_base_model()``, for machines without them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = HERE.parent.parent / "shared" / "data"
# The worker's data arguments; main() points them at --data FILE when given.
DATA_ARGS = ["--data-dir", str(DATA)]
RUN_TIMEOUT_S: float | None = None  # a worker running longer fails (set by --gpu)
REFERENCES = ("baseline", "trl", "trl_packed")  # Trainer + peft; TRL's SFTTrainer padded and packed (BFD)
RECIPES = (*REFERENCES, "alpaca_lora")
LABELS = {"baseline": "Trainer + peft", "trl": "TRL SFTTrainer (padded)", "trl_packed": "TRL SFTTrainer (packed, BFD)",
          "alpaca_lora": "alpaca_lora"}
# A bf16 run's probe loss against fp32 references (alpaca_lora's default on a CPU with AMX): bf16 keeps 8
# bits of mantissa, so each product carries a relative error near 2^-9; 0.05 on a loss near 11 is 0.5%.
BF16_PROBE_TOLERANCE = 0.05

# name -> LlamaConfig overrides (vocabulary and tokenizer are SmolLM2's for both)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "smollm2-135m": {},  # the embedded base's own config
    # Llama-3.2-1B's body (16 layers, hidden 2048, MLP 8192, 32 query and 8 key/value heads of 64) with
    # SmolLM2's 49,152-token vocabulary, tied embeddings: 1.07 B parameters, saved in bf16.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, max_position_embeddings=131072),
}
SAVE_BF16 = {"llama-1b"}  # half the file to write and load; both recipes load it in their compute dtype


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for mod in ("transformers", "peft", "bitsandbytes"):
        info[mod] = __import__(mod).__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        info["cuda"] = torch.version.cuda
    return info


def shape_config(shape: str, base: Path):
    """The LlamaConfig of ``shape``: the base's config (SmolLM2's) with the shape's overrides."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    return config


def build_model(shape: str, cache: Path, base: Path | None = None) -> Path:
    """Random-init Llama of ``shape`` saved once (safetensors), with SmolLM2's tokenizer.

    ``base`` is the folder the config and tokenizer come from (default: ``default_base_model()``).
    Shapes in ``SAVE_BF16`` are initialised on the GPU when there is one and saved in bf16.
    """
    folder = cache / shape
    if list(folder.glob("*.safetensors")):
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if base is None:
        from alpaca_lora import default_base_model

        base = default_base_model()
    config = shape_config(shape, base)
    torch.manual_seed(0)
    big = shape in SAVE_BF16
    with torch.device("cuda" if big and torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    if big:
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def run_one(recipe: str, model_dir: Path, cutoff: int, mb: int, steps: int, warmup: int,
            sets: list[str], tag: str, scratch: Path, split: bool = False, extra: tuple[str, ...] = (),
            quiet: bool = False, records: int | None = None) -> dict:
    """Run one configuration in a fresh process and return its JSON result."""
    out = scratch / (tag.replace("/", "_").replace(" ", "_").replace("=", "-") + ".json")
    out.unlink(missing_ok=True)
    records = records or max(64, mb * (steps + 2))
    cmd = [sys.executable, str(HERE / "bench_worker.py"), "--recipe", recipe, "--model-dir", str(model_dir),
           *DATA_ARGS, "--cutoff", str(cutoff), "--micro-batch", str(mb), "--steps", str(steps),
           "--warmup", str(warmup), "--records", str(records), "--out", str(out), *extra]
    for s in sets:
        cmd += ["--set", s]
    if not split:
        cmd.append("--no-split")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        tail = "\n".join(str(exc.stderr or exc.stdout or "").splitlines()[-15:])
        raise SystemExit(f"{tag} failed (timed out after {RUN_TIMEOUT_S:g} s):\n{tail}") from None
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise SystemExit(f"{tag} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    result["tag"] = tag
    if quiet:
        return result
    print(f"  {tag:<44} {result['median_tokens_per_s']:8.1f} tok/s  peak {peak_mb(result):7.0f} MB  "
          f"probe {result['probe_loss']:.6f} ({result['probe_label_tokens']} labels)  "
          + (f"{result['model_tflops_per_s'] * 1e3:6.1f} GFLOP/s" if result.get("model_tflops_per_s") else "")
          + (f"  MFU {result['mfu']:.1%}" if result.get("mfu") else "")
          + f"  {time.perf_counter() - start:5.0f} s", flush=True)
    return result


def longest_context(recipe: str, model_dir: Path, scratch: Path, cap_gb: float = 24.0) -> dict:
    """CUDA: the longest single record (micro-batch 1) whose training step fits under ``cap_gb`` of VRAM."""
    from gpu_metrics import longest_fitting

    def fits(n: int) -> bool:
        r = run_one(recipe, model_dir, n, 1, 2, 0, [], f"context/{recipe} {n}", scratch,
                    extra=("--context-probe", "--vram-cap-gb", str(cap_gb)), quiet=True)
        print(f"  {recipe} at {n} tokens under {cap_gb:g} GB: {'fits' if r['fits'] else 'out of memory'}", flush=True)
        return r["fits"]

    return {"cap_gb": cap_gb, **longest_fitting(fits)}


def context_ladder(recipes: tuple[str, ...], model_dir: Path, scratch: Path, lengths: list[int], workers: int,
                   cap_gb: float = 24.0, extra: tuple[str, ...] = (), deadline: float | None = None) -> dict:
    """CUDA, for the GPU check: each recipe's longest record among ``lengths`` that trains under ``cap_gb``.

    The probes run ``workers`` at a time, each in its own process capped at ``cap_gb``
    (``set_per_process_memory_fraction``), so they share the GPU without changing each other's
    answer; the GPU must hold ``workers x cap_gb``. Lengths start shortest first, and once one fails
    for a recipe its longer ones are not started (memory grows with length). No probe starts after
    ``deadline`` (a ``time.perf_counter()`` value): then ``complete`` is False.

    Returns:
        ``{recipe: {"cap_gb", "longest" (0: none fitted), "capped" (the longest length fitted),
        "complete", "tried": {length: fitted}, "error" (only if a probe failed otherwise)}}``.

    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    todo = [(n, r) for n in sorted(lengths) for r in recipes]
    tried: dict[str, dict[int, bool]] = {r: {} for r in recipes}
    failed: dict[str, int | None] = dict.fromkeys(recipes)
    errors: dict[str, str] = {}
    running: dict = {}
    with ThreadPoolExecutor(workers) as pool:
        while todo or running:
            while todo and len(running) < workers and (deadline is None or time.perf_counter() < deadline):
                n, r = todo.pop(0)
                if (failed[r] is None or n < failed[r]) and r not in errors:
                    running[pool.submit(run_one, r, model_dir, n, 1, 2, 0, [], f"context/{r} {n}", scratch,
                                        extra=("--context-probe", "--vram-cap-gb", str(cap_gb), *extra), quiet=True,
                                        records=4)] = (n, r)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                n, r = running.pop(future)
                try:
                    fits = bool(future.result()["fits"])
                except SystemExit as exc:  # a probe that failed other than by running out of memory
                    errors[r] = str(exc)
                    print(f"  {r} at {n} tokens: failed ({str(exc).splitlines()[0]})", flush=True)
                    continue
                tried[r][n] = fits
                if not fits:
                    failed[r] = n if failed[r] is None else min(failed[r], n)
                print(f"  {r} at {n} tokens under {cap_gb:g} GB: {'fits' if fits else 'out of memory'}", flush=True)
    out = {}
    for r in recipes:
        limit = failed[r] if failed[r] is not None else float("inf")
        needed = [n for n in lengths if n < limit]  # the lengths that decide the answer
        out[r] = {"cap_gb": cap_gb, "longest": max((n for n, ok in tried[r].items() if ok and n < limit), default=0),
                  "capped": failed[r] is None and all(tried[r].get(n) for n in lengths),
                  "complete": r not in errors and all(n in tried[r] for n in needed), "tried": tried[r]}
        if r in errors:
            out[r]["error"] = errors[r]
    return out


def peak_mb(result: dict) -> float:
    """The peak that the memory target is about: allocated VRAM on a GPU, RSS on a CPU."""
    return result.get("peak_vram_mb") or result["peak_rss_mb"]


def compare(base: dict, ours: dict) -> dict:
    """Ratios of one baseline/alpaca_lora pair measured in the same run."""
    return {"tokens_per_s_ratio": ours["median_tokens_per_s"] / base["median_tokens_per_s"],
            "peak_ratio": peak_mb(ours) / peak_mb(base),
            "peak_rss_ratio": ours["peak_rss_mb"] / base["peak_rss_mb"],
            "peak_rss_above_start_ratio": (ours["peak_rss_mb"] - ours["rss_start_mb"])
            / (base["peak_rss_mb"] - base["rss_start_mb"]),
            "probe_loss_abs_diff": abs(ours["probe_loss"] - base["probe_loss"]),
            "same_label_tokens": ours["probe_label_tokens"] == base["probe_label_tokens"]}


def pooled(results: list[dict]) -> dict:
    """One recipe's repeated runs as one: the median tokens/s over all their timed steps, the highest peak."""
    rates = [n / t for r in results for t, n in zip(r["step_s"][r["warmup"]:], r["step_tokens"][r["warmup"]:],
                                                    strict=True)]
    # A run whose micro-batches are not the shared order (TRL's packed rows) has no FLOP counts.
    flops = [f / t for r in results if r.get("step_flops")
             for t, f in zip(r["step_s"][r["warmup"]:], r["step_flops"][r["warmup"]:], strict=True)]
    peak = results[0].get("peak_bf16_tflops")
    return {**results[0], "median_tokens_per_s": statistics.median(rates),
            "model_tflops_per_s": statistics.median(flops) / 1e12 if flops else None,
            "mfu": statistics.median(flops) / (peak * 1e12) if peak and flops else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "peak_vram_mb": max((r.get("peak_vram_mb") or 0.0) for r in results) or None,
            "rss_start_mb": statistics.median(r["rss_start_mb"] for r in results), "repeats": len(results)}


def headline(shape: str, cutoff: int, mb: int, repeats: int, pools: dict[str, dict], runs_of: dict[str, list[dict]],
             matmul_peak: dict | None) -> dict:
    """The headline figures: every recipe's pooled runs, alpaca_lora's ratios to each reference, the targets.

    ``pools`` maps recipe -> :func:`pooled` result (references that failed are absent); ``matmul_peak``
    is :func:`matmul_peak_gflops`'s figures on a CPU (None on a GPU, where MFU is reported instead).
    """
    ours, base = pools["alpaca_lora"], pools["baseline"]
    out = {"shape": shape, "cutoff": cutoff, "micro_batch": mb, "repeats": repeats,
           "baseline_tokens_per_s": base["median_tokens_per_s"],
           "alpaca_lora_tokens_per_s": ours["median_tokens_per_s"],
           "baseline_peak_rss_mb": base["peak_rss_mb"], "alpaca_lora_peak_rss_mb": ours["peak_rss_mb"],
           "baseline_model_tflops_per_s": base["model_tflops_per_s"],
           "alpaca_lora_model_tflops_per_s": ours["model_tflops_per_s"],
           "baseline_mfu": base["mfu"], "alpaca_lora_mfu": ours["mfu"],
           "baseline_peak_vram_mb": base.get("peak_vram_mb"), "alpaca_lora_peak_vram_mb": ours.get("peak_vram_mb"),
           "alpaca_lora_compute_dtype": ours.get("compute_dtype_resolved"),
           "pair_tokens_per_s_ratios": [compare(b, o)["tokens_per_s_ratio"]
                                        for b, o in zip(runs_of["baseline"], runs_of["alpaca_lora"], strict=False)],
           **compare(base, ours)}
    out["recipes"] = {recipe: {"tokens_per_s": p["median_tokens_per_s"], "peak_mb": peak_mb(p),
                               "peak_rss_mb": p["peak_rss_mb"], "probe_loss": p["probe_loss"],
                               "probe_label_tokens": p["probe_label_tokens"],
                               "model_tflops_per_s": p.get("model_tflops_per_s"),
                               "compute_dtype": p.get("compute_dtype_resolved"), "config": p.get("config"),
                               "repeats": p["repeats"]}
                      for recipe, p in pools.items()}
    out["vs"] = {recipe: compare(p, ours) for recipe, p in pools.items() if recipe != "alpaca_lora"}
    trl = [r for r in ("trl", "trl_packed") if r in pools]
    targets: dict = {}
    if trl:
        best = max(trl, key=lambda r: pools[r]["median_tokens_per_s"])
        out["trl_best"] = best
        targets["tokens_per_s_vs_trl_best >= 2.5"] = out["vs"][best]["tokens_per_s_ratio"] >= 2.5
        targets["peak_memory_vs_trl_best <= 0.4"] = out["vs"][best]["peak_ratio"] <= 0.4
    targets["tokens_per_s_vs_baseline >= 2.5"] = out["tokens_per_s_ratio"] >= 2.5
    dtype = ours.get("compute_dtype_resolved")
    tolerance = 1e-4 if dtype == "float32" else BF16_PROBE_TOLERANCE
    out["probe_loss_tolerance"] = tolerance
    targets[f"probe losses within {tolerance:g}"] = all(v["probe_loss_abs_diff"] <= tolerance and v["same_label_tokens"]
                                                         for v in out["vs"].values())
    if matmul_peak and dtype in matmul_peak and ours.get("model_tflops_per_s"):
        fraction = ours["model_tflops_per_s"] * 1e3 / matmul_peak[dtype]
        out["alpaca_lora_fraction_of_matmul_peak"] = fraction
        goal = 0.5 if dtype == "float32" else 0.25
        targets[f"model FLOP/s >= {goal:.0%} of the {dtype} matmul peak"] = fraction >= goal
    out["targets"] = targets
    return out


def matmul_peak_gflops(sizes: tuple[int, ...] = (1024, 2048, 3072), reps: int = 5) -> dict[str, float]:
    """This CPU's matrix-product peak in GFLOP/s at torch's thread count, per dtype (fp32 and bf16).

    The best size's median over ``reps`` products of square matrices, through ``torch.mm`` (MKL for
    fp32 on x86 wheels) and through oneDNN's linear where the build has it (``cpu_matmul="auto"``
    takes it when faster): the ceiling that the model FLOP/s of a training step is judged against.
    """
    import torch

    from alpaca_lora.kernels.cpu_matmul import onednn_available

    products = [torch.mm]
    if onednn_available():
        products.append(lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            for product in products:
                product(a, b)  # warm-up
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    product(a, b)
                    times.append(time.perf_counter() - start)
                best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
        out[str(dtype).removeprefix("torch.")] = best
    return out


CONTEXT_PLAN = {"shapes": {"tiny": (4, 1), "smollm2-135m": (2, 1)},  # shape -> (steps, warm-up steps)
                "lengths": [512, 1024, 2048, 4096, 8192], "recipes": ("baseline", "trl", "alpaca_lora")}


def memory_growth(lengths: list[int], peaks: list[float]) -> float | None:
    """How peak memory grows over the last doubling: ``(peak(L) - peak(L0)) / (peak(L/2) - peak(L0))``.

    ``L0`` is the shortest length. Linear growth gives ``(L - L0) / (L/2 - L0)`` (2.14 for 512 .. 8192),
    quadratic ``(L² - L0²) / ((L/2)² - L0²)`` (4.06): the figure tells the two apart whatever the fixed cost.
    """
    if len(lengths) < 3:
        return None
    below = peaks[-2] - peaks[0]
    return (peaks[-1] - peaks[0]) / below if below > 0 else None


def context_sweep(cache: Path, base: Path | None, scratch: Path, report: dict, save) -> None:
    """``--context``: tokens/s and peak memory of each recipe on one record of 512 .. 8192 tokens (micro-batch 1).

    Every length is a fresh process per recipe, training records of exactly that many tokens
    (``--context-probe``). A run that fails (out of memory, say) is recorded in ``errors`` and the
    recipe's longer lengths are skipped.
    """
    lengths = CONTEXT_PLAN["lengths"]
    report["context"] = {}
    for shape, (steps, warmup) in CONTEXT_PLAN["shapes"].items():
        model_dir = build_model(shape, cache, base)
        rows: dict[str, list[dict]] = {r: [] for r in CONTEXT_PLAN["recipes"]}
        report["context"][shape] = {"lengths": lengths, "steps": steps, "warmup": warmup, "recipes": rows}
        print(f"context sweep on {shape}: lengths {lengths}, micro-batch 1, {steps} steps ({warmup} warm-up)")
        failed: set[str] = set()
        for n in lengths:
            for recipe in CONTEXT_PLAN["recipes"]:
                if recipe in failed:
                    continue
                try:
                    r = run_one(recipe, model_dir, n, 1, steps, warmup, [], f"context/{shape}/{recipe} {n}", scratch,
                                extra=("--context-probe",), records=steps + 1)
                except SystemExit as exc:
                    print(exc, flush=True)
                    report["errors"].append(str(exc))
                    failed.add(recipe)
                    continue
                report["runs"].append(r)
                rows[recipe].append({"length": n, "tokens_per_s": r["median_tokens_per_s"],
                                     "peak_rss_mb": r["peak_rss_mb"], "rss_start_mb": r["rss_start_mb"],
                                     "model_tflops_per_s": r.get("model_tflops_per_s"), "fits": r.get("fits")})
                save()
        for recipe, found in rows.items():
            done = [row for row in found if row.get("fits")]
            report["context"][shape].setdefault("memory_growth_last_doubling", {})[recipe] = memory_growth(
                [row["length"] for row in done], [row["peak_rss_mb"] for row in done])
        save()


def plot_context(report: dict, path: Path) -> None:
    """Tokens/s and peak RSS against the record length, one row of two panels per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = report["context"]
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4 * len(shapes)), squeeze=False)
    for row, (shape, found) in zip(axes, shapes.items(), strict=True):
        for recipe, points in found["recipes"].items():
            xs = [p["length"] for p in points]
            row[0].plot(xs, [p["tokens_per_s"] for p in points], "o-", label=LABELS[recipe])
            row[1].plot(xs, [p["peak_rss_mb"] for p in points], "o-", label=LABELS[recipe])
        for ax, what in zip(row, ("tokens/s (median)", "peak RSS (MB)"), strict=True):
            if ax is row[0]:
                ax.set_xscale("log", base=2)
            else:  # a linear axis: linear growth in the length is a straight line
                ax.set_xticks(found["lengths"][1:])
            ax.set_xlabel("record length (tokens), micro-batch 1")
            ax.set_ylabel(what)
            ax.set_title(f"{shape}: {what}")
            ax.legend()
    machine = report["machine"]
    fig.suptitle(f"{machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plan(mode: str) -> dict:
    """The configurations of ``mode`` ("quick", "full" or "gpu"): headline, ablations and sweeps."""
    if mode == "gpu":
        # Real records are mostly under 1k tokens: cutoff 2048 truncates few, micro-batch 8 holds ~2.5k tokens.
        return {"steps": 12, "warmup": 3, "headline": ("llama-1b", 2048, 8), "repeats": 1,
                "compute_dtype": "bfloat16", "ablations": [], "sweep_shape": None, "seq": [], "mb": [],
                "sweep_steps": 0, "context_ladder": [8192, 16384, 32768, 49152, 65536, 98304, 131072],
                "context_workers": 4}
    if mode == "quick":
        return {"steps": 8, "warmup": 2, "headline": ("smollm2-135m", 512, 4), "repeats": 2,
                "ablations": [["compute_dtype=float32"], ["cpu_matmul=blas"], ["fused_lora=false"], ["packing=false"],
                              ["packing=false", "group_by_length=true"]],
                "sweep_shape": "tiny", "seq": [128, 512, 1024], "mb": [1, 4, 8], "sweep_steps": 6}
    return {"steps": 8, "warmup": 2, "headline": ("smollm2-135m", 512, 4), "repeats": 3,
            "ablations": [["compute_dtype=float32"], ["cpu_matmul=blas"], ["fused_lora=false"], ["packing=false"],
                          ["packing=false", "group_by_length=true"], ["release_cpu_memory=true"],
                          ["gradient_checkpointing=false"], ["loss_chunk_size=256"]],
            "sweep_shape": "smollm2-135m", "seq": [128, 256, 512, 1024], "mb": [1, 2, 4, 8], "sweep_steps": 5}


def print_plan(mode: str, cfg: dict, data: str, base: Path | None) -> None:
    """``--plan``: what the mode would run, with each shape's parameter count (built on the meta device)."""
    import torch
    from transformers import LlamaForCausalLM

    if base is None:
        from alpaca_lora import default_base_model

        base = default_base_model()
    shape, cutoff, mb = cfg["headline"]
    print(f"mode {mode}: data {data}, base (tokenizer, config) {base}")
    for name in dict.fromkeys(s for s in (shape, cfg["sweep_shape"]) if s):
        config = shape_config(name, base)
        with torch.device("meta"):
            n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        print(f"  shape {name}: {n / 1e9:.3f} B parameters, {config.num_hidden_layers} layers, hidden "
              f"{config.hidden_size}, MLP {config.intermediate_size}, heads {config.num_attention_heads}/"
              f"{config.num_key_value_heads}, vocab {config.vocab_size}")
    records = max(64, mb * (cfg["steps"] + 2))
    print(f"  headline: {shape}, cutoff {cutoff}, micro-batch {mb}, {cfg['steps']} steps ({cfg['warmup']} warm-up), "
          f"{records} records, {cfg['repeats']} x ({', '.join(RECIPES)}), compute dtype "
          f"{cfg.get('compute_dtype', 'auto')}")
    for sets in cfg["ablations"]:
        print(f"  ablation: alpaca_lora {' '.join(sets)}")
    if cfg["sweep_shape"]:
        print(f"  sweeps on {cfg['sweep_shape']}: cutoff {cfg['seq']} at micro-batch 4, micro-batch {cfg['mb']} at "
              f"cutoff 512, {cfg['sweep_steps']} steps")
    ladder = cfg.get("context_ladder")
    print("  on CUDA: longest context of each recipe under 24 GB, micro-batch 1, "
          + (f"lengths {ladder}, {cfg['context_workers']} probes at a time" if ladder
             else "from 1024 tokens doubling, then bisecting to 256"))


def main() -> None:
    global RUN_TIMEOUT_S
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the headline pair twice, four ablations, sweeps on the tiny shape")
    p.add_argument("--gpu", action="store_true",
                   help="CUDA: the 1B-class headline pair in bf16 at cutoff 2048 and the longest context under 24 GB")
    p.add_argument("--context", action="store_true",
                   help="the long-context sweep: one record of 512 .. 8192 tokens, tiny and 135M shapes, "
                        "Trainer + peft, TRL and alpaca_lora")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "alpaca_lora" / "bench-models")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/bench_<mode>.json)")
    p.add_argument("--data", type=Path, default=None,
                   help="a JSON list of Alpaca records to train on (default: the three files in ../shared/data)")
    p.add_argument("--base", type=Path, default=None,
                   help="folder with SmolLM2's tokenizer and config.json (default: alpaca_lora.default_base_model())")
    p.add_argument("--time-budget", type=float, default=None,
                   help="--gpu: seconds from the start after which no longest-context probe starts (default: none)")
    p.add_argument("--plan", action="store_true", help="print what the mode would run, and exit")
    args = p.parse_args()
    if args.quick + args.gpu + args.context > 1:
        p.error("--quick, --gpu and --context are three plans: pass one")
    mode = "gpu" if args.gpu else "quick" if args.quick else "context" if args.context else "full"
    cfg = plan("quick" if mode == "context" else mode)
    if args.data is not None:
        if not args.data.is_file():
            p.error(f"--data {args.data}: no such file")
        n = len(json.loads(args.data.read_text(encoding="utf-8")))
        need = max(64, cfg["headline"][2] * (cfg["steps"] + 2))  # run_one's record count for the headline
        if n < need:
            p.error(f"--data {args.data}: {n} records, the plan needs {need}")
        DATA_ARGS[:] = ["--data-dir", str(args.data.resolve().parent), "--data-files", args.data.name]
    data_source = str(args.data.resolve() if args.data else DATA)
    if args.plan:
        if mode == "context":
            print(f"mode context: {CONTEXT_PLAN}")
        else:
            print_plan(mode, cfg, data_source, args.base)
        return
    if mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU (torch.cuda.is_available() is False); --plan prints the plan")
        RUN_TIMEOUT_S = 240.0  # a hung worker is recorded as a failure, not waited for
    out_path = args.out or RESULTS / f"bench_{mode}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_path.parent / f".scratch_{mode}"
    scratch.mkdir(exist_ok=True)
    info = machine()
    if not info.get("gpu"):
        info["matmul_peak_gflops"] = matmul_peak_gflops()
        peaks = info["matmul_peak_gflops"]
        print("matrix-product peak (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    report: dict = {"mode": mode, "machine": info, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "data": data_source, "lora": "r16 alpha32 dropout0.05 q,k,v,o",
                    "compute_dtype": cfg.get("compute_dtype", "auto"), "runs": [], "errors": []}
    start = time.perf_counter()
    deadline = start + args.time_budget if args.time_budget else None
    extra = ("--compute-dtype", cfg["compute_dtype"]) if cfg.get("compute_dtype") else ()

    def save() -> None:
        report["wall_s"] = time.perf_counter() - start
        out_path.write_text(json.dumps(report, indent=1))

    def attempt(fn, *a, **k):
        """``fn(*a, **k)``; in the GPU check a failed run is recorded in ``errors`` and None returned."""
        try:
            return fn(*a, **k)
        except SystemExit as exc:
            if mode != "gpu":
                raise
            print(exc, flush=True)
            report["errors"].append(str(exc))
            return None

    if mode == "context":
        context_sweep(args.cache, args.base, scratch, report, save)
        plot_context(report, out_path.with_suffix(".png"))
        for shape, found in report["context"].items():
            for recipe, points in found["recipes"].items():
                growth = found["memory_growth_last_doubling"][recipe] or 0.0
                print(f"{shape} {LABELS[recipe]:<28} " + "  ".join(
                    f"{p['length']}: {p['tokens_per_s']:.0f} tok/s {p['peak_rss_mb']:.0f} MB" for p in points)
                      + f"  memory growth over the last doubling x{growth:.2f}")
        print(f"wrote {out_path} and {out_path.with_suffix('.png')} in {report['wall_s'] / 60:.1f} min")
        return
    shape, cutoff, mb = cfg["headline"]
    model_dir = build_model(shape, args.cache, args.base)
    print(f"headline: {shape}, cutoff {cutoff}, micro-batch {mb}, {cfg['steps']} steps ({cfg['warmup']} warm-up)"
          + (f", compute dtype {cfg['compute_dtype']}" if extra else ""))
    common = dict(model_dir=model_dir, cutoff=cutoff, mb=mb, steps=cfg["steps"], warmup=cfg["warmup"],
                  scratch=scratch, extra=extra)
    # The recipes run several times, alternating, so a slow spell of a shared machine hits all of them.
    runs_of: dict[str, list[dict]] = {recipe: [] for recipe in RECIPES}
    for k in range(cfg["repeats"]):
        suffix = f" #{k + 1}" if k else ""
        for recipe in RECIPES:
            r = attempt(run_one, recipe, sets=[], tag=f"{shape}/{recipe}{suffix}", split=k == 0, **common)
            if r is not None:
                runs_of[recipe].append(r)
                report["runs"].append(r)
            save()
    report["headline"] = None
    report["ablations"] = []
    if runs_of["baseline"] and runs_of["alpaca_lora"]:
        pools = {recipe: pooled(runs) for recipe, runs in runs_of.items() if runs}
        report["headline"] = headline(shape, cutoff, mb, cfg["repeats"], pools, runs_of,
                                      report["machine"].get("matmul_peak_gflops"))
        base = pools["baseline"]
        ablations = [{"change": "none (defaults)", **compare(base, pools["alpaca_lora"])}]
        for sets in cfg["ablations"]:
            r = run_one("alpaca_lora", sets=sets, tag=f"{shape}/alpaca_lora {' '.join(sets)}", **common)
            report["runs"].append(r)
            ablations.append({"change": " ".join(sets), **compare(base, r)})
        report["ablations"] = ablations
    save()
    if report["machine"].get("gpu"):
        print(f"longest context under 24 GB: {shape}, micro-batch 1")
        if cfg.get("context_ladder"):
            report["longest_context"] = context_ladder(("baseline", "trl", "alpaca_lora"), model_dir, scratch,
                                                       cfg["context_ladder"], cfg["context_workers"], extra=extra,
                                                       deadline=deadline)
        else:
            report["longest_context"] = {recipe: longest_context(recipe, model_dir, scratch)
                                         for recipe in ("baseline", "alpaca_lora")}
        save()

    sweeps: dict[str, list] = {"seq": [], "mb": []}
    if cfg["sweep_shape"]:
        shape = cfg["sweep_shape"]
        model_dir = build_model(shape, args.cache, args.base)
        pairs: dict[tuple[int, int], dict] = {}
        for axis, values in (("seq", cfg["seq"]), ("mb", cfg["mb"])):
            print(f"sweep {axis} on {shape}: {values}")
            for v in values:
                c, m = (v, 4) if axis == "seq" else (512, v)
                if (c, m) not in pairs:
                    pairs[c, m] = {recipe: run_one(recipe, model_dir, c, m, cfg["sweep_steps"], 1, [],
                                                   f"{shape}/{recipe} cutoff{c} mb{m}", scratch, extra=extra)
                                   for recipe in ("baseline", "alpaca_lora")}
                    report["runs"] += list(pairs[c, m].values())
                pair = pairs[c, m]
                sweeps[axis].append({"shape": shape, "cutoff": c, "micro_batch": m,
                                     "baseline_tokens_per_s": pair["baseline"]["median_tokens_per_s"],
                                     "alpaca_lora_tokens_per_s": pair["alpaca_lora"]["median_tokens_per_s"],
                                     "baseline_peak_rss_mb": pair["baseline"]["peak_rss_mb"],
                                     "alpaca_lora_peak_rss_mb": pair["alpaca_lora"]["peak_rss_mb"],
                                     **compare(pair["baseline"], pair["alpaca_lora"])})
    report["sweeps"] = sweeps
    save()
    if report["headline"]:
        plot(report, out_path.with_suffix(".png"))
    print_summary(report)
    print(f"wrote {out_path}" + (f" and {out_path.with_suffix('.png')}" if report["headline"] else "")
          + f" in {report['wall_s'] / 60:.1f} min")
    if report["errors"]:
        raise SystemExit(f"{len(report['errors'])} run(s) failed; see 'errors' in {out_path}")


def print_summary(report: dict) -> None:
    h = report["headline"]
    mem = "VRAM" if h and h.get("baseline_peak_vram_mb") else "RSS"
    if not h:
        print("\nno headline pair: " + ("; ".join(f"{e.splitlines()[0]} {e.splitlines()[-1].strip()}"
                                                  for e in report["errors"]) or "no run finished"))
    else:
        print(f"\nheadline ({h['shape']}, cutoff {h['cutoff']}, micro-batch {h['micro_batch']}, "
              f"{h.get('repeats', 1)} alternating pairs, per-pair tokens/s ratios "
              f"{', '.join(f'x{r:.2f}' for r in h.get('pair_tokens_per_s_ratios', []))}): "
              f"tokens/s x{h['tokens_per_s_ratio']:.2f}, peak {mem} x{h['peak_ratio']:.2f} "
              f"(above start x{h['peak_rss_above_start_ratio']:.2f}), probe loss diff "
              f"{h['probe_loss_abs_diff']:.2e}, same label tokens: {h['same_label_tokens']}")
        if h.get("baseline_model_tflops_per_s") and h.get("alpaca_lora_model_tflops_per_s"):
            print(f"model FLOP/s (gpu_metrics.train_flops): baseline {h['baseline_model_tflops_per_s'] * 1e3:.1f} "
                  f"GFLOP/s, alpaca_lora {h['alpaca_lora_model_tflops_per_s'] * 1e3:.1f} GFLOP/s"
                  + (f"; MFU {h['baseline_mfu']:.1%} and {h['alpaca_lora_mfu']:.1%}" if h.get("alpaca_lora_mfu")
                     else ""))
        if h.get("baseline_peak_vram_mb"):
            print(f"peak VRAM: baseline {h['baseline_peak_vram_mb']:,.0f} MB, "
                  f"alpaca_lora {h['alpaca_lora_peak_vram_mb']:,.0f} MB")
        print(f"{'recipe':<30} {'tokens/s':>9} {'peak MB':>8} {'probe loss':>11} {'x tokens/s':>10} {'x peak':>7}")
        for recipe, r in h.get("recipes", {}).items():
            vs = h["vs"].get(recipe)
            print(f"{LABELS[recipe]:<30} {r['tokens_per_s']:9.1f} {r['peak_mb']:8.0f} {r['probe_loss']:11.6f} "
                  + (f"{vs['tokens_per_s_ratio']:10.2f} {vs['peak_ratio']:7.2f}" if vs else f"{'':>10} {'':>7}"))
        if h.get("alpaca_lora_fraction_of_matmul_peak") is not None:
            print(f"alpaca_lora's model FLOP/s: {h['alpaca_lora_fraction_of_matmul_peak']:.0%} of this CPU's "
                  f"{h['alpaca_lora_compute_dtype']} matrix-product peak")
        for target, met in h.get("targets", {}).items():
            print(f"target {target}: {'met' if met else 'NOT met'}")
    for recipe, found in report.get("longest_context", {}).items():
        print(f"longest context under {found['cap_gb']:g} GB, {recipe}: {found['longest']} tokens"
              + (" (the longest tried)" if found["capped"] else "")
              + (f" (a probe failed: {found['error'].splitlines()[0]})" if "error" in found
                 else "" if found.get("complete", True) else " (out of time: the longest that fitted so far)"))
    if report["ablations"]:
        print("ablations (one run each, against the pooled baseline runs):")
        for a in report["ablations"]:
            print(f"  {a['change']:<40} tokens/s x{a['tokens_per_s_ratio']:.2f}  peak {mem} x{a['peak_ratio']:.2f}")
    ratios = [s["tokens_per_s_ratio"] for axis in report["sweeps"].values() for s in axis]
    if ratios:
        print(f"sweeps: median tokens/s ratio x{statistics.median(ratios):.2f}")


def plot(report: dict, path: Path) -> None:
    """Tokens/s against sequence length and micro-batch, and peak memory, for both recipes.

    Without sweeps (``--gpu``): the headline pair's tokens/s and peak memory, with MFU and the longest context.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = report["headline"]
    machine = report["machine"]
    title = (f"{machine.get('gpu') or machine['cpu']}" + ("" if machine.get("gpu") else f" ({machine['cores']} cores)")
             + f", torch {machine['torch']}")
    if not any(report["sweeps"].values()):
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
        names = ["baseline (Trainer + peft)", "alpaca_lora"]
        rates = [h["baseline_tokens_per_s"], h["alpaca_lora_tokens_per_s"]]
        bars = axes[0].barh(names, rates)
        mfus = [h.get("baseline_mfu"), h.get("alpaca_lora_mfu")]
        axes[0].bar_label(bars, [f"{r:,.0f}" + (f"  MFU {m:.1%}" if m else "") for r, m in zip(rates, mfus,
                                                                                                strict=True)])
        axes[0].set_xlabel("non-padding tokens/s (median)")
        axes[0].set_title(f"{h['shape']}, cutoff {h['cutoff']}, micro-batch {h['micro_batch']}: throughput")
        vram = bool(h.get("baseline_peak_vram_mb"))
        peaks = [h["baseline_peak_vram_mb"], h["alpaca_lora_peak_vram_mb"]] if vram else [
            h["baseline_peak_rss_mb"], h["alpaca_lora_peak_rss_mb"]]
        context = report.get("longest_context", {})
        labels = [f"{p:,.0f} MB" + (f"\nlongest context {context[r]['longest']:,}" if "longest" in context.get(r, {})
                                    else "") for p, r in zip(peaks, ("baseline", "alpaca_lora"), strict=True)]
        axes[1].bar_label(axes[1].barh(names, peaks), labels)
        axes[1].set_xlabel("peak VRAM (MB)" if vram else "peak RSS (MB)")
        axes[1].set_title("peak memory; longest record trained under 24 GB")
        for ax in axes:
            ax.margins(x=0.45)
            ax.locator_params(axis="x", nbins=4)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    recipes = h.get("recipes") or {"baseline": {"tokens_per_s": h["baseline_tokens_per_s"],
                                                "peak_mb": h["baseline_peak_rss_mb"]},
                                   "alpaca_lora": {"tokens_per_s": h["alpaca_lora_tokens_per_s"],
                                                   "peak_mb": h["alpaca_lora_peak_rss_mb"]}}
    names = [LABELS[r] for r in recipes]
    rates = [r["tokens_per_s"] for r in recipes.values()]
    base_rate = h["baseline_tokens_per_s"]
    changes = [a for a in report["ablations"] if a["change"] != "none (defaults)"]
    names += [f"alpaca_lora {a['change']}" for a in changes]
    rates += [a["tokens_per_s_ratio"] * base_rate for a in changes]
    axes[0].bar_label(axes[0].barh(names, rates), [f"{r:,.0f}" for r in rates])
    axes[0].invert_yaxis()
    axes[0].set_xlabel("non-padding tokens/s (median)")
    axes[0].set_title(f"{h['shape']}, cutoff {h['cutoff']}, micro-batch {h['micro_batch']}: throughput")
    peaks = [r["peak_mb"] for r in recipes.values()]
    axes[1].bar_label(axes[1].barh([LABELS[r] for r in recipes], peaks), [f"{p:,.0f} MB" for p in peaks])
    axes[1].invert_yaxis()
    axes[1].set_xlabel("peak VRAM (MB)" if h.get("baseline_peak_vram_mb") else "peak RSS (MB)")
    axes[1].set_title(f"{h['shape']}: peak memory")
    for ax in axes[:2]:
        ax.margins(x=0.25)
    for ax, (axis, key, label) in zip(axes[2:], (("seq", "cutoff", "cutoff_len (micro-batch 4)"),
                                                 ("mb", "micro_batch", "micro-batch (cutoff_len 512)")), strict=True):
        rows = report["sweeps"][axis]
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["baseline_tokens_per_s"] for r in rows], "o-", label=LABELS["baseline"])
        ax.plot(xs, [r["alpaca_lora_tokens_per_s"] for r in rows], "o-", label="alpaca_lora")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("non-padding tokens/s (median)")
        ax.set_title(f"{rows[0]['shape']}: throughput")
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
