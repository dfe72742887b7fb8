"""The time generation metrics add to a training run (``eval_generate_samples``), on the embedded SmolLM2-135M.

The demo's setting (4-bit base, LoRA on every linear layer, the built-in tasks, alpaca_short prompts) is
trained twice with the same seed: with the eval loss only, and with ``eval_generate_samples`` answered at
every evaluation. The runs' training-loop wall times and the logged ``eval_generate_s`` give the cost.

    python benchmarks/eval_overhead.py --steps 20 --eval_steps 10 --samples 32

Writes ``benchmarks/results/eval_overhead.json`` and ``eval_overhead.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "amx": "amx_tile" in text, "python": platform.python_version()}


def run(samples: int, steps: int, eval_steps: int, out: Path) -> dict:
    from alpaca_lora import default_base_model, finetune
    from alpaca_lora.demo.tasks import train_test_tasks

    train, _ = train_test_tasks(2400, 80, seed=0)
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in train[:800]]
    result = finetune(default_base_model(), records, out, template="alpaca_short", max_steps=steps, batch_size=16,
                      micro_batch_size=8, learning_rate=1e-3, cutoff_len=128, val_set_size=64, eval_steps=eval_steps,
                      gradient_checkpointing=False, lora_dropout=0.0, lora_target_modules="all-linear",
                      eval_generate_samples=samples, eval_generate_max_new_tokens=24, seed=0)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    return {"eval_generate_samples": samples, "runtime_s": result.runtime_s, "evaluations": len(evals),
            "eval_generate_s": [e.get("eval_generate_s") for e in evals],
            "eval_exact_match": [e.get("eval_exact_match") for e in evals],
            "eval_loss": [e["eval_loss"] for e in evals]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval_steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off = run(0, args.steps, args.eval_steps, Path(tmp) / "off")
        on = run(args.samples, args.steps, args.eval_steps, Path(tmp) / "on")
    added = on["runtime_s"] - off["runtime_s"]
    result = {"machine": machine(), "steps": args.steps, "eval_steps": args.eval_steps, "off": off, "on": on,
              "added_s": added, "added_per_evaluation_s": added / max(1, on["evaluations"]),
              "added_fraction": added / off["runtime_s"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("off", "on")}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(["eval loss only", f"+ {args.samples} answers per evaluation"], [off["runtime_s"], on["runtime_s"]],
           color=["tab:gray", "tab:blue"])
    ax.set_ylabel("training loop wall time, s")
    ax.set_title(f"{args.steps} steps, evaluation every {args.eval_steps}; {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "eval_overhead.png", dpi=110)


if __name__ == "__main__":
    main()
