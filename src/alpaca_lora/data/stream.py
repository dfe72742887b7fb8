"""Streamed reading: a JSONL or Parquet file read record by record into a cached, memory-mapped Arrow file.

A million records never live as Python objects at once. :class:`FileItems` yields a file's raw records
one at a time (a JSONL line; a Parquet row, one record batch at a time), the caller's checks turn them
into records, and :func:`write_records` writes those :data:`BATCH` at a time with ``datasets``'
``ArrowWriter``, hashing each as :func:`~alpaca_lora.data.prepare.data_fingerprint` does, so the
fingerprint costs no second pass. The file is keyed by content (:func:`cache_key` over
:func:`file_digest`, the reading options and :data:`RECORDS_CACHE_VERSION`): a second load of the same
bytes parses nothing and memory-maps the Arrow file. Layout of the cache folder::

    <key>.arrow              the records, in the Arrow stream format datasets.Dataset.from_file reads
    <key>.json               the sidecar, written last (its presence marks a complete entry): key, format,
                             num_records, skipped (count and first reasons), fingerprint sha256
    .<key>.<pid>.<hex>.tmp   a write under way, or killed; never read

Nothing here knows the data formats beyond their fingerprint lines: the readers of
:mod:`~alpaca_lora.data.records` and :mod:`~alpaca_lora.data.conversations` check the records.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import datasets

from alpaca_lora.data.encoding import unencodable_at
from alpaca_lora.errors import ConfigError, DataError, shown
from alpaca_lora.files import wide_encoding

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
STREAMED = (".jsonl", ".parquet")
RECORDS_CACHE_VERSION = 1
"""Part of every cache key: raise it when a change of reading or checking changes the records read."""
BATCH = 10_000  # records per Arrow write, per Parquet read, and JSONL records read to detect the columns
KEPT_REASONS = 5  # skipped records whose reason is kept (all are counted)
_CHUNK = 1 << 20  # bytes per read while hashing a file

Item = tuple[str, Any, "str | None"]
"""One raw record: (where it is, for messages; the parsed object; a problem found while parsing)."""

# ---- files: checks and raw items ---------------------------------------------------------------


def check_file(path: Path) -> str:
    """The lower-case suffix of the data file ``path``; DataError if it is not a file of a known type."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"data file {path} {what} (working directory: {Path.cwd()}); pass a data file path")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"data file {path}: unknown extension {shown(suffix, 40)}; use one of {', '.join(SUFFIXES)}")
    return suffix


def check_start(path: Path, head: bytes) -> None:
    """DataError if a text data file starts with a UTF-16 or UTF-32 byte order mark (``head``: its first bytes)."""
    wide = wide_encoding(head)
    if wide is not None:
        raise DataError(f"data file {path} is {wide} text; save it as UTF-8")


def empty_file(path: Path) -> DataError:
    """The error for a data file that holds only white space."""
    return DataError(f"data file {path} is empty; it needs at least one record")


def jsonl_items(name: str, lines: Iterable[str]) -> Iterator[Item]:
    """The raw items of JSON Lines text, one per non-blank line (numbered from 1), named ``"<name> line <n>"``."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            yield where, json.loads(line), None
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
            if unencodable_at(line) is not None:
                problem = "holds bytes that are not valid UTF-8"
            yield where, None, f"{problem}; each line must be one JSON object"
        except RecursionError:
            yield where, None, "JSON nested too deeply; each line must be one flat JSON object"
        except ValueError as exc:  # an integer literal too long to convert
            yield where, None, f"not valid data ({exc}); every field must be a string"


def file_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, read one at a time: those that splitting its decoded text at newlines gives.

    Undecodable bytes become lone surrogates (so a record holding them is reported alone); a UTF-8 byte
    order mark is dropped. Raises DataError for an unreadable, UTF-16/32 or all-blank file.
    """
    blank = True
    try:
        with path.open("rb") as file:
            check_start(path, file.read(4))
            file.seek(0)
            for number, raw in enumerate(file):  # splits after b"\n" only, as the text split does
                blank = blank and not raw.strip()
                raw = raw[:-1] if raw.endswith(b"\n") else raw
                yield raw.decode("utf-8-sig" if number == 0 else "utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from None
    if blank:
        raise empty_file(path)


def open_parquet(path: Path) -> tuple[list[str], int, Iterator[Item]]:
    """``(columns, number of rows, raw items)`` of a Parquet file, read :data:`BATCH` rows at a time."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path, pre_buffer=False, buffer_size=_CHUNK)  # pages read as needed, not a row group
        columns, rows = file.schema_arrow.names, file.metadata.num_rows
    except Exception as exc:  # pyarrow raises many types (ArrowInvalid, OSError, ...)
        raise _unreadable_parquet(path, exc) from None
    return columns, rows, _parquet_rows(path, file)


def _parquet_rows(path: Path, file: Any) -> Iterator[Item]:
    """The rows of an open ``pyarrow.parquet.ParquetFile`` as raw items, one record batch in memory at a time."""
    index = 0
    try:
        for batch in file.iter_batches(batch_size=BATCH):
            for row in batch.to_pylist():
                yield f"{path}, record index {index}", row, None
                index += 1
    except Exception as exc:
        raise _unreadable_parquet(path, exc) from None


def _unreadable_parquet(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc})")


def item_keys(items: Iterable[Item]) -> list[str]:
    """The string keys of the items' objects, in first-seen order: the columns of a list of records."""
    keys: dict[str, None] = {}
    for _, obj, _ in items:
        if isinstance(obj, dict):
            keys.update(dict.fromkeys(k for k in obj if isinstance(k, str)))  # other keys: a record problem
    return list(keys)


class FileItems:
    """The raw items of a ``.jsonl`` or ``.parquet`` file, one at a time, and the columns seen so far.

    A Parquet file's columns are its schema, known before any row is read. A JSONL file's are the keys
    of its records: those of the first :data:`BATCH` records at first (all of them in a smaller file),
    then every key seen while iterating. ``complete`` says whether ``columns`` holds every key of the
    file; it is True from the start for Parquet and once a JSONL file has been read to its end.

    Args:
        path: A ``.jsonl`` or ``.parquet`` file (checked with :func:`check_file`).
        columns: Every key of the file when already known (from :func:`all_columns`): ``complete`` is
            True from the start.

    Raises:
        DataError: A file-level problem (unreadable, not Parquet, UTF-16, all blank).

    """

    def __init__(self, path: Path, columns: list[str] | None = None) -> None:
        self.path = path
        if path.suffix.lower() == ".parquet":
            columns, rows, self._items = open_parquet(path)
            self._keys = dict.fromkeys(columns)
            self.empty, self.complete = rows == 0, True
            return
        self._items = jsonl_items(str(path), file_lines(path))
        head = list(islice(self._items, BATCH))
        self.empty = not head
        self.complete = columns is not None or len(head) < BATCH
        self._keys = dict.fromkeys(columns if columns is not None else item_keys(head))
        self._items = chain(head, self._items)

    @property
    def columns(self) -> list[str]:
        """The keys seen so far, in first-seen order (every key once ``complete``)."""
        return list(self._keys)

    def __iter__(self) -> Iterator[Item]:
        """Yield each raw item once; a JSONL file's new keys join ``columns`` as they appear."""
        if self.complete:
            yield from self._items
            return
        keys = self._keys
        for item in self._items:
            obj = item[1]
            if isinstance(obj, dict) and not keys.keys() >= obj.keys():
                keys.update(dict.fromkeys(obj))  # JSON keys are strings
            yield item
        self.complete = True


def all_columns(path: Path) -> list[str]:
    """Every key of a ``.jsonl`` file's records (a parsing pass), or a ``.parquet`` file's schema."""
    if path.suffix.lower() == ".parquet":
        return open_parquet(path)[0]
    return item_keys(jsonl_items(str(path), file_lines(path)))


# ---- cache keys ----------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from None
    return digest.hexdigest()


def list_digest(records: list[Any] | tuple[Any, ...]) -> str | None:
    """The SHA-256 of a list of records as JSON lines; None when JSON cannot stand for it exactly.

    That is when a record is not an object with string keys (JSON would turn ``1`` into ``"1"``,
    while the reader refuses the one and reads the other) or holds a value JSON cannot write.
    """
    digest = hashlib.sha256()
    for record in records:
        if not isinstance(record, dict) or not all(isinstance(k, str) for k in record):
            return None
        try:
            digest.update(json.dumps(record).encode("ascii") + b"\n")
        except (TypeError, ValueError, RecursionError):
            return None
    return digest.hexdigest()


def cache_key(content: str, options: str) -> str:
    """The key of the records read from ``content`` (e.g. ``"file .jsonl <sha256>"``) with ``options``."""
    text = f"alpaca_lora records v{RECORDS_CACHE_VERSION}\n{options}\n{content}"
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def default_cache_dir() -> Path:
    """``<HF_DATASETS_CACHE>/alpaca_lora/records``: where read records are cached unless told otherwise."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "alpaca_lora" / "records"


# ---- writing and reading the cache ---------------------------------------------------------------


class Skips:
    """Skipped records: how many, and the reasons of the first :data:`KEPT_REASONS` (so memory stays bounded)."""

    def __init__(self) -> None:
        self.count = 0
        self.reasons: list[str] = []

    def append(self, reason: str) -> None:
        """Count one skipped record, keeping its reason if it is among the first few."""
        self.count += 1
        if len(self.reasons) < KEPT_REASONS:
            self.reasons.append(reason)


def instruction_line(record: dict[str, str]) -> bytes:
    """The line :func:`~alpaca_lora.data.prepare.data_fingerprint` hashes for an instruction record."""
    values = (record["instruction"], record["input"], record["output"])
    return json.dumps([v or "" for v in values]).encode("ascii") + b"\n"


def conversation_line(record: dict[str, Any]) -> bytes:
    """The line :func:`~alpaca_lora.data.prepare.data_fingerprint` hashes for a conversation."""
    return json.dumps([record["messages"], record["tools"]], sort_keys=True).encode("ascii") + b"\n"


def write_records(
    records: Iterable[dict[str, Any]], features: datasets.Features, line: Callable[[dict[str, Any]], bytes],
    folder: Path, key: str,
) -> tuple[Path, int, str]:
    """Write records to a temporary Arrow file in ``folder``, :data:`BATCH` at a time, hashing each.

    Args:
        records: The checked records, each a dict with the columns of ``features``.
        features: The columns and their types.
        line: The fingerprint line of one record (:func:`instruction_line`, :func:`conversation_line`).
        folder: The cache folder (created if missing).
        key: The cache key, part of the temporary name.

    Returns:
        ``(temporary file, number of records, SHA-256 of their lines)``; :func:`publish` the file (or
        remove it). On an error the file is removed.

    Raises:
        ConfigError: ``folder`` cannot be written.

    """
    from datasets.arrow_writer import ArrowWriter

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(folder, exc) from None
    tmp = folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    digest, count, names = hashlib.sha256(), 0, list(features)
    batch: list[dict[str, Any]] = []
    try:
        with ArrowWriter(features=features, path=str(tmp)) as writer:
            for record in records:
                digest.update(line(record))
                batch.append(record)
                if len(batch) == BATCH:
                    writer.write_batch({n: [r[n] for r in batch] for n in names})
                    count, batch = count + len(batch), []
            if batch:
                writer.write_batch({n: [r[n] for r in batch] for n in names})
                count += len(batch)
            writer.finalize()
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _unwritable(folder, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, count, digest.hexdigest()


def publish(tmp: Path, folder: Path, key: str, sidecar: dict[str, Any]) -> datasets.Dataset:
    """Move a written file to ``<key>.arrow``, then write the sidecar ``<key>.json``; return the records.

    Both moves are atomic (``os.replace``), and the sidecar comes last, so a run killed at any point
    leaves no entry that :func:`cached` would take for complete.
    """
    arrow, meta = folder / f"{key}.arrow", folder / f"{key}.json"
    side = folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.json.tmp"
    try:
        os.replace(tmp, arrow)
        side.write_text(json.dumps({"key": key, **sidecar}, indent=1), encoding="utf-8")
        os.replace(side, meta)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        raise _unwritable(folder, exc) from None
    return datasets.Dataset.from_file(str(arrow))


def cached(folder: Path, key: str) -> tuple[datasets.Dataset, dict[str, Any]] | None:
    """The records and sidecar of the complete entry ``key`` in ``folder``, or None when there is none."""
    arrow, meta = folder / f"{key}.arrow", folder / f"{key}.json"
    try:
        sidecar = json.loads(meta.read_text(encoding="utf-8"))
        if not isinstance(sidecar, dict) or sidecar.get("key") != key or not arrow.is_file():
            return None
        ds = datasets.Dataset.from_file(str(arrow))
    except (OSError, ValueError):  # missing, unreadable or damaged: read the data again
        return None
    return (ds, sidecar) if len(ds) == sidecar.get("num_records") else None


def _unwritable(folder: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write the record cache in {folder} ({exc.strerror or exc}); pass cache_dir= a "
                       "writable folder (or set HF_DATASETS_CACHE)")
