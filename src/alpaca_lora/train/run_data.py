"""A run's data: read, tokenized once per host (or reused from the cache), split, reported.

Every record is tokenized into one table (:func:`~alpaca_lora.data.pipeline.tokenize_all`), kept in the
tokenized-data cache (:mod:`alpaca_lora.data.token_cache`); the validation split is then a selection of
that table by the same seeded permutation :func:`~alpaca_lora.data.prepare.split_dataset` draws over the
records, so a cached run trains on exactly what an uncached one does. In a run of several processes,
rank 0 tokenizes first and the others read its cache entry (memory-mapped: one copy in the page cache).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.data.chat_templates import alpaca_chat_template
from alpaca_lora.data.pipeline import TokenizeSpec, alpaca_spec, chat_spec, finish
from alpaca_lora.data.prepare import PrepareReport, data_fingerprint, split_dataset
from alpaca_lora.data.prompts import get_template
from alpaca_lora.data.sources import records_key, stored_fingerprint
from alpaca_lora.data.token_cache import cached_table, default_cache_dir
from alpaca_lora.export.chat_template import training_rendering
from alpaca_lora.train.distributed import Dist

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """The data of a run, ready to train on.

    Attributes:
        train_set: Trainable training rows (input_ids, attention_mask, labels, length).
        val_set: Trainable validation rows, or None.
        report: What the training split kept, dropped and truncated.
        chat_template: The chat template the output ships.
        chat_sample: A training conversation, its tools and its training text (checked at save).
        fingerprint: The data fingerprint (checked on resume).
        cache_hit: Whether the tokenized table came from the cache.

    """

    train_set: datasets.Dataset
    val_set: datasets.Dataset | None
    report: PrepareReport
    chat_template: str
    chat_sample: tuple[list[dict[str, Any]], str, str]
    fingerprint: dict[str, Any]
    cache_hit: bool


def records_cache_dir(cfg: FinetuneConfig) -> Path | None:
    """Where :func:`~alpaca_lora.data.sources.load_data` keeps records read from large files (None: its default)."""
    return None if cfg.data_cache_dir in (None, "auto") else Path(cfg.data_cache_dir) / "records"


def tokenized_cache_dir(cfg: FinetuneConfig) -> Path | None:
    """Where tokenized tables are kept; None when ``data_cache_dir`` is None (no cache)."""
    if cfg.data_cache_dir is None:
        return None
    return default_cache_dir() if cfg.data_cache_dir == "auto" else Path(cfg.data_cache_dir) / "tokenized"


def prepare_run_data(cfg: FinetuneConfig, records: datasets.Dataset, data_format: str, tokenizer: Any, dist: Dist,
                     source: Any = None) -> RunData:
    """Tokenize (or reuse), split and report ``records``.

    Args:
        cfg: The run's settings.
        records: What :func:`~alpaca_lora.data.sources.load_data` read.
        data_format: "alpaca", "messages" or "sharegpt".
        tokenizer: The base's tokenizer.
        dist: This process's place in the run; rank 0 tokenizes first.
        source: The ``data`` argument as given (recorded in the fingerprint).

    Raises:
        DataError: No training record keeps a trainable token (before any model loads).

    """
    spec = (alpaca_spec(cfg.template, cfg.cutoff_len, cfg.train_on_inputs, cfg.add_eos_token)
            if data_format == "alpaca" else chat_spec(tokenizer, cfg.chat_template, cfg.cutoff_len,
                                                      cfg.train_on_inputs))
    key, folder = records_key(records), tokenized_cache_dir(cfg)
    table, hit = None, False
    if dist.enabled and key is not None and folder is not None:
        with dist.guard("tokenize the data"):  # rank 0 writes the cache entry; the others then read it
            if dist.is_main:
                table, hit = cached_table(records, tokenizer, spec, records_key=key, cache_dir=folder,
                                          num_proc=cfg.data_num_proc)
    if table is None:
        table, hit = cached_table(records, tokenizer, spec, records_key=key, cache_dir=folder,
                                  num_proc=cfg.data_num_proc)
    table_train, table_val = split_dataset(table, cfg.val_set_size, cfg.seed)
    with warnings.catch_warnings():  # the same split of the records: its clamping was reported just now
        warnings.simplefilter("ignore")
        train_raw, _ = split_dataset(records, cfg.val_set_size, cfg.seed)
    train_set, report = finish(table_train, spec)
    val_set = finish(table_val, spec, "tokenize eval")[0] if table_val is not None else None
    source_text = None if source is None or not isinstance(source, (str, Path)) else str(source)
    stored = stored_fingerprint(records)
    fingerprint = ({**stored, "source": source_text} if stored is not None
                   else data_fingerprint(records, source=source_text))
    chat_source, sample = chat_template_of(cfg, spec, data_format, tokenizer, train_raw)
    return RunData(train_set, val_set, report, chat_source, sample, fingerprint, hit)


def chat_template_of(cfg: FinetuneConfig, spec: TokenizeSpec, data_format: str, tokenizer: Any,
                     train_raw: datasets.Dataset) -> tuple[str, tuple[list[dict[str, Any]], str, str]]:
    """The chat template the output ships and a training conversation with its training text.

    Conversations ship the template they were rendered with; Alpaca records ship their prompt template
    as a chat template, so a server renders ``[user, assistant]`` as training rendered the record.
    """
    first = train_raw[0]
    if data_format == "alpaca":
        source = alpaca_chat_template(get_template(cfg.template), tokenizer)
        messages = [{"role": "system", "content": first["input"], "train": True, "tool_call": False}] \
            if first.get("input") else []
        messages += [{"role": "user", "content": first["instruction"], "train": True, "tool_call": False},
                     {"role": "assistant", "content": first["output"], "train": True, "tool_call": False}]
        tools = ""
    else:
        source = spec.chat_template or ""
        messages, tools = first["messages"], first.get("tools") or ""
    return source, (messages, tools, training_rendering(tokenizer, source, messages, tools))
