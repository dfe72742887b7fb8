"""Reading instruction records: JSON, JSONL, CSV, Parquet, ``datasets`` objects and lists of dicts.

:func:`read_records` / :func:`load_instructions` turn any of these into ``{"instruction", "input",
"output"}`` records. A bad record is an error naming the file, the line (or record index) and the
fix, or, with ``skip_bad_records=True``, a reported skip. Common column layouts (dolly,
prompt/completion, question/answer, ...) are mapped automatically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets

from alpaca_lora.data.encoding import surrogate_problem, unencodable_at
from alpaca_lora.data.stream import (
    SUFFIXES,
    Item,
    check_file,
    check_start,
    empty_file,
    file_lines,
    item_keys,
    jsonl_items,
    open_parquet,
)
from alpaca_lora.errors import ConfigError, DataError, shown

logger = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")
SKIP_HINT = "Fix or remove this record, or pass skip_bad_records=True to skip bad records and report them."

# Known column layouts, tried in order: (name, instruction column, input columns, output column).
_SCHEMAS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("alpaca", "instruction", ("input",), "output"),
    ("dolly (instruction/context/response)", "instruction", ("context", "input"), "response"),
    ("prompt/completion", "prompt", ("input",), "completion"),
    ("prompt/response", "prompt", ("input",), "response"),
    ("question/answer", "question", ("context", "input"), "answer"),
    ("query/response", "query", ("input",), "response"),
)

Items = list[Item]
"""One raw item per record: (where it is, for messages; the parsed object; a problem found while parsing)."""

# ---- reading and validation ------------------------------------------------------------------


def read_records(
    source: Any, *, column_map: dict[str, str] | None = None, skip_bad_records: bool = False
) -> tuple[list[dict[str, str]], list[str]]:
    """Read and validate instruction records: :func:`read_items`, then :func:`check_records`.

    Args:
        source: A ``.json`` (a list of objects), ``.jsonl``, ``.csv`` or ``.parquet`` path, a
            ``datasets.Dataset``, a ``datasets.DatasetDict`` (its ``train`` split, or its only split)
            or a list of dicts.
        column_map: Maps your column names to ``instruction``/``input``/``output``, e.g.
            ``{"question": "instruction", "answer": "output"}``. Without it the layout is detected:
            alpaca, dolly (instruction/context/response), prompt/completion, prompt/response,
            question/answer, query/response.
        skip_bad_records: Skip bad records and report them instead of raising on the first one.

    Returns:
        ``(records, skipped)``: records with string fields ``instruction``, ``input`` (``""`` when
        absent) and ``output``; one human-readable reason per skipped record.

    Raises:
        DataError: A file-level problem (missing, unknown extension, unparsable, empty), a bad record
            (unless ``skip_bad_records``), or no usable record at all.
        ConfigError: ``column_map`` does not map column names to instruction/input/output.

    """
    name, items, columns = read_items(source)
    return check_records(name, items, columns, column_map=column_map, skip_bad_records=skip_bad_records)


def check_records(
    name: str, items: Items, columns: list[str], *, column_map: dict[str, str] | None = None,
    skip_bad_records: bool = False,
) -> tuple[list[dict[str, str]], list[str]]:
    """Validate the raw ``(name, items, columns)`` of :func:`read_items` as instruction records.

    ``column_map``, ``skip_bad_records``, the result and the errors are those of :func:`read_records`.
    """
    if not items:
        raise DataError(f"{name} holds no records; it needs at least one with instruction and output")
    # With no object among the records there are no columns to detect: report each record instead.
    mapping = resolve_columns(name, columns, column_map) if columns else {f: f for f in FIELDS}
    skipped: list[str] = []
    records = list(checked_records(items, mapping, skip_bad_records=skip_bad_records, skipped=skipped))
    if not records:
        raise no_usable_records(name, len(skipped), skipped)
    return records, skipped


def checked_records(
    items: Iterable[Item], mapping: dict[str, str | None], *, skip_bad_records: bool, skipped: Any
) -> Iterator[dict[str, str]]:
    """Yield the valid records of ``items`` one at a time, read through ``mapping`` (of :func:`resolve_columns`).

    A bad record raises DataError (naming it, with the fix), or with ``skip_bad_records`` its reason is
    appended to ``skipped`` (a list, or a :class:`~alpaca_lora.data.stream.Skips` that keeps only a few).
    """
    for where, obj, problem in items:
        record = None
        if problem is None:
            record, problem = _check_record(obj, mapping)
        if record is not None:
            yield record
        elif skip_bad_records:
            skipped.append(f"{where}: {problem}")
        else:
            raise DataError(f"{where}: {problem}. {SKIP_HINT}")


def no_usable_records(name: str, count: int, reasons: list[str]) -> DataError:
    """The error for instruction data whose ``count`` records are all bad (``reasons``: the first ones)."""
    return DataError(f"{name}: no usable records, all {count} are bad (first reasons: {'; '.join(reasons[:5])}). "
                     "Fix the data, or map its columns with column_map.")


def load_instructions(
    source: Any, *, column_map: dict[str, str] | None = None, skip_bad_records: bool = False
) -> datasets.Dataset:
    """Load instruction data as a ``Dataset`` with exactly the string columns instruction, input, output.

    Arguments and errors are those of :func:`read_records`. Skipped records are reported with a
    warning that says how many and shows up to five reasons.
    """
    records, skipped = read_records(source, column_map=column_map, skip_bad_records=skip_bad_records)
    return instructions_dataset(records, skipped, stacklevel=2)


def instructions_dataset(records: list[dict[str, str]], skipped: list[str], *, stacklevel: int = 2) -> datasets.Dataset:
    """The ``Dataset`` of checked instruction records; the skipped ones are warned of by :func:`warn_skipped`."""
    warn_skipped(skipped, len(records), stacklevel=stacklevel + 1)
    features = datasets.Features({f: datasets.Value("string") for f in FIELDS})
    return datasets.Dataset.from_dict({f: [r[f] for r in records] for f in FIELDS}, features=features)


def warn_skipped(skipped: list[str], kept: int, *, stacklevel: int = 2, count: int | None = None) -> None:
    """Warn how many records were skipped (of ``kept`` + skipped) with up to five reasons; nothing if none.

    ``stacklevel`` is that of ``warnings.warn``, counted from the caller of this function. ``count``
    is the number skipped when ``skipped`` holds only the first reasons (default: ``len(skipped)``).
    """
    count = len(skipped) if count is None else count
    if count:
        more = f" (and {count - 5} more)" if count > 5 else ""
        warnings.warn(f"skipped {count} bad record(s) of {kept + count}: " + "; ".join(skipped[:5]) + more,
                      stacklevel=stacklevel + 1)


def resolve_columns(
    name: str, columns: list[str], column_map: dict[str, str] | None, *, log: bool = True
) -> dict[str, str | None]:
    """The source column of each field (``input`` may be None); DataError/ConfigError if there is none.

    A layout other than alpaca's is logged (a warning naming the columns used) unless ``log`` is False.
    """
    if column_map is not None:
        return _apply_column_map(name, columns, column_map)
    for schema, instruction, inputs, output in _SCHEMAS:
        if instruction in columns and output in columns:
            input_col = next((c for c in inputs if c in columns), None)
            if schema != "alpaca" and log:
                logger.warning(
                    "%s: using the %s layout: %s -> instruction, %s, %s -> output (pass column_map to "
                    "choose other columns)", name, schema, instruction,
                    f"{input_col} -> input" if input_col else "no input", output,
                )
            return {"instruction": instruction, "input": input_col, "output": output}
    known = ", ".join(f"{i}/{o}" for _, i, _, o in _SCHEMAS)
    raise DataError(f"{name}: no known instruction/output columns among {listed(columns)}; known layouts: {known}. "
                    "Rename the columns or pass column_map={'your_prompt_column': 'instruction', "
                    "'your_answer_column': 'output'}.")


def _apply_column_map(name: str, columns: list[str], column_map: dict[str, str]) -> dict[str, str | None]:
    if not isinstance(column_map, dict) or not all(isinstance(k, str) and v in FIELDS for k, v in column_map.items()):
        raise ConfigError(
            f"column_map={shown(column_map)}: must map your column names to 'instruction', 'input' or 'output', "
            "e.g. {'question': 'instruction', 'answer': 'output'}"
        )
    if len(set(column_map.values())) != len(column_map):
        raise ConfigError(f"column_map={shown(column_map)}: maps two columns to one field; map each field once")
    mapping: dict[str, str | None] = dict.fromkeys(FIELDS)
    for src, target in column_map.items():
        if src not in columns:
            raise DataError(f"{name}: column_map names column {shown(src, 80)}, which is not among {listed(columns)}")
        mapping[target] = src
    for target in FIELDS:  # an unmapped field falls back to a column of its own name
        if mapping[target] is None and target in columns and target not in column_map:
            mapping[target] = target
    for target in ("instruction", "output"):
        if mapping[target] is None:
            raise DataError(
                f"{name}: no column for {target!r}: column_map={shown(column_map)} maps none and there is no "
                f"{target!r} column among {listed(columns)}; add one to column_map"
            )
    return mapping


def _check_record(obj: Any, mapping: dict[str, str | None]) -> tuple[dict[str, str] | None, str | None]:
    """Validate one raw record: ``(record, None)`` or ``(None, problem)``."""
    if not isinstance(obj, dict):
        return None, f"is a {json_kind(obj)}, not an object with instruction and output fields"
    odd = next((k for k in obj if not isinstance(k, str)), None)
    if odd is not None or None in obj:
        return None, (f"has the field name {shown(odd, 60)}, which is not text; field names are strings "
                      "(instruction, input, output): rename or remove that field")
    record: dict[str, str] = {}
    for target in FIELDS:
        col = mapping[target]
        label = shown(col, 60) if col == target else f"{shown(col, 60)} ({target})"
        value = obj.get(col) if col is not None else None
        if value is None:
            if target == "input":
                record[target] = ""
                continue
            return None, f"field {label} is {'null' if col in obj else 'missing'}"
        if not isinstance(value, str):
            return None, f"field {label} is a {json_kind(value)}, not a string; quote it"
        if target != "input" and not value.strip():
            return None, f"field {label} is empty"
        bad = unencodable_at(value)
        if bad is not None:
            return None, f"field {label} {surrogate_problem(value, bad)}"
        record[target] = value
    return record, None


def json_kind(value: Any) -> str:
    """What ``value`` is, in JSON's words ("JSON object", "string", "null", ...), for messages."""
    names = {dict: "JSON object", list: "JSON list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def listed(columns: list[str], limit: int = 20) -> str:
    """Names (columns, keys) for a message: sorted, at most ``limit`` of them, each bounded."""
    shown_names = ", ".join(shown(c, 60) for c in sorted(columns, key=str)[:limit])
    more = f" and {len(columns) - limit:,} more" if len(columns) > limit else ""
    return f"[{shown_names}]{more}"


# ---- readers: a source becomes (name, items, column names) -----------------------------------


def read_items(source: Any) -> tuple[str, Items, list[str]]:
    """Read a source's raw records without validating them, so each reader of a format parses the file once.

    ``source`` is anything :func:`read_records` reads. Returns ``(name, items, columns)``: the source's
    name for messages (the path, ``"Dataset"``, ``"list of records"``); per record ``(where, object,
    problem)``, ``where`` naming it (``"data.json, record index 3"``, ``"data.jsonl line 4"``) and
    ``problem`` why it could not be parsed (None if it was); the records' keys in first-seen order.
    Raises DataError for a file-level problem (missing, unknown extension, unparsable, not a list).
    """
    if isinstance(source, datasets.DatasetDict):
        splits = list(source)
        if not splits:
            raise DataError("the DatasetDict has no splits; pass one that holds a 'train' split, or a Dataset")
        if "train" not in source and len(splits) != 1:
            raise DataError(
                f"the DatasetDict has splits {listed(splits)}, none named 'train'; pass one, e.g. "
                f"dd[{shown(splits[0], 60)}]"
            )
        source = source["train" if "train" in source else splits[0]]
    if isinstance(source, datasets.Dataset):
        items = [(f"Dataset, record index {i}", r, None) for i, r in enumerate(source.to_list())]
        return "Dataset", items, source.column_names
    if isinstance(source, (list, tuple)):
        items = [(f"list of records, index {i}", r, None) for i, r in enumerate(source)]
        return "list of records", items, item_keys(items)
    if isinstance(source, (str, Path)):
        return (str(source), *_read_file(Path(source)))
    raise DataError(
        f"cannot read data from a {type(source).__name__}; pass a {'/'.join(SUFFIXES)} path, a "
        "datasets.Dataset or DatasetDict, or a list of dicts (a pandas DataFrame: Dataset.from_pandas(df))"
    )


def _read_file(path: Path) -> tuple[Items, list[str]]:
    suffix = check_file(path)
    if suffix == ".parquet":
        columns, _, rows = open_parquet(path)
        return list(rows), columns
    if suffix == ".jsonl":  # the reader load_data streams, here read whole
        items = list(jsonl_items(str(path), file_lines(path)))
        return items, item_keys(items)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from None
    if not raw.strip():
        raise empty_file(path)
    check_start(path, raw[:4])
    # Undecodable bytes become lone surrogates, so a record holding them is reported (or skipped) alone.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    if suffix == ".csv":
        return _read_csv(path, text, raw)
    return _read_json(path, text, raw)


def _read_json(path: Path, text: str, raw: bytes) -> tuple[Items, list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _first_line_is_object(text):
            logger.info("%s holds one JSON object per line; reading it as JSON Lines", path)
            items = list(jsonl_items(str(path), text.split("\n")))  # not splitlines(): strings may hold U+2028
            return items, item_keys(items)
        raise DataError(
            f"{path} line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}){_utf8_note(raw)}. "
            'A .json data file holds one list of records: [{"instruction": ..., "output": ...}, ...]'
        ) from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply; a record is a flat object of strings") from None
    except ValueError as exc:  # an integer literal longer than Python converts (sys.get_int_max_str_digits)
        raise DataError(f"{path}: not valid data ({exc}); every field must be a string") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path} holds a JSON object with keys {listed(list(data), 10)}; it must hold a list of records "
                "([{...}, ...]) or an object whose only list is the records"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {json_kind(data)}; it must hold a list of records ([{{...}}, ...])")
    items = [(f"{path}, record index {i}", r, None) for i, r in enumerate(data)]
    return items, item_keys(items)


def _read_csv(path: Path, text: str, raw: bytes) -> tuple[Items, list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a long response is data, not an error (the default is 128 KiB)
    items: Items = []
    try:
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise DataError(f"{path}: line 1 must be a header naming the columns: instruction,input,output")
        while (row := next(reader, None)) is not None:
            if not row:  # a blank line
                continue
            # line_num is the last line read; a quoted field may span lines, so count its line breaks
            start = reader.line_num - sum(f.count("\n") for f in row)
            where = f"{path} line {start}"
            if len(row) != len(header):
                problem = f"has {len(row)} field(s), the header {len(header)}; quote fields holding commas"
                items.append((where, None, problem))
            else:
                items.append((where, dict(zip(header, row, strict=True)), None))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({exc}){_utf8_note(raw)}") from None
    finally:
        csv.field_size_limit(limit)
    return items, header


def _first_line_is_object(text: str) -> bool:
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return False


def _utf8_note(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return f"; the file is not valid UTF-8 (byte {raw[exc.start]:#04x} on line {line}): save it as UTF-8"
    return ""
