"""One entry for training data: Alpaca instructions or conversations, the format detected from the columns.

:func:`load_data` reads a source once and validates it as the format its columns show: a ``messages``
column means OpenAI messages, ``conversations`` means ShareGPT, anything else Alpaca instruction
records (whose column layouts :func:`~alpaca_lora.data.records.read_records` maps). Pass ``format``
to choose instead.
"""

from __future__ import annotations

from typing import Any

import datasets

from alpaca_lora.data.conversations import (
    CONVERSATION_FORMATS,
    conversation_format,
    conversations_dataset,
    read_conversations,
)
from alpaca_lora.data.records import check_records, instructions_dataset, listed, read_items, resolve_columns
from alpaca_lora.errors import ConfigError, DataError, shown

FORMATS = ("auto", "alpaca", "messages", "sharegpt")


def load_data(
    source: Any, *, format: str = "auto", column_map: dict[str, str] | None = None, skip_bad_records: bool = False
) -> tuple[datasets.Dataset, str]:
    """Load training data in any supported format, detecting which by its columns.

    Args:
        source: Anything :func:`~alpaca_lora.data.records.read_records` reads: a ``.json``,
            ``.jsonl``, ``.csv`` or ``.parquet`` path, a ``datasets.Dataset`` or ``DatasetDict``, or a
            list of dicts.
        format: "auto" (a ``messages`` column: "messages"; a ``conversations`` column: "sharegpt";
            otherwise "alpaca"), or one of "alpaca", "messages", "sharegpt" to choose.
        column_map: Maps your column names to instruction/input/output (Alpaca data only).
        skip_bad_records: Skip bad records and report them (a warning that says how many and shows
            up to five reasons) instead of raising on the first one.

    Returns:
        ``(dataset, format)``: for "alpaca" the ``Dataset`` of
        :func:`~alpaca_lora.data.records.load_instructions` (string columns instruction, input,
        output); for "messages" and "sharegpt" that of
        :func:`~alpaca_lora.data.conversations.load_conversations` (columns messages, tools); and the
        format it was read as, never "auto".

    Raises:
        ConfigError: An unknown ``format``, or ``column_map`` with conversation data.
        DataError: A file-level problem, an explicit ``format`` that does not fit the columns, a bad
            record (unless ``skip_bad_records``), or no usable record at all.

    """
    if format not in FORMATS:
        raise ConfigError(f"format={shown(format, 60)}: unknown data format; use one of {', '.join(FORMATS)} "
                          "('auto' detects it from the columns)")
    if column_map is not None and format in CONVERSATION_FORMATS:
        raise ConfigError(f"column_map={shown(column_map)} with format={format!r}: column_map maps Alpaca columns "
                          "(instruction/input/output) only; drop it for conversation data")
    name, items, columns = read_items(source)
    resolved = _resolve_format(name, columns, format, column_map)
    if resolved == "alpaca":
        records, skipped = check_records(name, items, columns, column_map=column_map,
                                         skip_bad_records=skip_bad_records)
        return instructions_dataset(records, skipped, stacklevel=2), resolved
    if column_map is not None:  # format="auto" found conversations
        raise ConfigError(
            f"column_map={shown(column_map)}: {name} holds conversations ({resolved} form, detected from its "
            f"columns {listed(columns)}), and column_map maps Alpaca columns only; drop it, or pass "
            "format='alpaca' to read the instruction columns instead"
        )
    records, skipped = read_conversations(name, items, format=resolved, skip_bad_records=skip_bad_records)
    return conversations_dataset(records, skipped, stacklevel=2), resolved


def detect_format(columns: list[str]) -> str:
    """The format the column names show: "messages", "sharegpt" or "alpaca".

    Args:
        columns: The column names (record keys) of a source.

    Returns:
        "messages" for a ``messages`` column, else "sharegpt" for a ``conversations`` column, else
        "alpaca".

    """
    return conversation_format(columns) or "alpaca"


def is_conversation_dataset(ds: Any) -> bool:
    """Whether ``ds`` is a ``datasets.Dataset`` of conversations (it has a ``messages`` column).

    Args:
        ds: Any object; a ``Dataset`` of :func:`load_data` or ``load_conversations``, typically.

    Returns:
        True for a ``Dataset`` with a ``messages`` column, False otherwise.

    """
    return isinstance(ds, datasets.Dataset) and "messages" in ds.column_names


def _resolve_format(name: str, columns: list[str], format: str, column_map: dict[str, str] | None) -> str:
    """The format to read ``columns`` as; DataError for an explicit ``format`` that does not fit them."""
    detected = detect_format(columns)
    if format == "auto" or not columns:  # no object among the records: each record is reported instead
        return detected
    if format in CONVERSATION_FORMATS and detected == "alpaca":
        raise DataError(
            f"{name}: format={format!r} does not fit the columns {listed(columns)}: conversation data has a "
            "'messages' (or 'conversations') column. These columns fit format='alpaca'; pass that or "
            "format='auto'"
        )
    if format == "alpaca" and detected != "alpaca" and column_map is None:
        try:
            resolve_columns(name, columns, None)
        except DataError:
            raise DataError(
                f"{name}: format='alpaca' does not fit the columns {listed(columns)}: there are no instruction "
                f"and output columns. These columns fit format={detected!r}; pass that or format='auto'"
            ) from None
    return format
