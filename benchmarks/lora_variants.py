"""Each LoRA variant against plain LoRA on the same run: the embedded SmolLM2-135M on the built-in tasks.

Same data, seed, steps and learning rate for every row (4-bit base, LoRA r=8 on every linear layer,
alpaca_short prompts): the training loss at the first and last step, the held-out loss, the step time,
and whether the fused LoRA path computed the layers. The reference is plain LoRA in the same process.

    python benchmarks/lora_variants.py --steps 30

Writes ``benchmarks/results/lora_variants.json`` and ``lora_variants.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "plain LoRA": {},
    "rsLoRA": {"use_rslora": True},
    "DoRA": {"use_dora": True},
    "LoRA+ x16": {"loraplus_lr_ratio": 16},
    "gaussian init": {"init_lora_weights": "gaussian"},
    "PiSSA (QPiSSA)": {"init_lora_weights": "pissa"},
    "PiSSA niter 4": {"init_lora_weights": "pissa_niter_4"},
    "OLoRA": {"init_lora_weights": "olora"},
    "LoftQ": {"init_lora_weights": "loftq"},
}


def machine() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "amx": "amx_tile" in text, "python": platform.python_version()}


def run(name: str, settings: dict, steps: int, out: Path) -> dict:
    from alpaca_lora import default_base_model, finetune
    from alpaca_lora.demo.tasks import train_test_tasks

    train, _ = train_test_tasks(2400, 80, seed=0)
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in train[:600]]
    result = finetune(default_base_model(), records, out, template="alpaca_short", max_steps=steps, batch_size=16,
                      micro_batch_size=8, learning_rate=1e-3, cutoff_len=128, val_set_size=64, eval_steps=steps,
                      gradient_checkpointing=False, lora_dropout=0.0, lora_r=8, lora_alpha=16,
                      lora_target_modules="all-linear", warmup_ratio=0.0, seed=0, compute_dtype="float32",
                      **settings)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(train_rows, train_rows[1:], strict=False)]
    return {"variant": name, "settings": settings, "first_loss": train_rows[0]["loss"],
            "last_loss": train_rows[-1]["loss"], "eval_loss": result.eval_loss,
            "median_step_s": statistics.median(times) if times else None,
            "fused_path": not settings.get("use_dora", False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default=None,
                        help="comma-separated variant names to run again; the others are kept from the saved JSON")
    args = parser.parse_args()
    saved = RESULTS / "lora_variants.json"
    keep = {r["variant"]: r for r in json.loads(saved.read_text())["rows"]} if args.only and saved.is_file() else {}
    wanted = set(args.only.split(",")) if args.only else set(VARIANTS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, settings) in enumerate(VARIANTS.items()):
            if name not in wanted and name in keep:
                rows.append(keep[name])
                continue
            rows.append(run(name, settings, args.steps, Path(tmp) / str(i)))
            print(json.dumps(rows[-1]), flush=True)
    plain = rows[0]
    for r in rows:
        r["eval_loss_vs_plain"] = r["eval_loss"] / plain["eval_loss"]
        r["step_time_vs_plain"] = (r["median_step_s"] / plain["median_step_s"]
                                   if r["median_step_s"] and plain["median_step_s"] else None)
    result = {"machine": machine(), "model": "SmolLM2-135M (embedded), nf4, compute float32", "steps": args.steps,
              "reference": "plain LoRA, same process, same data and seed", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_variants.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(rows, args.steps, RESULTS / "lora_variants.png")


def plot(rows: list[dict], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(rows))
    a.bar([i - 0.2 for i in x], [r["first_loss"] for r in rows], 0.4, label="step 1 (train)")
    a.bar([i + 0.2 for i in x], [r["eval_loss"] for r in rows], 0.4, label=f"held out, after {steps} steps")
    a.set_xticks(list(x), names, rotation=35, ha="right")
    a.set_ylabel("loss per response token")
    a.legend()
    a.set_title("Loss before and after, same run per variant")
    b.bar(list(x), [r["step_time_vs_plain"] or 0 for r in rows], color="gray")
    b.axhline(1.0, color="black", linewidth=0.8)
    b.set_xticks(list(x), names, rotation=35, ha="right")
    b.set_ylabel("median step time / plain LoRA")
    b.set_title("Step time against plain LoRA (same process)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
