"""Training metrics: metrics.jsonl always, TensorBoard or Weights & Biases when asked, a loss plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from alpaca_lora.errors import ConfigError


class MetricsLogger:
    """Append metrics to ``metrics.jsonl`` and forward them to the reporters in ``report_to``.

    Args:
        path: The JSONL file (one object per logged step).
        report_to: "none", "tensorboard", "wandb" or a list of those.
        run_dir: Folder for TensorBoard event files (``run_dir/runs``).
        config: Run configuration passed to wandb.
        keep_until_step: On resume, drop records after this step so the curve is not duplicated.
        write: False keeps the records in memory only, writing and reporting nothing (the ranks
            other than 0 of a multi-process run).

    """

    def __init__(
        self, path: Path, report_to: str | list[str], run_dir: Path, config: dict[str, Any],
        keep_until_step: int | None = None, write: bool = True,
    ) -> None:
        self.path, self.write = Path(path), write
        self.records: list[dict[str, Any]] = []
        if keep_until_step is not None and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            self.records = [r for r in map(_parse, lines) if r is not None and r.get("step", 0) <= keep_until_step]
        if write:
            # Rewrite through a temporary file, so a kill here cannot lose the curve logged before it.
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
            os.replace(tmp, self.path)
        names = [] if not write else [report_to] if isinstance(report_to, str) else list(report_to)
        self._tb = self._wandb = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "report_to='tensorboard' needs the tensorboard package: pip install tensorboard"
                ) from None
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "runs"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to='wandb' needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(config=config, dir=str(run_dir))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (it must hold ``step``); NaN and inf are written as strings, never hidden."""
        clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(clean)
        if not self.write:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(numeric, step=record["step"])

    def close(self) -> None:
        """Flush and close the reporters."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _parse(line: str) -> dict[str, Any] | None:
    """One metrics line, or None for a blank line or one torn by a kill mid-write."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def plot_losses(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Plot train and eval loss by step to a PNG (generation metrics, when logged, in a second panel).

    Returns its path (None when nothing was logged).
    """
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in records if isinstance(r.get("eval_exact_match"), (int, float))]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(12 if scored else 7, 4), squeeze=False)
    ax = axes[0][0]
    if scored:  # generation metrics of eval_generate_samples, on their own scales (0..1 and 0..100 as %)
        right = axes[0][1]
        steps = [r["step"] for r in scored]
        for key, label, scale in (("eval_exact_match", "exact match", 100), ("eval_rouge_l", "ROUGE-L F", 100),
                                  ("eval_bleu", "BLEU", 1), ("eval_chrf", "chrF", 1)):
            values = [r.get(key) for r in scored]
            if all(isinstance(v, (int, float)) for v in values):
                right.plot(steps, [scale * v for v in values], "o-", label=label)
        right.set_xlabel("optimizer step")
        right.set_ylabel("score (0-100)")
        right.set_title("generation metrics on a validation sample")
        right.grid(alpha=0.3)
        right.legend()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
