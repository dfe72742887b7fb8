"""Instruction data: read and validate records, split them, tokenize them with loss masks.

1. :func:`read_records` / :func:`load_instructions` read JSON, JSONL, CSV, Parquet, a ``Dataset`` /
   ``DatasetDict`` or a list of dicts into ``{"instruction", "input", "output"}`` records. A bad record
   is an error naming the file, the line (or record index) and the fix, or a reported skip.
2. :func:`split_dataset` holds out a validation set, clamped to the data (alpaca-lora#470).
3. :func:`tokenize_instruction` (through :func:`assemble`) is the only place labels are masked;
   :func:`~alpaca_lora.data.pipeline.prepare_dataset` runs the same code over a dataset in batches and
   drops, and counts, records left without a trainable label.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from alpaca_lora.data.encoding import unencodable_at
from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.prompts import PromptTemplate, get_template
from alpaca_lora.data.records import FIELDS, load_instructions, read_records
from alpaca_lora.errors import ConfigError, DataError, shown

logger = logging.getLogger(__name__)

DROP_PROMPT_FULL = "prompt fills cutoff_len"
DROP_EMPTY_RESPONSE = "empty response"

__all__ = [
    "PrepareReport",
    "data_fingerprint",
    "load_instructions",
    "read_records",
    "split_dataset",
    "tokenize_instruction",
    "tokenize_prompt",
]


# ---- validation split ------------------------------------------------------------------------


def split_dataset(
    ds: datasets.Dataset, val_set_size: float | int, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out a validation set after a deterministic shuffle.

    Args:
        ds: The records.
        val_set_size: 0 for none; a fraction in (0, 1) of the records (rounded, at least one); or a
            count >= 1. A size that would leave no training record is clamped to ``len(ds) - 1`` (to
            none below two records), with a warning (alpaca-lora#470).
        seed: Seed of the shuffle.

    Returns:
        ``(train, val)``, both shuffled; ``val`` is None when nothing is held out.

    Raises:
        ConfigError: ``val_set_size`` is negative, not a number, or a count that is not whole.

    """
    v = val_set_size
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v))
            or v < 0 or (v >= 1 and v != int(v))):
        raise ConfigError(f"val_set_size={shown(v)}: must be 0 (no validation), a fraction in (0, 1) or a count")
    if v == 0:
        return ds, None
    n = len(ds)
    n_val = max(1, round(v * n)) if v < 1 else int(v)
    if n_val > n - 1:
        clamped = max(n - 1, 0)
        warnings.warn(
            f"val_set_size={shown(v)} asks for {n_val} validation record(s) but the data has {n}; clamped to "
            f"{clamped} to leave at least one record for training"
            + ("" if clamped else " (no validation set)"),
            stacklevel=2,
        )
        if clamped == 0:
            return ds, None
        n_val = clamped
    train, val = split_indices(n, n_val, seed)
    return ds.select(train), ds.select(val)


def split_indices(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training and validation record indices :func:`split_dataset` selects: one seeded permutation.

    Args:
        n: Records.
        n_val: Records held out (already clamped).
        seed: Seed of the permutation.

    Returns:
        ``(train, val)`` index arrays; together a permutation of ``range(n)``.

    """
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val:], order[:n_val]


# ---- tokenization and loss masks -------------------------------------------------------------


def tokenize_instruction(
    record: dict[str, Any],
    tokenizer: Any,
    template: str | Path | dict[str, Any] | PromptTemplate = "alpaca",
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
) -> dict[str, list[int]]:
    """Tokenize one record into ``input_ids``, ``attention_mask`` and ``labels``; the only masking.

    The prompt (with the tokenizer's special tokens, e.g. BOS) and the response (without) are
    tokenized apart and concatenated, so the mask boundary is exact even where a BPE merge would
    cross it in the joined text. Labels are -100 on the prompt (unless ``train_on_inputs``) and equal
    the ids on the response and EOS. Past ``cutoff_len`` the response is cut and EOS still comes last.
    A prompt that alone leaves no room for one response token is cut to ``cutoff_len`` with no
    response and no EOS: it has no trainable label, and :func:`prepare_dataset` drops it.

    Args:
        record: A dict with string ``instruction`` and ``output`` and an optional ``input``.
        tokenizer: A Hugging Face tokenizer.
        template: Template name, JSON path, dict or :class:`PromptTemplate`.
        cutoff_len: Longest result, in tokens.
        train_on_inputs: Also put loss on the prompt tokens.
        add_eos_token: Append the tokenizer's EOS after the response.

    Returns:
        Equal-length lists of ints: ``input_ids``, ``attention_mask`` (all 1) and ``labels``.

    Raises:
        DataError: The record lacks a string instruction or output.
        ConfigError: Bad ``cutoff_len`` or template, or ``add_eos_token`` with a tokenizer without EOS.

    """
    tmpl = _template(template)
    return _encode(record, tokenizer, tmpl, cutoff_len, train_on_inputs, add_eos_token)[0]


def tokenize_prompt(prompt: str, tokenizer: Any) -> list[int]:
    """Token ids of a rendered prompt, exactly as training sees them (generation uses this too).

    The tokenizer's special tokens (BOS) are added; a trailing EOS, which some tokenizers append to
    every text, is removed, because a prompt must not end the sequence.
    """
    return without_trailing_eos(list(tokenizer(prompt, add_special_tokens=True)["input_ids"]), tokenizer)


def without_trailing_eos(ids: list[int], tokenizer: Any) -> list[int]:
    """``ids`` less a trailing EOS (some tokenizers end every text with one; a prompt must not)."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    return ids[:-1] if eos_id is not None and ids and ids[-1] == eos_id else ids


def _encode(
    record: dict[str, Any], tokenizer: Any, template: PromptTemplate, cutoff_len: int,
    train_on_inputs: bool, add_eos_token: bool,
) -> tuple[dict[str, list[int]], str, int]:
    """Tokenize and mask one record; return ``(features, status, prompt tokens)``.

    ``status`` is "ok", "truncated" (the response was cut) or :data:`DROP_PROMPT_FULL`.
    """
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
        raise ConfigError(f"cutoff_len={shown(cutoff_len)}: must be a positive int (tokens per example)")
    instruction, inp, output = (record.get(f) for f in FIELDS)
    if not (isinstance(instruction, str) and isinstance(output, str) and isinstance(inp, (str, type(None)))):
        found = ", ".join(f"{f}: {type(record.get(f)).__name__}" for f in FIELDS)
        raise DataError(
            f"a record needs string 'instruction' and 'output' and an optional string 'input' ({found}); "
            "load data with load_instructions(), which validates it"
        )
    for name, text in zip(FIELDS, (instruction, inp or "", output), strict=True):
        at = unencodable_at(text)
        if at is not None:  # the tokenizer would fail deep inside on it
            raise DataError(
                f"the record's {name!r} holds a lone surrogate ({text[at]!a} at character {at}), which cannot be "
                "encoded as UTF-8; fix the text (e.g. text.encode('utf-8', 'replace').decode()), or load the data "
                "with load_instructions(), which refuses such records by name"
            )
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if add_eos_token and eos_id is None:
        raise ConfigError(
            "add_eos_token=True but the tokenizer has no EOS token; set tokenizer.eos_token "
            "(e.g. tokenizer.eos_token = '</s>') or pass add_eos_token=False"
        )
    prompt_ids = tokenize_prompt(template.render(instruction, inp or None), tokenizer)
    response_ids = list(tokenizer(output, add_special_tokens=False)["input_ids"])
    return assemble(prompt_ids, response_ids, eos_id, cutoff_len, train_on_inputs, add_eos_token)


def assemble(prompt_ids: list[int], response_ids: list[int], eos_id: int | None, cutoff_len: int,
             train_on_inputs: bool, add_eos_token: bool) -> tuple[dict[str, list[int]], str, int]:
    """Join a tokenized prompt and response, cut at ``cutoff_len`` and mask: the one definition of the labels.

    Returns:
        ``(features, status, prompt tokens)``; ``status`` is "ok", "truncated" (the response was cut)
        or :data:`DROP_PROMPT_FULL` (no room for one response token: prompt only, no EOS).

    """
    n_eos = 1 if add_eos_token else 0

    if len(prompt_ids) >= cutoff_len - n_eos:  # no room for one response token: prompt only, no EOS
        input_ids = prompt_ids[:cutoff_len]
        labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(input_ids)
        status = DROP_PROMPT_FULL
    else:
        room = cutoff_len - n_eos - len(prompt_ids)
        status = "truncated" if len(response_ids) > room else "ok"
        response = response_ids[:room] + ([eos_id] if add_eos_token else [])  # EOS last, even when cut
        input_ids = prompt_ids + response
        labels = (list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)) + response
    assert len(input_ids) == len(labels) <= cutoff_len
    features = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
    return features, status, len(prompt_ids)


@lru_cache(maxsize=32)
def _cached_template(key: str, mtime: float | None) -> PromptTemplate:
    return get_template(key)


def _template(template: str | Path | dict[str, Any] | PromptTemplate) -> PromptTemplate:
    """Resolve ``template`` once per name (and per file version), so per-record calls are cheap."""
    if isinstance(template, (PromptTemplate, dict)):
        return get_template(template)
    try:
        mtime = Path(template).stat().st_mtime
    except (OSError, ValueError):
        mtime = None
    return _cached_template(str(template), mtime)


@dataclass
class PrepareReport:
    """What :func:`~alpaca_lora.data.pipeline.prepare_dataset` (or ``prepare_conversations``) did.

    Attributes:
        kept: Records kept.
        dropped: Records dropped because no token carries a label.
        drop_reasons: Dropped records by reason (``"prompt fills cutoff_len"``, ``"empty response"``).
        truncated: Kept records cut at ``cutoff_len``.
        label_tokens: Tokens that carry loss, over the kept records.
        total_tokens: All tokens of the kept records.
        turns: Conversations only: assistant turns trained, over the kept conversations.
        dropped_turns: Conversations only: whole turns cut off at ``cutoff_len``.

    """

    kept: int
    dropped: int
    drop_reasons: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    label_tokens: int = 0
    total_tokens: int = 0
    turns: int | None = None
    dropped_turns: int = 0

    def summary(self) -> str:
        """Return one human-readable line."""
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.drop_reasons.items()))
        share = 100.0 * self.label_tokens / self.total_tokens if self.total_tokens else 0.0
        return (
            f"kept {self.kept} of {self.kept + self.dropped} records, dropped {self.dropped}"
            + (f" ({reasons})" if reasons else "")
            + f", truncated {self.truncated}"
            + (f" ({self.dropped_turns} turns cut off); {self.turns} assistant turns trained"
               if self.turns is not None else "")
            + f"; {self.total_tokens} tokens, {self.label_tokens} with loss ({share:.1f}%)"
        )


def data_fingerprint(ds: datasets.Dataset, source: object = None) -> dict[str, Any]:
    """Fingerprint the records of ``ds``: their count and a SHA-256 over their fields, in order.

    Args:
        ds: Records with instruction, output and (optional) input columns, or conversations (``messages``
            and optional ``tools`` columns).
        source: Where they came from: a path is recorded as text, anything else by its type name.

    Returns:
        ``{"num_records": int, "sha256": str, "source": str | None}``.

    """
    digest = hashlib.sha256()
    if "messages" in ds.column_names:  # conversations: one canonical JSON line each, tools included
        tools = ds["tools"] if "tools" in ds.column_names else [""] * len(ds)
        for messages, tool_text in zip(ds["messages"], tools, strict=True):
            digest.update(json.dumps([messages, tool_text], sort_keys=True).encode("ascii") + b"\n")
    else:
        for batch in ds.iter(batch_size=1000):
            inputs = batch.get("input") or [""] * len(batch["instruction"])
            for values in zip(batch["instruction"], inputs, batch["output"], strict=True):
                # One JSON array per record and line: unambiguous whatever the fields hold.
                digest.update(json.dumps([v or "" for v in values]).encode("ascii") + b"\n")
    if source is None or isinstance(source, (str, Path)):
        src = None if source is None else str(source)
    else:
        src = type(source).__name__
    return {"num_records": len(ds), "sha256": digest.hexdigest(), "source": src}
