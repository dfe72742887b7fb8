"""Tokenize a data set in batches, Arrow to Arrow: bounded memory, worker processes, one masking definition.

Records go through ``datasets.Dataset.map`` in batches: one fast-tokenizer call per batch, the labels
from the same per-record code as :func:`~alpaca_lora.data.prepare.tokenize_instruction`
(:func:`~alpaca_lora.data.prepare.assemble`) and :func:`~alpaca_lora.data.chat.tokenize_conversation`
(:func:`~alpaca_lora.data.chat.locate_turns`, :func:`~alpaca_lora.data.chat.truncate`), and the result is
written to an Arrow file a batch at a time, so memory is bounded by a batch, not by the data set. Large
data sets are split over worker processes.

Every record keeps a row, with its status and counts beside its features (:func:`tokenize_all`), so the
report of any selection (the training split) is a few vector sums (:func:`report_of`) and the rows
without a trainable label are dropped by :func:`trainable`. :mod:`alpaca_lora.data.token_cache` keeps
that table on disk between runs.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from alpaca_lora.data import chat_templates
from alpaca_lora.data.chat import DROP_NO_TRAINED_TURN, Encoded, locate_turns, render_conversation, special_ids
from alpaca_lora.data.chat import truncate as truncate_conversation
from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.prepare import (
    DROP_EMPTY_RESPONSE,
    DROP_PROMPT_FULL,
    PrepareReport,
    assemble,
    without_trailing_eos,
)
from alpaca_lora.data.prompts import PromptTemplate, get_template
from alpaca_lora.errors import ConfigError, DataError, shown

logger = logging.getLogger(__name__)

BATCH = 1000
"""Records per tokenizer call and per Arrow write."""
PARALLEL_FROM = 20_000
"""Records from which the work is split over worker processes by default."""
_STATUS = ("ok", "truncated", DROP_PROMPT_FULL, DROP_EMPTY_RESPONSE, DROP_NO_TRAINED_TURN)
_CODE = {s: i for i, s in enumerate(_STATUS)}
STATS = ("status", "n_label", "n_prompt", "turns", "dropped_turns")
"""Per-record columns beside the features: status code, label tokens, prompt tokens, assistant turns trained and
trained turns cut off (conversations)."""


@dataclass(frozen=True)
class TokenizeSpec:
    """Everything that decides the features of a record besides the tokenizer.

    Attributes:
        kind: "alpaca" (instruction records) or "chat" (conversations).
        template: The Alpaca prompt template's fields (alpaca), else None.
        chat_template: The chat template's Jinja source (chat), else None.
        cutoff_len: Longest example, in tokens.
        train_on_inputs: Loss on every token.
        add_eos_token: Append EOS after each response (alpaca).

    """

    kind: str
    template: dict[str, str] | None
    chat_template: str | None
    cutoff_len: int
    train_on_inputs: bool
    add_eos_token: bool

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-serialisable data (part of the cache key)."""
        return asdict(self)


def alpaca_spec(template: str | Path | dict[str, Any] | PromptTemplate, cutoff_len: int, train_on_inputs: bool,
                add_eos_token: bool) -> TokenizeSpec:
    """The spec of Alpaca records, the template resolved (a bad one is a ConfigError here)."""
    _check_cutoff(cutoff_len)
    return TokenizeSpec("alpaca", get_template(template).to_dict(), None, cutoff_len, train_on_inputs, add_eos_token)


def chat_spec(tokenizer: Any, chat_template: str | Path | None, cutoff_len: int, train_on_inputs: bool) -> TokenizeSpec:
    """The spec of conversations, the chat template resolved against ``tokenizer``."""
    _check_cutoff(cutoff_len)
    source = chat_templates.resolve_chat_template(tokenizer, chat_template)
    return TokenizeSpec("chat", None, source, cutoff_len, train_on_inputs, False)


def tokenize_all(ds: datasets.Dataset, tokenizer: Any, spec: TokenizeSpec, *, num_proc: int | None = None,
                 cache_file: str | Path | None = None, fingerprint: str | None = None,
                 desc: str = "tokenize") -> datasets.Dataset:
    """Tokenize every record of ``ds``, one row each, features and :data:`STATS` columns, in order.

    Args:
        ds: Instruction records (instruction, input, output) or conversations (messages, tools).
        tokenizer: A fast Hugging Face tokenizer.
        spec: What decides the features.
        num_proc: Worker processes; None: one per core from :data:`PARALLEL_FROM` records on, else one.
        cache_file: Where to write the Arrow table (None: a temporary file of ``datasets``).
        fingerprint: The ``datasets`` fingerprint of the result (None: a random one; the tokenizer
            is never hashed by ``datasets``).
        desc: Label of the progress bar.

    Raises:
        DataError: ``ds`` lacks the columns of its kind, has no records, or holds a record without a
            string instruction / output (naming its index) or a conversation the template refuses.

    """
    _check_columns(ds, spec.kind)
    if spec.kind == "alpaca" and spec.add_eos_token and getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError("add_eos_token=True but the tokenizer has no EOS token; set tokenizer.eos_token "
                          "(e.g. tokenizer.eos_token = '</s>') or pass add_eos_token=False")
    procs = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 8) if len(ds) >= PARALLEL_FROM else 1)
    procs = max(1, min(procs, len(ds) // BATCH or 1))
    ids = datasets.List(datasets.Value("int32"))
    features = datasets.Features({"input_ids": ids, "attention_mask": ids, "labels": ids,
                                  "length": datasets.Value("int32"), "status": datasets.Value("int8"),
                                  **{k: datasets.Value("int32") for k in STATS[1:]}})
    function = _alpaca_batch if spec.kind == "alpaca" else _chat_batch
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    if procs > 1 and saved is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism (until map returns)
    try:
        return ds.map(function, batched=True, batch_size=BATCH, with_indices=True, remove_columns=ds.column_names,
                      features=features, num_proc=procs if procs > 1 else None, desc=desc,
                      fn_kwargs={"tokenizer": tokenizer, "spec": spec}, load_from_cache_file=False,
                      cache_file_name=None if cache_file is None else str(cache_file), writer_batch_size=BATCH,
                      new_fingerprint=fingerprint or uuid.uuid4().hex)
    finally:
        if procs > 1 and saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """One numeric column of ``ds`` (of its selection, in order) as a numpy array: no per-row Python objects."""
    return np.asarray(ds.with_format("numpy", columns=[name])[:][name])


def report_of(tokenized: datasets.Dataset) -> PrepareReport:
    """What a selection of :func:`tokenize_all` rows keeps, drops and truncates (vector sums, no Python rows)."""
    cols = tokenized.with_format("numpy", columns=list(STATS) + ["length"])[:]
    status = np.asarray(cols["status"], dtype=np.int64)
    keep = np.asarray(cols["n_label"]) > 0
    drops = np.bincount(status[~keep], minlength=len(_STATUS))
    chat = bool(np.asarray(cols["turns"]).any()) or bool((status == _CODE[DROP_NO_TRAINED_TURN]).any())
    return PrepareReport(
        kept=int(keep.sum()), dropped=int((~keep).sum()),
        drop_reasons={_STATUS[i]: int(n) for i, n in enumerate(drops) if n},
        truncated=int((status[keep] != _CODE["ok"]).sum()),  # a prompt-only row kept by train_on_inputs is cut too
        label_tokens=int(np.asarray(cols["n_label"])[keep].sum()),
        total_tokens=int(np.asarray(cols["length"])[keep].sum()),
        turns=int(np.asarray(cols["turns"])[keep].sum()) if chat else None,
        dropped_turns=int(np.asarray(cols["dropped_turns"])[keep].sum()),
    )


def trainable(tokenized: datasets.Dataset) -> datasets.Dataset:
    """The rows with a trainable label, with the feature columns only (input_ids, attention_mask, labels, length)."""
    keep = np.flatnonzero(column(tokenized, "n_label") > 0)
    kept = tokenized.select(keep) if len(keep) != len(tokenized) else tokenized
    return kept.remove_columns(list(STATS))


def longest_prompt(tokenized: datasets.Dataset) -> int:
    """The most prompt tokens of any row (for the message when nothing is trainable)."""
    n_prompt = column(tokenized, "n_prompt")
    return int(np.max(n_prompt)) if len(n_prompt) else 0


def prepare(ds: datasets.Dataset, tokenizer: Any, spec: TokenizeSpec, *, num_proc: int | None = None,
            desc: str = "tokenize") -> tuple[datasets.Dataset, PrepareReport]:
    """:func:`tokenize_all`, then the report and the trainable rows; DataError when none is trainable."""
    table = tokenize_all(ds, tokenizer, spec, num_proc=num_proc, desc=desc)
    return finish(table, spec, desc)


def finish(table: datasets.Dataset, spec: TokenizeSpec, desc: str = "tokenize") -> tuple[datasets.Dataset,
                                                                                          PrepareReport]:
    """The trainable rows of a :func:`tokenize_all` table (or a selection of one) and their report."""
    report = report_of(table)
    if report.kept == 0:
        what = "conversation" if spec.kind == "chat" else "record"
        raise DataError(
            f"all {report.dropped} {what}(s) were dropped ({report.summary()}): none has a "
            f"{'assistant' if spec.kind == 'chat' else 'response'} token within cutoff_len={spec.cutoff_len} (the "
            f"longest prompt has {longest_prompt(table)} tokens). Raise cutoff_len or shorten the "
            f"{'conversations' if spec.kind == 'chat' else 'prompts (or the template)'}.")
    if report.dropped:
        logger.warning("%s: %s", desc, report.summary())
    return trainable(table), report


def prepare_dataset(ds: datasets.Dataset, tokenizer: Any, *,
                    template: str | Path | dict[str, Any] | PromptTemplate = "alpaca", cutoff_len: int = 512,
                    train_on_inputs: bool = False, add_eos_token: bool = True, desc: str = "tokenize",
                    num_proc: int | None = None) -> tuple[datasets.Dataset, PrepareReport]:
    """Tokenize every record as :func:`~alpaca_lora.data.prepare.tokenize_instruction` does; drop the untrainable.

    Args:
        ds: Records with string columns instruction, output and (optional) input.
        tokenizer: A Hugging Face tokenizer.
        template: Template name, JSON path, dict or :class:`~alpaca_lora.data.prompts.PromptTemplate`.
        cutoff_len: Longest example, in tokens.
        train_on_inputs: Also put loss on the prompt tokens.
        add_eos_token: Append EOS after every response.
        desc: Label of the progress bar.
        num_proc: Worker processes (None: one per core for large data sets).

    Returns:
        ``(tokenized, report)``: columns input_ids, attention_mask, labels and length (tokens per
        example) in the order of ``ds``, and what was kept, dropped and truncated.

    Raises:
        DataError: ``ds`` lacks instruction/output columns, a record is malformed, or every record was
            dropped (so training fails before any model is loaded).

    """
    spec = alpaca_spec(template, cutoff_len, train_on_inputs, add_eos_token)
    return prepare(ds, tokenizer, spec, num_proc=num_proc, desc=desc)


def prepare_conversations(ds: datasets.Dataset, tokenizer: Any, *, chat_template: str | Path | None = None,
                          cutoff_len: int = 2048, train_on_inputs: bool = False, desc: str = "tokenize",
                          num_proc: int | None = None) -> tuple[datasets.Dataset, PrepareReport]:
    """Tokenize every conversation as :func:`~alpaca_lora.data.chat.tokenize_conversation` does; drop the untrainable.

    Args:
        ds: A ``messages`` column of normalized conversations and an optional ``tools`` column (what
            :func:`~alpaca_lora.data.conversations.load_conversations` returns).
        tokenizer: A fast Hugging Face tokenizer.
        chat_template: As for ``tokenize_conversation``.
        cutoff_len: Longest example, in tokens.
        train_on_inputs: Put loss on every token.
        desc: Label of the progress bar.
        num_proc: Worker processes (None: one per core for large data sets).

    Returns:
        ``(tokenized, report)`` as :func:`prepare_dataset` returns them; the report also counts
        assistant turns trained and trained turns cut off by truncation.

    Raises:
        DataError: A conversation the template refuses (naming its index), or every one dropped.

    """
    spec = chat_spec(tokenizer, chat_template, cutoff_len, train_on_inputs)
    return prepare(ds, tokenizer, spec, num_proc=num_proc, desc=desc)


# ---- the batch functions (module level, so worker processes can run them) ---------------------------


def _alpaca_batch(batch: dict[str, list], indices: list[int], tokenizer: Any, spec: TokenizeSpec) -> dict[str, list]:
    template = PromptTemplate(**spec.template)
    inputs = batch.get("input") or [None] * len(indices)
    for name in ("instruction", "output"):
        bad = next((k for k, v in enumerate(batch[name]) if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"dataset record index {indices[bad]}: a record needs a string {name!r} (it is "
                            f"{shown(batch[name][bad], 60)}); load data with load_instructions(), which validates it")
    prompts = [template.render(i, x or None) for i, x in zip(batch["instruction"], inputs, strict=True)]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    out = _empty()
    for p, r in zip(prompt_ids, response_ids, strict=True):
        features, status, n_prompt = assemble(without_trailing_eos(list(p), tokenizer), list(r), eos_id,
                                              spec.cutoff_len, spec.train_on_inputs, spec.add_eos_token)
        n_label = sum(1 for x in features["labels"] if x != IGNORE_INDEX)
        if n_label == 0 and status != DROP_PROMPT_FULL:
            status = DROP_EMPTY_RESPONSE
        _append(out, features, status, n_label, n_prompt, 0, 0)
    return out


def _chat_batch(batch: dict[str, list], indices: list[int], tokenizer: Any, spec: TokenizeSpec) -> dict[str, list]:
    tools = batch.get("tools") or [""] * len(indices)
    rendered = []
    for index, messages, tool_text in zip(indices, batch["messages"], tools, strict=True):
        try:
            rendered.append(render_conversation(messages, tool_text or "", tokenizer, spec.chat_template))
        except DataError as exc:
            raise DataError(f"conversation index {index}: {exc}") from None
    enc = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    special = special_ids(tokenizer)
    out = _empty()
    for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        encoded: Encoded = locate_turns(r, list(ids), offsets, special)
        features, status, dropped = truncate_conversation(encoded, spec.cutoff_len, spec.train_on_inputs)
        n_label = sum(1 for x in features["labels"] if x != IGNORE_INDEX)
        if n_label == 0 and status != DROP_PROMPT_FULL:
            status = DROP_NO_TRAINED_TURN
        trained = sum(1 for t in encoded.turns if t.train or spec.train_on_inputs) - dropped
        first = encoded.turns[0].start if encoded.turns else len(ids)
        _append(out, features, status, n_label, first, trained if n_label else 0, dropped if n_label else 0)
    return out


def _empty() -> dict[str, list]:
    return {k: [] for k in ("input_ids", "attention_mask", "labels", "length", *STATS)}


def _append(out: dict[str, list], features: dict[str, list[int]], status: str, n_label: int, n_prompt: int,
            turns: int, dropped: int) -> None:
    for key, value in features.items():
        out[key].append(value)
    for key, value in zip(STATS, (_CODE[status], n_label, n_prompt, turns, dropped), strict=True):
        out[key].append(value)
    out["length"].append(len(features["input_ids"]))


def _check_columns(ds: datasets.Dataset, kind: str) -> None:
    need = ("instruction", "output") if kind == "alpaca" else ("messages",)
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        how = ("load_instructions(), which maps common layouts to instruction/input/output" if kind == "alpaca"
               else "load_conversations()")
        raise DataError(f"the dataset lacks column(s) {missing} (it has {ds.column_names}); load it with {how}")
    if len(ds) == 0:
        raise DataError("the dataset has no records to tokenize; load some with load_data()")


def _check_cutoff(cutoff_len: Any) -> None:
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
        raise ConfigError(f"cutoff_len={shown(cutoff_len)}: must be a positive int (tokens per example)")
