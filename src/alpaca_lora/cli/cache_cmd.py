"""``alpaca-lora cache``: list or clear the tokenized-data cache."""

from __future__ import annotations

import argparse
from typing import Any


def add_cache_parser(sub: Any) -> None:
    """Add the ``cache`` subcommand to the subparsers ``sub``."""
    cache = sub.add_parser("cache", help="list or clear the tokenized-data cache",
                           description="List the tokenized-data cache (what later runs, resumes and the other "
                           "processes of a run reuse instead of tokenizing again), or clear it.")
    cache.add_argument("--dir", default=None, help="the cache folder: a run's data_cache_dir, or by default "
                       "HF_DATASETS_CACHE/alpaca_lora (the tokenized tables and the records read from large files)")
    cache.add_argument("--clear", action="store_true", help="remove every entry")


def cmd_cache(args: argparse.Namespace) -> int:
    """List (or clear) the entries; print one line each and a total."""
    from pathlib import Path

    from alpaca_lora.data.token_cache import clear_cache, default_cache_dir, list_cache

    folder = Path(args.dir) / "tokenized" if args.dir else default_cache_dir()
    if args.clear:
        removed, freed = clear_cache(folder)
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} ({freed / 2**20:,.1f} MB) from {folder}")
        return 0
    entries = list_cache(folder)
    for e in entries:
        template = (e.spec.get("template") or {}).get("name", "a chat template")
        what = f"{e.spec.get('kind')}, {template}, cutoff {e.spec.get('cutoff_len')}"
        print(f"{e.path.name}  {e.records:>10,} records  {e.bytes / 2**20:>9,.1f} MB  {e.created}  {what}")
    total = sum(e.bytes for e in entries)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {total / 2**20:,.1f} MB in {folder}")
    return 0
