"""The tokenized-data cache: a tokenized table reused by every later run, resume and process on the host.

The table of :func:`~alpaca_lora.data.pipeline.tokenize_all` is stored under a key that covers everything
that changes the features: the records (their content key, see
:func:`~alpaca_lora.data.sources.records_key`), the tokenizer (its vocabulary, merges, normalizer and
special tokens), the template, ``cutoff_len``, ``train_on_inputs``, ``add_eos_token`` and
:data:`CACHE_VERSION` (raised whenever this code changes what it writes). A changed key tokenizes again;
an entry is never updated in place.

Layout: ``<cache_dir>/<key>/`` holds the Arrow files (memory-mapped when read, so processes that read
the same entry share its pages) and ``meta.json``, written last: a folder without it is an interrupted
write and is ignored. Entries are written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from alpaca_lora.data.pipeline import TokenizeSpec, tokenize_all
from alpaca_lora.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
META = "meta.json"


def default_cache_dir() -> Path:
    """``<datasets cache>/alpaca_lora/tokenized`` (``HF_DATASETS_CACHE`` moves it)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "alpaca_lora" / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's ids.

    That is its backend (vocabulary, merges, normalizer, added tokens), its class and its special token ids.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("the tokenized-data cache needs a fast tokenizer (one with tokenizer.json); load it with "
                          "use_fast=True or pass data_cache_dir=None")
    specials = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    digest = hashlib.sha256(backend.to_str().encode("utf-8"))
    digest.update(json.dumps([type(tokenizer).__name__, specials], sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def cache_key(records_key: str, tokenizer: Any, spec: TokenizeSpec) -> str:
    """The entry name of ``records`` tokenized by ``tokenizer`` with ``spec``."""
    parts = {"records": records_key, "tokenizer": tokenizer_fingerprint(tokenizer), "spec": spec.to_dict(),
             "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def cached_table(records: datasets.Dataset, tokenizer: Any, spec: TokenizeSpec, *, records_key: str | None,
                 cache_dir: str | Path | None, num_proc: int | None = None, desc: str = "tokenize",
                 ) -> tuple[datasets.Dataset, bool]:
    """The tokenized table of ``records``: read from the cache, or tokenized and stored there.

    Args:
        records: The records (Alpaca or conversations).
        tokenizer: The tokenizer.
        spec: What decides the features.
        records_key: A key of the records' content; None tokenizes without caching.
        cache_dir: The cache folder; None tokenizes without caching.
        num_proc: Worker processes for tokenizing.
        desc: Label of the progress bar.

    Returns:
        ``(table, hit)``: the table of :func:`~alpaca_lora.data.pipeline.tokenize_all`, and whether it
        came from the cache.

    """
    if records_key is None or cache_dir is None:
        return tokenize_all(records, tokenizer, spec, num_proc=num_proc, desc=desc), False
    key = cache_key(records_key, tokenizer, spec)
    folder = Path(cache_dir) / key
    if (folder / META).is_file():
        table = _load(folder)
        if table is not None:
            logger.info("tokenized data: reusing %s (%d records)", folder, len(table))
            return table, True
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(cache_dir) / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        table = tokenize_all(records, tokenizer, spec, num_proc=num_proc, cache_file=tmp / "data.arrow",
                             fingerprint=key, desc=desc)
        files = [Path(f["filename"]).name for f in table.cache_files]
        meta = {"key": key, "version": CACHE_VERSION, "records": len(table), "files": files,
                "spec": {k: v for k, v in spec.to_dict().items() if k != "chat_template"},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "records_key": records_key}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        del table
        if folder.exists() and _load(folder) is None:  # a damaged entry of an earlier run
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process stored the same entry first: use it
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    table = _load(folder)
    if table is None:
        raise ConfigError(f"the tokenized-data cache entry {folder} could not be read back; remove it (alpaca-lora "
                          "cache --clear) or pass data_cache_dir=None")
    return table, False


@dataclass
class CacheEntry:
    """One entry of the cache.

    Attributes:
        path: Its folder.
        records: Rows (records) it holds.
        bytes: Size on disk.
        created: When it was written (ISO 8601).
        spec: The template kind and settings it was tokenized with.

    """

    path: Path
    records: int
    bytes: int
    created: str
    spec: dict[str, Any]


def list_cache(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """The complete entries of ``cache_dir`` (default :func:`default_cache_dir`), newest first."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entries = []
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        meta = _meta(folder)
        if meta is None:
            continue
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        entries.append(CacheEntry(folder, int(meta.get("records", 0)), size, str(meta.get("created", "")),
                                  dict(meta.get("spec", {}))))
    return sorted(entries, key=lambda e: e.created, reverse=True)


def clear_cache(cache_dir: str | Path | None = None) -> tuple[int, int]:
    """Remove every entry (and interrupted write) of ``cache_dir``; return ``(entries removed, bytes freed)``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    removed = freed = 0
    for folder in list(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or not (_meta(folder) is not None or folder.name.endswith(".tmp")):
            continue  # only what this cache wrote
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed, freed


def _meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("version") == CACHE_VERSION else None


def _load(folder: Path) -> datasets.Dataset | None:
    """The entry's table, memory-mapped; None when it is damaged (then it is tokenized again)."""
    meta = _meta(folder)
    try:
        parts = [datasets.Dataset.from_file(str(folder / name)) for name in meta["files"]] if meta else []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("tokenized-data cache entry %s is damaged (%s); tokenizing again", folder, exc)
        return None
    if not parts or sum(len(p) for p in parts) != meta.get("records"):
        return None
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
