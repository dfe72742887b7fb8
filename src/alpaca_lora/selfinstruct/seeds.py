"""Seed tasks: Stanford Alpaca's ``seed_tasks.jsonl`` form, or plain Alpaca records."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alpaca_lora.errors import DataError, shown


@dataclass(frozen=True)
class Task:
    """One instruction task: what a seed holds and what the teacher writes.

    Attributes:
        instruction: The task.
        input: Its context, ``""`` when it needs none.
        output: The answer.

    """

    instruction: str
    input: str
    output: str

    def record(self) -> dict[str, str]:
        """The task as an Alpaca record (``instruction``, ``input``, ``output``)."""
        return asdict(self)


def load_seed_tasks(source: str | Path | list[dict[str, Any]]) -> list[Task]:
    """Read seed tasks.

    Args:
        source: A ``.jsonl`` file in Stanford Alpaca's seed form (one object a line with
            ``instruction`` and ``instances``, a list of ``{"input", "output"}``; the first instance
            is used, as Stanford Alpaca did), or anything :func:`alpaca_lora.data.records.read_records`
            reads as Alpaca records (a ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a list of dicts).

    Returns:
        The tasks, in file order, duplicates of an instruction dropped.

    Raises:
        DataError: The file is missing or unreadable, a seed line is damaged (named by its line), or
            no task is left.

    """
    from alpaca_lora.data.records import read_records

    if isinstance(source, (str, Path)) and Path(source).suffix == ".jsonl" and _seed_form(Path(source)):
        tasks = _read_seed_form(Path(source))
    else:
        records, _ = read_records(source)
        tasks = [Task(r["instruction"].strip(), r["input"].strip(), r["output"].strip()) for r in records]
    unique: dict[str, Task] = {}
    for task in tasks:
        unique.setdefault(task.instruction, task)
    if not unique:
        raise DataError(f"{shown(str(source), 200)} holds no seed task; give at least one instruction with an output")
    return list(unique.values())


def _seed_form(path: Path) -> bool:
    """Whether the first line of ``path`` is a seed task (it has ``instances``)."""
    try:
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        return isinstance(json.loads(first), dict) and "instances" in json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # read_records reports the file's problem


def _read_seed_form(path: Path) -> list[Task]:
    tasks = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not JSON ({exc.msg}); each line holds one seed task object") from None
            instances = item.get("instances") if isinstance(item, dict) else None
            first = instances[0] if isinstance(instances, list) and instances else None
            if not (isinstance(item, dict) and isinstance(item.get("instruction"), str) and isinstance(first, dict)
                    and isinstance(first.get("input", ""), str) and isinstance(first.get("output"), str)):
                raise DataError(f"{where} is not a seed task: it needs a string 'instruction' and 'instances', a "
                                "list whose first item has a string 'output' (and 'input'); got "
                                f"{shown(line.strip(), 120)}")
            tasks.append(Task(item["instruction"].strip(), first.get("input", "").strip(), first["output"].strip()))
    return tasks
