"""The output: Alpaca JSONL appended as tasks are kept, read back to resume, and its report beside it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpaca_lora.errors import ConfigError, DataError, shown
from alpaca_lora.export.layout import write_json
from alpaca_lora.selfinstruct.filters import REASONS
from alpaca_lora.selfinstruct.seeds import Task

logger = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 3
"""Rejected tasks the report quotes for each reason."""


def report_path(output: Path) -> Path:
    """The report beside ``output``: ``data.jsonl`` -> ``data.report.json``."""
    return output.with_name(output.stem + ".report.json")


def read_kept(output: Path) -> list[Task]:
    """The records an earlier run wrote to ``output`` (none when it does not exist).

    A last line cut by a crash mid-write is removed from the file (with a warning); any other line
    that is not an Alpaca record is an error, so a file of something else is never appended to.
    """
    if not output.exists():
        return []
    if output.suffix != ".jsonl" or not output.is_file():
        raise ConfigError(f"output={shown(str(output), 200)} must be a .jsonl file (Alpaca records, one a line)")
    raw = output.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1].strip():  # no newline after the last line: a write cut short
        good = len(raw) - len(lines[-1])
        logger.warning("%s ends with an unfinished line (%d bytes, cut by an interrupted write); removed", output,
                       len(lines[-1]))
        with output.open("r+b") as f:
            f.truncate(good)
        lines = lines[:-1]
    tasks = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            tasks.append(Task(item["instruction"], item["input"], item["output"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise DataError(f"{output}, line {number} is not an Alpaca record ({shown(line[:120])}); the file was "
                            "not written by self_instruct. Choose another output, or remove the file") from None
    return tasks


def append(output: Path, tasks: list[Task]) -> None:
    """Append ``tasks`` as JSON lines and flush them to disk, so a crash keeps every kept task."""
    if not tasks:
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(t.record(), ensure_ascii=False) + "\n" for t in tasks))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Tally:
    """What a run did, summed over its resumes: the report's counts.

    Attributes:
        kept: Tasks kept (the lines of the output).
        rejected: Rejected tasks by reason (every name of :data:`REASONS`).
        examples: Up to :data:`EXAMPLES_PER_REASON` rejected tasks by reason, with what rejected them.
        requests: Prompts answered by the teacher.
        answer_tokens: Tokens the teacher wrote, where it said.
        seconds: Time spent asking and filtering.
        similarity: Highest ROUGE-L of each kept task against what was kept before it.

    """

    kept: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0
    similarity: list[float] = field(default_factory=list)

    def reject(self, reason: str, text: str, **why: Any) -> None:
        """Count a rejected task, quoting the first few of each reason."""
        self.rejected[reason] += 1
        quoted = self.examples.setdefault(reason, [])
        if len(quoted) < EXAMPLES_PER_REASON:
            quoted.append({"text": text[:300], **why})

    def summary(self) -> str:
        """``kept 12, rejected 30 (similar 14, unparseable 9, ...)``."""
        rejected = {k: v for k, v in sorted(self.rejected.items(), key=lambda kv: -kv[1]) if v}
        detail = ", ".join(f"{k} {v}" for k, v in rejected.items())
        return f"kept {self.kept}, rejected {sum(rejected.values())}" + (f" ({detail})" if detail else "")

    def to_json(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The report: counts, throughput and ``extra`` (output, teacher, settings, status)."""
        def rate(count: float, per: float) -> float | None:
            return round(count / (self.seconds / per), 3) if self.seconds else None

        return {**extra, "kept": self.kept, "rejected": self.rejected, "rejected_total": sum(self.rejected.values()),
                "requests": self.requests, "answer_tokens": self.answer_tokens, "seconds": round(self.seconds, 2),
                "kept_per_minute": rate(self.kept, 60), "requests_per_minute": rate(self.requests, 60),
                "answer_tokens_per_second": rate(self.answer_tokens, 1),
                "kept_max_rouge_l": max(self.similarity, default=0.0), "rejected_examples": self.examples}

    def save(self, output: Path, extra: dict[str, Any]) -> Path:
        """Write the report beside ``output`` (atomically)."""
        return write_json(report_path(output), self.to_json(extra) | {"similarity": self.similarity})

    @classmethod
    def resume(cls, output: Path, kept: int) -> Tally:
        """The counts of an earlier run from its report, or fresh ones (kept = the lines already there)."""
        path = report_path(output)
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            tally = cls(requests=int(data.get("requests", 0)), answer_tokens=int(data.get("answer_tokens", 0)),
                        seconds=float(data.get("seconds", 0.0)), examples=dict(data.get("rejected_examples", {})),
                        similarity=[float(x) for x in data.get("similarity", [])][:kept])
            tally.rejected.update({k: int(v) for k, v in data.get("rejected", {}).items() if k in REASONS})
        except (OSError, ValueError, TypeError, AttributeError):
            logger.warning("%s is unreadable; the counts start again", path)
            tally = cls()
        tally.kept = kept
        return tally
