"""Reading a run folder as it is written: metrics, progress, checkpoints, config and reports.

Everything here reads the files ``finetune`` writes (see :mod:`alpaca_lora.export.layout`), never the
training process, so a run started from the command line shows up exactly like one started from the UI.
``metrics.jsonl`` may be read while a line is half written: a torn line is skipped, not an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_lora.export import layout as art

LOG_FILE = "train.log"
"""The output of a run the UI started (stdout and stderr of ``alpaca-lora finetune``)."""
UI_CONFIG = "ui_config.json"
"""The FinetuneConfig fields a run was started with from the UI (given to ``--config``)."""
MAX_READ_BYTES = 8 * 2**20
"""Most bytes read from one metrics or log file (the tail is kept): a refresh must stay cheap."""
REPORT_FILES = ("demo_report.json", "eval_report.json", art.RESULTS_FILE, art.MERGE_REPORT)
"""JSON reports shown with a run, when present."""
_STEPS_LINE = re.compile(r"steps\s+(\d+) optimizer steps")


@dataclass(frozen=True)
class Progress:
    """Where a run stands, from its last metrics records.

    Attributes:
        step: Optimizer steps logged so far (0 before the first).
        total_steps: Steps the run will take, when known (from its log or ``max_steps``).
        loss: The last logged training loss.
        eval_loss: The last evaluation loss.
        lr: The last learning rate.
        tokens_per_s: Training tokens per second over the run so far.
        eta_s: Seconds left at the pace so far, when the total is known.
        elapsed_s: Seconds of training logged so far.

    """

    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None

    def line(self) -> str:
        """One line for people: ``step 3/10 · loss 2.31 · lr 3e-4 · 812 tokens/s · ETA 0:12``."""
        parts = [f"step {self.step}/{self.total_steps}" if self.total_steps else f"step {self.step}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval loss {self.eval_loss:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.3g}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        if self.eta_s is not None:
            parts.append(f"ETA {_clock(self.eta_s)}")
        return " · ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def read_tail(path: Path, limit: int = MAX_READ_BYTES) -> str:
    """The last ``limit`` bytes of a text file ("" when it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text if size <= limit else text.partition("\n")[2]


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The records of ``folder/metrics.jsonl`` in order; blank and torn lines are skipped."""
    records = []
    for line in read_tail(Path(folder) / art.METRICS_FILE).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def total_steps(folder: Path) -> int | None:
    """The steps a run will take: from the preflight summary of its log, else its config's ``max_steps``."""
    found = _STEPS_LINE.findall(read_tail(Path(folder) / LOG_FILE, 2**20))
    if found:
        return int(found[-1])
    for name in (art.CONFIG_FILE, UI_CONFIG):
        config = read_json(Path(folder) / name)
        if isinstance(config.get("max_steps"), int):
            return config["max_steps"]
    return None


def progress(folder: Path, records: list[dict[str, Any]] | None = None) -> Progress:
    """The :class:`Progress` of the run in ``folder`` (``records``: its metrics, when already read)."""
    records = read_metrics(folder) if records is None else records
    train = [r for r in records if _number(r.get("loss")) is not None and "lr" in r]
    evals = [r for r in records if _number(r.get("eval_loss")) is not None]
    step = max((r["step"] for r in records), default=0)
    total = total_steps(folder)
    last = train[-1] if train else {}
    elapsed, tokens = _number(last.get("elapsed_s")), _number(last.get("tokens_seen"))
    rate = tokens / elapsed if elapsed and tokens is not None else None
    eta = None
    if total and elapsed and last.get("step"):
        eta = max(0.0, (total - last["step"]) * elapsed / last["step"])
    return Progress(step=step, total_steps=total, loss=_number(last.get("loss")),
                    eval_loss=_number(evals[-1]["eval_loss"]) if evals else None, lr=_number(last.get("lr")),
                    tokens_per_s=rate, eta_s=eta, elapsed_s=elapsed)


def curve_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{step, value, series}`` of the train and eval loss curves (for a line plot)."""
    rows = []
    for r in records:
        for key, series in (("loss", "train loss"), ("eval_loss", "eval loss")):
            value = _number(r.get(key))
            if value is not None:
                rows.append({"step": r["step"], "value": value, "series": series})
    return rows


def frame(rows: list[dict[str, Any]]) -> Any:
    """``rows`` of :func:`curve_rows` or :func:`lr_rows` as the pandas DataFrame a line plot takes."""
    import pandas as pd

    return pd.DataFrame(rows, columns=["step", "value", "series"])


def lr_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{step, value, series}`` of the learning rate."""
    return [{"step": r["step"], "value": float(r["lr"]), "series": "learning rate"}
            for r in records if _number(r.get("lr")) is not None]


def checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, by step."""
    found = [p for p in Path(folder).glob(f"{art.CHECKPOINT_PREFIX}*") if p.is_dir()
             and p.name[len(art.CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(art.CHECKPOINT_PREFIX):]))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is missing or not an object (the UI shows what it can)."""
    text = read_tail(path, MAX_READ_BYTES)
    try:
        data = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def reports(folder: Path) -> dict[str, Any]:
    """The JSON reports of a run (train results, evaluation and demo reports, merge report), by file name."""
    return {name: data for name in REPORT_FILES if (data := read_json(Path(folder) / name))}


def model_card(folder: Path) -> str:
    """The folder's model card (README.md), or ""."""
    return read_tail(Path(folder) / "README.md", 2**20)


def kind(folder: Path) -> str | None:
    """"adapter", "merged", "run" (training, no adapter yet) or None for a folder that is none of them."""
    folder = Path(folder)
    if (folder / art.ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "merged" if (folder / art.MERGE_REPORT).is_file() else "model"
    if (folder / art.METRICS_FILE).is_file() or (folder / UI_CONFIG).is_file() or (folder / art.CONFIG_FILE).is_file():
        return "run"
    return None


def has_chat_template(folder: Path) -> bool:
    """Whether the model folder's tokenizer carries a chat template (then the Chat tab sends conversations)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    return bool(read_json(folder / "tokenizer_config.json").get("chat_template"))


def recorded_base(folder: Path) -> str | None:
    """The base model an adapter (or a merged folder) records, when it names one."""
    adapter = read_json(Path(folder) / art.ADAPTER_CONFIG)
    base = adapter.get("base_model_name_or_path") or read_json(Path(folder) / art.MERGE_REPORT).get("base_model")
    return str(base) if base else None
