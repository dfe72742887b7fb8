"""One entry for training data: Alpaca instructions or conversations, the format detected from the columns.

:func:`load_data` reads a source once and validates it as the format its columns show: a ``messages``
column means OpenAI messages, ``conversations`` means ShareGPT, anything else Alpaca instruction
records (whose column layouts :func:`~alpaca_lora.data.records.read_records` maps). Pass ``format``
to choose instead.

A ``.jsonl`` or ``.parquet`` file is streamed (:mod:`~alpaca_lora.data.stream`): checked a record at a
time into an Arrow file cached under a key of its content, so a million records take bounded memory, the
result is memory-mapped and a second load parses nothing. Other sources (``.json``, ``.csv``, a list, a
``Dataset``) are read whole, so give large data as JSONL or Parquet. :func:`records_key`,
:func:`stored_fingerprint` and :func:`skipped_records` tell what :func:`load_data` knows of the records it
returned.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import datasets

from alpaca_lora.data.conversations import (
    CONVERSATION_FORMATS,
    checked_conversations,
    conversation_features,
    conversation_format,
    conversations_dataset,
    no_usable_conversations,
    read_conversations,
)
from alpaca_lora.data.records import (
    FIELDS,
    check_records,
    checked_records,
    instructions_dataset,
    listed,
    no_usable_records,
    read_items,
    resolve_columns,
    warn_skipped,
)
from alpaca_lora.data.stream import (
    KEPT_REASONS,
    STREAMED,
    FileItems,
    Skips,
    all_columns,
    cache_key,
    cached,
    check_file,
    conversation_line,
    default_cache_dir,
    file_digest,
    instruction_line,
    list_digest,
    publish,
    write_records,
)
from alpaca_lora.errors import ConfigError, DataError, shown

logger = logging.getLogger(__name__)

FORMATS = ("auto", "alpaca", "messages", "sharegpt")

Plan = tuple[str, "dict[str, str | None] | None"]
"""How to read records: the format, and for Alpaca data the source column of each field."""

Skipped = tuple[int, list[str]]
"""Records skipped as bad: how many, and the reasons of the first few (as the warning shows them)."""

# What load_data knows of each Dataset it returned: (records key, stored fingerprint without its source, skipped).
_LOADED: weakref.WeakKeyDictionary[datasets.Dataset, tuple[str | None, dict[str, Any] | None, Skipped]] = (
    weakref.WeakKeyDictionary()
)


def load_data(
    source: Any, *, format: str = "auto", column_map: dict[str, str] | None = None, skip_bad_records: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[datasets.Dataset, str]:
    """Load training data in any supported format, detecting which by its columns.

    Args:
        source: Anything :func:`~alpaca_lora.data.records.read_records` reads: a ``.json``,
            ``.jsonl``, ``.csv`` or ``.parquet`` path, a ``datasets.Dataset`` or ``DatasetDict``, or a
            list of dicts. A ``.jsonl`` or ``.parquet`` file is streamed in bounded memory and cached;
            the others are read whole, so give large data as JSONL or Parquet.
        format: "auto" (a ``messages`` column: "messages"; a ``conversations`` column: "sharegpt";
            otherwise "alpaca"), or one of "alpaca", "messages", "sharegpt" to choose.
        column_map: Maps your column names to instruction/input/output (Alpaca data only).
        skip_bad_records: Skip bad records and report them (a warning that says how many and shows
            up to five reasons) instead of raising on the first one.
        cache_dir: Where the records of a streamed file are cached, as ``<key>.arrow`` beside its
            ``<key>.json`` sidecar (default: ``<HF_DATASETS_CACHE>/alpaca_lora/records``).

    Returns:
        ``(dataset, format)``: for "alpaca" the ``Dataset`` of
        :func:`~alpaca_lora.data.records.load_instructions` (string columns instruction, input,
        output); for "messages" and "sharegpt" that of
        :func:`~alpaca_lora.data.conversations.load_conversations` (columns messages, tools); and the
        format it was read as, never "auto". The same records, in the same order, whichever the path.

    Raises:
        ConfigError: An unknown ``format``, ``column_map`` with conversation data, or a ``cache_dir``
            that cannot be written.
        DataError: A file-level problem, an explicit ``format`` that does not fit the columns, a bad
            record (unless ``skip_bad_records``), or no usable record at all.

    """
    if format not in FORMATS:
        raise ConfigError(f"format={shown(format, 60)}: unknown data format; use one of {', '.join(FORMATS)} "
                          "('auto' detects it from the columns)")
    if column_map is not None and format in CONVERSATION_FORMATS:
        raise ConfigError(f"column_map={shown(column_map)} with format={format!r}: column_map maps Alpaca columns "
                          "(instruction/input/output) only; drop it for conversation data")
    options = repr((format, column_map, bool(skip_bad_records)))  # part of the records key
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() in STREAMED:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        ds, resolved, key, fingerprint = _load_streamed(source, format, column_map, skip_bad_records, folder, options)
    else:
        ds, resolved = _load_whole(source, format, column_map, skip_bad_records)
        key, fingerprint = _content_key(source, options), None
    _LOADED[ds] = (key, fingerprint, _LOADED[ds][2])  # the skipped records were noted while reading
    return ds, resolved


def records_key(ds: Any) -> str | None:
    """A key of the content of records :func:`load_data` returned: equal keys mean equal records.

    Args:
        ds: A ``Dataset`` :func:`load_data` returned (in this process).

    Returns:
        A hex SHA-256 over the source's content (a file's bytes, a list's JSON, a ``Dataset``'s
        fingerprint), the reading options and the cache version; None for any other object, or a
        source with no trustworthy key (a list JSON cannot write exactly).

    """
    entry = _LOADED.get(ds) if isinstance(ds, datasets.Dataset) else None
    return entry[0] if entry is not None else None


def stored_fingerprint(ds: Any) -> dict[str, Any] | None:
    """The :func:`~alpaca_lora.data.prepare.data_fingerprint` of streamed records, computed while reading.

    Args:
        ds: A ``Dataset`` :func:`load_data` returned (in this process).

    Returns:
        ``{"num_records", "sha256", "source"}`` exactly as ``data_fingerprint(ds, source=path)`` gives
        it for the path ``load_data`` read, or None when none was stored (a source read whole, or any
        other object): compute it with ``data_fingerprint`` then.

    """
    entry = _LOADED.get(ds) if isinstance(ds, datasets.Dataset) else None
    return dict(entry[1]) if entry is not None and entry[1] is not None else None


def skipped_records(ds: Any) -> Skipped:
    """The bad records :func:`load_data` skipped (with ``skip_bad_records=True``) while reading ``ds``.

    Args:
        ds: A ``Dataset`` :func:`load_data` returned (in this process).

    Returns:
        ``(count, reasons)``: how many records were skipped, and the reasons of the first
        :data:`~alpaca_lora.data.stream.KEPT_REASONS` of them as its warning shows them (file and line
        or record index, turn, and what is wrong); ``(0, [])`` for any other object.

    """
    entry = _LOADED.get(ds) if isinstance(ds, datasets.Dataset) else None
    return (entry[2][0], list(entry[2][1])) if entry is not None else (0, [])


def _noted(ds: datasets.Dataset, count: int, reasons: list[str]) -> datasets.Dataset:
    """``ds``, with the records skipped while reading it noted for :func:`skipped_records`."""
    _LOADED[ds] = (None, None, (count, reasons[:KEPT_REASONS]))
    return ds


def _load_whole(
    source: Any, format: str, column_map: dict[str, str] | None, skip_bad_records: bool
) -> tuple[datasets.Dataset, str]:
    """Read ``source`` whole into Python objects, check them, and build the ``Dataset`` in memory."""
    name, items, columns = read_items(source)
    resolved = _resolve_format(name, columns, format, column_map)
    if resolved == "alpaca":
        records, skipped = check_records(name, items, columns, column_map=column_map,
                                         skip_bad_records=skip_bad_records)
        return _noted(instructions_dataset(records, skipped, stacklevel=3), len(skipped), skipped), resolved
    if column_map is not None:  # format="auto" found conversations
        raise _column_map_on_conversations(name, columns, column_map, resolved)
    records, skipped = read_conversations(name, items, format=resolved, skip_bad_records=skip_bad_records)
    return _noted(conversations_dataset(records, skipped, stacklevel=3), len(skipped), skipped), resolved


def _content_key(source: Any, options: str) -> str | None:
    """The records key of a source read whole (None when it has no trustworthy one)."""
    if isinstance(source, datasets.DatasetDict):  # the split read_items read
        source = source["train"] if "train" in source else source[next(iter(source))]
    if isinstance(source, datasets.Dataset):
        return cache_key(f"dataset {source._fingerprint}", options)
    if isinstance(source, (list, tuple)):
        digest = list_digest(source)
        return None if digest is None else cache_key(f"list {digest}", options)
    path = Path(source)
    return cache_key(f"file {path.suffix.lower()} {file_digest(path)}", options)


def _load_streamed(
    source: str | Path, format: str, column_map: dict[str, str] | None, skip_bad_records: bool, folder: Path,
    options: str,
) -> tuple[datasets.Dataset, str, str, dict[str, Any]]:
    """Stream a ``.jsonl`` or ``.parquet`` file into the cache (or reuse its entry); warn of skipped records.

    Returns ``(dataset, format, records key, fingerprint)``.
    """
    path = Path(source)
    suffix = check_file(path)
    key = cache_key(f"file {suffix} {file_digest(path)}", options)
    found = cached(folder, key)
    if found is None:
        found = _stream_into_cache(str(source), path, format, column_map, skip_bad_records, folder, key)
    else:
        logger.info("%s: reusing its %d records read before (%s)", source, len(found[0]), folder / f"{key}.arrow")
    ds, sidecar = found
    skipped = sidecar["skipped"]
    reasons = [str(path) + r for r in skipped["reasons"]]
    warn_skipped(reasons, len(ds), count=skipped["count"], stacklevel=3)
    fingerprint = {**sidecar["fingerprint"], "source": str(source)}
    return _noted(ds, skipped["count"], reasons), sidecar["format"], key, fingerprint


def _stream_into_cache(
    name: str, path: Path, format: str, column_map: dict[str, str] | None, skip_bad_records: bool, folder: Path,
    key: str,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Check a file's records a batch at a time into the cache entry ``key``; errors exactly as :func:`_load_whole`.

    The columns of a JSONL file come from its first records (every key, in a smaller file). Should the
    rest hold a key that changes how records are read (an ``input`` column that appears late, say), the
    file is read again with every key known, so the records, and the errors, are those of reading it whole.
    """
    items = FileItems(path)
    while True:
        known, columns = items.complete, items.columns
        try:
            plan = _plan(name, columns, format, column_map, empty=items.empty)
        except (DataError, ConfigError):
            if known:
                raise
            items = FileItems(path, all_columns(path))  # plan from every key: the error of reading it whole
            continue
        skips = Skips()
        if plan[1] is not None:
            checked = checked_records(items, plan[1], skip_bad_records=skip_bad_records, skipped=skips)
            features, line = datasets.Features({f: datasets.Value("string") for f in FIELDS}), instruction_line
        else:
            checked = checked_conversations(items, plan[0], skip_bad_records=skip_bad_records, skipped=skips)
            features, line = conversation_features(), conversation_line
        try:
            tmp, count, sha256 = write_records(checked, features, line, folder, key)
        except DataError:  # a bad record; were it read with every key known, would it be read the same way?
            if known:
                raise
            everything = items.columns if items.complete else all_columns(path)
            if _try_plan(name, everything, format, column_map) == plan:
                raise
            items = FileItems(path, everything)
            continue
        if not known and _try_plan(name, items.columns, format, column_map) != plan:
            tmp.unlink(missing_ok=True)
            items = FileItems(path, items.columns)  # a later key changes the reading: read again, knowing it
            continue
        if count == 0:
            tmp.unlink(missing_ok=True)
            no_usable = no_usable_records if plan[1] is not None else no_usable_conversations
            raise no_usable(name, skips.count, skips.reasons)
        _plan(name, items.columns, format, column_map, empty=False, log=True)  # logs a non-Alpaca layout once
        reasons = [r.removeprefix(str(path)) for r in skips.reasons]  # the path is the caller's, on every load
        sidecar = {"format": plan[0], "num_records": count, "skipped": {"count": skips.count, "reasons": reasons},
                   "fingerprint": {"num_records": count, "sha256": sha256}}
        return publish(tmp, folder, key, sidecar), {"key": key, **sidecar}


def _plan(
    name: str, columns: list[str], format: str, column_map: dict[str, str] | None, *, empty: bool, log: bool = False
) -> Plan:
    """How to read records with these columns, or the error :func:`_load_whole` raises before any record."""
    resolved = _resolve_format(name, columns, format, column_map)
    if resolved == "alpaca":
        if empty:
            check_records(name, [], columns)  # raises its error for no records, as reading whole does
        return resolved, resolve_columns(name, columns, column_map, log=log) if columns else {f: f for f in FIELDS}
    if column_map is not None:
        raise _column_map_on_conversations(name, columns, column_map, resolved)
    if empty:
        read_conversations(name, [], format=resolved)  # raises its error for no records
    return resolved, None


def _try_plan(name: str, columns: list[str], format: str, column_map: dict[str, str] | None) -> Plan | None:
    """:func:`_plan` for records that exist, or None where it raises."""
    try:
        return _plan(name, columns, format, column_map, empty=False)
    except (DataError, ConfigError):
        return None


def _column_map_on_conversations(
    name: str, columns: list[str], column_map: dict[str, str], resolved: str
) -> ConfigError:
    return ConfigError(
        f"column_map={shown(column_map)}: {name} holds conversations ({resolved} form, detected from its "
        f"columns {listed(columns)}), and column_map maps Alpaca columns only; drop it, or pass "
        "format='alpaca' to read the instruction columns instead"
    )


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
            resolve_columns(name, columns, None, log=False)
        except DataError:
            raise DataError(
                f"{name}: format='alpaca' does not fit the columns {listed(columns)}: there are no instruction "
                f"and output columns. These columns fit format={detected!r}; pass that or format='auto'"
            ) from None
    return format
