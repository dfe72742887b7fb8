"""Training speed and memory: alpaca_lora.finetune against the baseline recipe, side by side.

Usage::

    python benchmarks/bench_train.py --quick          # ~10 minutes on a 2-core CPU
    python benchmarks/bench_train.py                  # the full sweeps (an hour or more on a CPU)

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

# name -> LlamaConfig overrides (vocabulary and tokenizer are SmolLM2's for both)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "smollm2-135m": {},  # the embedded base's own config
}


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
    return info


def build_model(shape: str, cache: Path) -> Path:
    """Random-init Llama of ``shape`` saved once (safetensors), with SmolLM2's tokenizer."""
    folder = cache / shape
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from alpaca_lora import default_base_model

    base = default_base_model()
    config = AutoConfig.from_pretrained(base)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def run_one(recipe: str, model_dir: Path, cutoff: int, mb: int, steps: int, warmup: int,
            sets: list[str], tag: str, scratch: Path, split: bool = False, extra: tuple[str, ...] = (),
            quiet: bool = False) -> dict:
    """Run one configuration in a fresh process and return its JSON result."""
    out = scratch / (tag.replace("/", "_").replace(" ", "_").replace("=", "-") + ".json")
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "bench_worker.py"), "--recipe", recipe, "--model-dir", str(model_dir),
           "--data-dir", str(DATA), "--cutoff", str(cutoff), "--micro-batch", str(mb), "--steps", str(steps),
           "--warmup", str(warmup), "--records", str(max(64, mb * (steps + 2))), "--out", str(out), *extra]
    for s in sets:
        cmd += ["--set", s]
    if not split:
        cmd.append("--no-split")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
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
    flops = [f / t for r in results for t, f in zip(r["step_s"][r["warmup"]:], r["step_flops"][r["warmup"]:],
                                                    strict=True)]
    peak = results[0].get("peak_bf16_tflops")
    return {**results[0], "median_tokens_per_s": statistics.median(rates),
            "model_tflops_per_s": statistics.median(flops) / 1e12,
            "mfu": statistics.median(flops) / (peak * 1e12) if peak else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "peak_vram_mb": max((r.get("peak_vram_mb") or 0.0) for r in results) or None,
            "rss_start_mb": statistics.median(r["rss_start_mb"] for r in results), "repeats": len(results)}


def plan(quick: bool) -> dict:
    """The configurations: headline, ablations and sweeps."""
    if quick:
        return {"steps": 5, "warmup": 2, "headline": ("smollm2-135m", 512, 4), "repeats": 2,
                "ablations": [["cpu_matmul=blas"], ["fused_lora=false"], ["packing=false"],
                              ["packing=false", "group_by_length=true"]],
                "sweep_shape": "tiny", "seq": [128, 512, 1024], "mb": [1, 4, 8], "sweep_steps": 6}
    return {"steps": 8, "warmup": 2, "headline": ("smollm2-135m", 512, 4), "repeats": 3,
            "ablations": [["cpu_matmul=blas"], ["fused_lora=false"], ["packing=false"],
                          ["packing=false", "group_by_length=true"], ["release_cpu_memory=true"],
                          ["gradient_checkpointing=false"], ["loss_chunk_size=256"]],
            "sweep_shape": "smollm2-135m", "seq": [128, 256, 512, 1024], "mb": [1, 2, 4, 8], "sweep_steps": 5}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the headline pair twice, four ablations, sweeps on the tiny shape")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "alpaca_lora" / "bench-models")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/bench_<mode>.json)")
    args = p.parse_args()
    cfg = plan(args.quick)
    mode = "quick" if args.quick else "full"
    out_path = args.out or RESULTS / f"bench_{mode}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_path.parent / f".scratch_{mode}"
    scratch.mkdir(exist_ok=True)
    report: dict = {"mode": mode, "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "data": str(DATA), "lora": "r16 alpha32 dropout0.05 q,k,v,o", "runs": []}
    start = time.perf_counter()

    shape, cutoff, mb = cfg["headline"]
    model_dir = build_model(shape, args.cache)
    print(f"headline: {shape}, cutoff {cutoff}, micro-batch {mb}, {cfg['steps']} steps ({cfg['warmup']} warm-up)")
    common = dict(model_dir=model_dir, cutoff=cutoff, mb=mb, steps=cfg["steps"], warmup=cfg["warmup"],
                  scratch=scratch)
    # The pair runs several times, alternating, so a slow spell of a shared machine hits both recipes.
    bases: list[dict] = []
    ourses: list[dict] = []
    for k in range(cfg["repeats"]):
        suffix = f" #{k + 1}" if k else ""
        bases.append(run_one("baseline", sets=[], tag=f"{shape}/baseline{suffix}", split=k == 0, **common))
        ourses.append(run_one("alpaca_lora", sets=[], tag=f"{shape}/alpaca_lora{suffix}", split=k == 0, **common))
    report["runs"] += bases + ourses
    base, ours = pooled(bases), pooled(ourses)
    report["headline"] = {"shape": shape, "cutoff": cutoff, "micro_batch": mb, "repeats": cfg["repeats"],
                          "baseline_tokens_per_s": base["median_tokens_per_s"],
                          "alpaca_lora_tokens_per_s": ours["median_tokens_per_s"],
                          "baseline_peak_rss_mb": base["peak_rss_mb"], "alpaca_lora_peak_rss_mb": ours["peak_rss_mb"],
                          "baseline_model_tflops_per_s": base["model_tflops_per_s"],
                          "alpaca_lora_model_tflops_per_s": ours["model_tflops_per_s"],
                          "baseline_mfu": base["mfu"], "alpaca_lora_mfu": ours["mfu"],
                          "baseline_peak_vram_mb": base.get("peak_vram_mb"),
                          "alpaca_lora_peak_vram_mb": ours.get("peak_vram_mb"),
                          "pair_tokens_per_s_ratios": [compare(b, o)["tokens_per_s_ratio"]
                                                       for b, o in zip(bases, ourses, strict=True)],
                          **compare(base, ours)}
    ablations = [{"change": "none (defaults)", **compare(base, ours)}]
    for sets in cfg["ablations"]:
        r = run_one("alpaca_lora", sets=sets, tag=f"{shape}/alpaca_lora {' '.join(sets)}", **common)
        report["runs"].append(r)
        ablations.append({"change": " ".join(sets), **compare(base, r)})
    report["ablations"] = ablations
    if report["machine"].get("gpu"):
        print(f"longest context under 24 GB: {shape}, micro-batch 1")
        report["longest_context"] = {recipe: longest_context(recipe, model_dir, scratch)
                                     for recipe in ("baseline", "alpaca_lora")}

    shape = cfg["sweep_shape"]
    model_dir = build_model(shape, args.cache)
    sweeps = {"seq": [], "mb": []}
    pairs: dict[tuple[int, int], dict] = {}
    for axis, values in (("seq", cfg["seq"]), ("mb", cfg["mb"])):
        print(f"sweep {axis} on {shape}: {values}")
        for v in values:
            c, m = (v, 4) if axis == "seq" else (512, v)
            if (c, m) not in pairs:
                pairs[c, m] = {recipe: run_one(recipe, model_dir, c, m, cfg["sweep_steps"], 1, [],
                                               f"{shape}/{recipe} cutoff{c} mb{m}", scratch)
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
    report["wall_s"] = time.perf_counter() - start
    out_path.write_text(json.dumps(report, indent=1))
    plot(report, out_path.with_suffix(".png"))
    print_summary(report)
    print(f"wrote {out_path} and {out_path.with_suffix('.png')} in {report['wall_s'] / 60:.1f} min")


def print_summary(report: dict) -> None:
    h = report["headline"]
    mem = "VRAM" if h.get("baseline_peak_vram_mb") else "RSS"
    print(f"\nheadline ({h['shape']}, cutoff {h['cutoff']}, micro-batch {h['micro_batch']}, "
          f"{h.get('repeats', 1)} alternating pairs, per-pair tokens/s ratios "
          f"{', '.join(f'x{r:.2f}' for r in h.get('pair_tokens_per_s_ratios', []))}): "
          f"tokens/s x{h['tokens_per_s_ratio']:.2f}, peak {mem} x{h['peak_ratio']:.2f} "
          f"(above start x{h['peak_rss_above_start_ratio']:.2f}), probe loss diff {h['probe_loss_abs_diff']:.2e}, "
          f"same label tokens: {h['same_label_tokens']}")
    print(f"model FLOP/s (gpu_metrics.train_flops): baseline {h['baseline_model_tflops_per_s'] * 1e3:.1f} GFLOP/s, "
          f"alpaca_lora {h['alpaca_lora_model_tflops_per_s'] * 1e3:.1f} GFLOP/s"
          + (f"; MFU {h['baseline_mfu']:.1%} and {h['alpaca_lora_mfu']:.1%}" if h.get("alpaca_lora_mfu") else ""))
    for recipe, found in report.get("longest_context", {}).items():
        print(f"longest context under {found['cap_gb']:g} GB, {recipe}: {found['longest']} tokens"
              + (" (the longest tried)" if found["capped"] else ""))
    print("ablations (one run each, against the pooled baseline runs):")
    for a in report["ablations"]:
        print(f"  {a['change']:<40} tokens/s x{a['tokens_per_s_ratio']:.2f}  peak {mem} x{a['peak_ratio']:.2f}")
    med = statistics.median(s["tokens_per_s_ratio"] for axis in report["sweeps"].values() for s in axis)
    print(f"sweeps: median tokens/s ratio x{med:.2f}")


def plot(report: dict, path: Path) -> None:
    """Tokens/s against sequence length and micro-batch, and peak memory, for both recipes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (axis, key, label) in zip(axes[:2], (("seq", "cutoff", "cutoff_len (micro-batch 4)"),
                                                 ("mb", "micro_batch", "micro-batch (cutoff_len 512)")), strict=True):
        rows = report["sweeps"][axis]
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["baseline_tokens_per_s"] for r in rows], "o-", label="baseline (Trainer + peft)")
        ax.plot(xs, [r["alpaca_lora_tokens_per_s"] for r in rows], "o-", label="alpaca_lora")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("non-padding tokens/s (median)")
        ax.set_title(f"{rows[0]['shape']}: throughput")
        ax.legend()
    names = [a["change"] for a in report["ablations"]]
    base_peak = report["headline"]["baseline_peak_vram_mb"] or report["headline"]["baseline_peak_rss_mb"]
    mem = [base_peak] + [a["peak_ratio"] * base_peak for a in report["ablations"]]
    axes[2].barh(["baseline"] + [f"alpaca_lora {n}" for n in names], mem)
    axes[2].set_xlabel("peak VRAM (MB)" if report["headline"].get("baseline_peak_vram_mb") else "peak RSS (MB)")
    axes[2].set_title(f"{report['headline']['shape']}: peak memory")
    fig.suptitle(f"{report['machine']['cpu']} ({report['machine']['cores']} cores), torch "
                 f"{report['machine']['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
