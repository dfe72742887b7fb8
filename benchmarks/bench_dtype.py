"""CPU compute dtype: bf16 against fp32 training speed with finetune()'s defaults, on this machine.

Usage::

    python benchmarks/bench_dtype.py            # SmolLM2-135M, cutoff 512, micro-batch 8 (~10 minutes on 2 cores)
    python benchmarks/bench_dtype.py --steps 3 --rounds 1

Each configuration fine-tunes the embedded SmolLM2-135M (NF4, the library's defaults) on the same real
records (GSM8K + GPTeacher, ``../shared/data``) for ``--steps`` optimizer steps of one micro-batch;
tokens/s is the median over the steps after the first (warm-up) of non-padding tokens per second.
Configurations alternate round by round so drift in the machine's speed hits them alike. This is what
``compute_dtype="auto"`` decides on a CPU (bf16 only with AMX): the JSON records the CPU, its AMX
flag and the ratios. Results: ``benchmarks/results/dtype_cpu.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_train import machine  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data"
CONFIGS = {
    "float32": dict(compute_dtype="float32"),
    "bfloat16": dict(compute_dtype="bfloat16"),
    "bfloat16, fused_lora=False": dict(compute_dtype="bfloat16", fused_lora=False),
}


def records(n: int) -> list[dict]:
    """``n`` real records, a deterministic mix of GSM8K and GPTeacher roleplay."""
    out: list[dict] = []
    for name in ("gsm8k_train_alpaca.json", "gpteacher_roleplay_alpaca.json"):
        data = json.loads((DATA / name).read_text(encoding="utf-8"))
        out.extend(data[: n // 2])
    return out


def run_one(settings: dict, steps: int, mb: int, cutoff: int, data: list[dict]) -> list[float]:
    """Per-step non-padding tokens/s of one short fine-tune (the first step included)."""
    from alpaca_lora import default_base_model, finetune

    with tempfile.TemporaryDirectory() as out:
        finetune(default_base_model(), data, out, max_steps=steps, batch_size=mb, micro_batch_size=mb,
                 cutoff_len=cutoff, val_set_size=0, save_steps=10_000, **settings)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    rates, tokens, elapsed = [], 0, 0.0
    for r in rows:
        rates.append((r["tokens_seen"] - tokens) / max(1e-9, r["elapsed_s"] - elapsed))
        tokens, elapsed = r["tokens_seen"], r["elapsed_s"]
    return rates


def main() -> None:
    """Run the comparison and write the JSON and the plot."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--cutoff_len", type=int, default=512)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--out", type=Path, default=HERE / "results" / "dtype_cpu.json")
    args = p.parse_args()
    from alpaca_lora.model.load import cpu_has_native_bf16

    data = records(args.steps * args.micro_batch_size)
    rates: dict[str, list[float]] = {name: [] for name in args.configs}
    for r in range(args.rounds):
        for name in args.configs:
            step_rates = run_one(CONFIGS[name], args.steps, args.micro_batch_size, args.cutoff_len, data)
            rates[name].extend(step_rates[1:])  # the first step warms up
            print(f"round {r + 1} {name}: {[round(x, 1) for x in step_rates]} tokens/s", flush=True)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    ref = medians.get("float32")
    report = {
        "machine": {**machine(), "amx_bf16": cpu_has_native_bf16()},
        "settings": {"model": "SmolLM2-135M (embedded)", "quantization": "nf4", "cutoff_len": args.cutoff_len,
                     "micro_batch_size": args.micro_batch_size, "steps": args.steps, "rounds": args.rounds},
        "tokens_per_s_median": medians,
        "tokens_per_s_steps": rates,
        "ratio_to_float32": {k: v / ref for k, v in medians.items()} if ref else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps({"tokens_per_s_median": medians, "ratio_to_float32": report["ratio_to_float32"]}, indent=2))


def plot(report: dict, path: Path) -> None:
    """Bar chart of the median tokens/s per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["tokens_per_s_median"])
    values = [report["tokens_per_s_median"][n] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names, values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}", va="center")
    cpu = report["machine"]["cpu"]
    ax.set_xlabel("non-padding tokens/s (median, after warm-up)")
    ax.set_title(f"{cpu} ({'AMX' if report['machine']['amx_bf16'] else 'no AMX'}), "
                 f"{report['machine']['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
