"""Look at a data set through a tokenizer before training: what will be kept, cut and dropped.

:func:`inspect_data` answers, before a run, the questions people otherwise ask after one: how many
records are bad and why, how long the examples are in tokens against ``cutoff_len``, how many will
be truncated or dropped, and what one training example looks like with its loss mask.
The records are read by :func:`~alpaca_lora.data.sources.load_data` and the counts come from the same
batched pipeline as training (:func:`~alpaca_lora.data.pipeline.tokenize_all` at ``cutoff_len``, then
:func:`~alpaca_lora.data.pipeline.report_of`), so they are what ``finetune`` will do with the same settings.
The full lengths come from a second pass, at a cutoff no example reaches, over the records the first may
have cut. Both passes write Arrow to a temporary folder a batch at a time, with a progress bar, and only a
few numeric columns come back as numpy arrays, so a million records (as ``.jsonl`` or ``.parquet``, which
are streamed) take bounded memory.

In the decoded example every masked span (labels -100, no loss) is shown between ``[[`` and ``]]``;
the text outside them is what the model is trained to produce: an Alpaca response and its EOS, or
each trained assistant turn and its end-of-turn token (role headers, system, user and tool turns are
masked).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from alpaca_lora.data.chat import encode_conversation, truncate
from alpaca_lora.data.conversations import CONVERSATION_FORMATS
from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.pipeline import TokenizeSpec, alpaca_spec, chat_spec, column, report_of, tokenize_all
from alpaca_lora.data.prepare import PrepareReport, tokenize_instruction
from alpaca_lora.data.prompts import PromptTemplate
from alpaca_lora.data.sources import FORMATS, load_data, skipped_records
from alpaca_lora.errors import ConfigError, shown

MASK_OPEN, MASK_CLOSE = "[[", "]]"
PERCENTILES = (50, 90, 99, 100)
_UNCUT = 1 << 30  # a cutoff no example reaches: gives each example's full length
EXAMPLE_CANDIDATES = 1000
"""Conversations whose roles are looked at to choose the example (the first that fit)."""


@dataclass
class InspectionReport:
    """What :func:`inspect_data` found.

    Attributes:
        source: The data file (or the type of the object) inspected.
        base_model: Whose tokenizer counted the tokens.
        cutoff_len: The cutoff the counts refer to.
        template: Name of the prompt template; for conversations, the chat template (its name, file, or
            ``"the tokenizer's own"``).
        train_on_inputs: Whether prompt tokens carry loss.
        records: Records read, good and bad.
        bad_records: The reasons of the first bad records (file, line or index, and what is wrong);
            ``bad_count`` counts them all.
        bad_count: Bad records (skipped, as with ``skip_bad_records=True``).
        kept: Good records that keep at least one trainable token at ``cutoff_len``.
        dropped: Good records dropped, by reason.
        truncated: Kept records whose response is cut at ``cutoff_len`` (EOS is kept).
        over_cutoff: Good records whose full tokenized length exceeds ``cutoff_len``.
        length_percentiles: Full (uncut) tokens per good record: ``p50``, ``p90``, ``p99``, ``max``.
        prompt_percentiles: Prompt tokens per good record, same keys; for a conversation, the tokens
            before its first assistant turn.
        total_tokens: Tokens of the kept records after cutting.
        label_tokens: Of those, tokens that carry loss.
        example: One kept record decoded, the masked span in ``[[...]]`` (see the module docs).
        example_index: Index of that record among the good records.
        data_format: What the data was read as: "alpaca", "messages" or "sharegpt".
        turns: Conversations: assistant turns trained, over the kept conversations (None for Alpaca).
        dropped_turns: Conversations: whole turns cut off at ``cutoff_len``.

    """

    source: str
    base_model: str
    cutoff_len: int
    template: str
    train_on_inputs: bool
    records: int
    bad_records: list[str]
    bad_count: int
    kept: int
    dropped: dict[str, int]
    truncated: int
    over_cutoff: int
    length_percentiles: dict[str, int]
    prompt_percentiles: dict[str, int]
    total_tokens: int
    label_tokens: int
    example: str = ""
    example_index: int | None = None
    data_format: str = "alpaca"
    turns: int | None = None
    dropped_turns: int = 0

    @property
    def good_records(self) -> int:
        """Records that passed validation."""
        return self.records - self.bad_count


@dataclass
class _Measured:
    """What the two passes over the records give: the report at ``cutoff_len`` and per-record numpy columns."""

    prep: PrepareReport
    kept: np.ndarray  # (N,) bool: keeps a trainable token at cutoff_len
    length: np.ndarray  # (N,) full (uncut) tokens
    prompt: np.ndarray  # (N,) prompt tokens (conversations: before the first assistant turn)
    turns: np.ndarray  # (N,) assistant turns trained when nothing is cut (0 for Alpaca records)


def inspect_data(
    data: Any,
    base_model: str | Path | None = None,
    *,
    cutoff_len: int = 512,
    template: str | Path | dict[str, Any] | PromptTemplate = "alpaca",
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
    column_map: dict[str, str] | None = None,
    data_format: str = "auto",
    chat_template: str | Path | None = None,
) -> InspectionReport:
    """Count, measure and mask a data set exactly as ``finetune`` would, without loading a model.

    Bad records are reported (as with ``skip_bad_records=True``), not raised. A ``.jsonl`` or
    ``.parquet`` file is streamed, so memory stays bounded however many records it holds.

    Args:
        data: A .json/.jsonl/.csv/.parquet path, a ``datasets.Dataset`` or a list of dicts.
        base_model: Model folder or cached Hub id whose tokenizer counts the tokens; None uses the
            embedded default base (SmolLM2-135M).
        cutoff_len: Longest tokenized example, as in training.
        template: Prompt template of Alpaca records: a built-in name, a JSON file path or a dict.
        train_on_inputs: Also put loss on the prompt tokens (for conversations: on every token).
        add_eos_token: Append EOS to every Alpaca example (a conversation's turns end with their own token).
        column_map: Map your column names to instruction/input/output, e.g. {"question": "instruction"}.
        data_format: "auto" (conversations where records hold ``messages`` or ``conversations``, else
            Alpaca records), "alpaca", "messages" or "sharegpt", as in training.
        chat_template: Chat template of conversations: None for the tokenizer's own, a built-in name
            ("chatml", "llama3", or an Alpaca template name), a Jinja string or a .jinja file.

    Returns:
        An :class:`InspectionReport`; :func:`format_inspection` prints it.

    Raises:
        DataError: The file cannot be read, holds no usable record, does not fit an explicit
            ``data_format``, or holds a conversation the chat template refuses (named by its index
            among the good conversations).
        ConfigError: An unknown ``data_format``, ``column_map`` with conversations, a bad template, or no
            usable chat template.
        ModelError: No tokenizer can be loaded for ``base_model``.

    """
    from alpaca_lora.model.load import load_tokenizer

    if data_format not in FORMATS:
        raise ConfigError(f"data_format={shown(data_format, 60)}: unknown data format; use one of "
                          f"{', '.join(FORMATS)} ('auto' detects it from the columns)")
    if base_model is None:
        from alpaca_lora.model.embedded import default_base_model

        base_model = default_base_model()
    with warnings.catch_warnings():  # the report lists the skipped records, so no warning repeats them
        warnings.filterwarnings("ignore", message=r"skipped \d+ bad record")
        ds, fmt = load_data(data, format=data_format, column_map=column_map, skip_bad_records=True)
    bad_count, bad = skipped_records(ds)
    chat = fmt in CONVERSATION_FORMATS
    if chat:
        tokenizer = load_tokenizer(base_model)
        spec = chat_spec(tokenizer, chat_template, cutoff_len, train_on_inputs)
    else:
        spec = alpaca_spec(template, cutoff_len, train_on_inputs, add_eos_token)  # a bad template fails first
        tokenizer = load_tokenizer(base_model)
    m = _measure(ds, tokenizer, spec)
    report = InspectionReport(
        source=_source_name(data), base_model=str(base_model), cutoff_len=cutoff_len,
        template=_chat_template_name(chat_template) if chat else spec.template["name"],
        train_on_inputs=train_on_inputs, records=len(ds) + bad_count, bad_records=bad, bad_count=bad_count,
        kept=m.prep.kept, dropped=dict(m.prep.drop_reasons), truncated=m.prep.truncated,
        over_cutoff=int((m.length > cutoff_len).sum()), length_percentiles=percentiles(m.length),
        prompt_percentiles=percentiles(m.prompt), total_tokens=m.prep.total_tokens,
        label_tokens=m.prep.label_tokens, data_format=fmt,
        turns=(m.prep.turns or 0) if chat else None, dropped_turns=m.prep.dropped_turns,
    )
    if m.prep.kept:
        index = _chat_example_index(ds, m, cutoff_len) if chat else _alpaca_example_index(ds, m, cutoff_len)
        report.example, report.example_index = _example(ds[index], tokenizer, spec), index
    return report


def _measure(ds: datasets.Dataset, tokenizer: Any, spec: TokenizeSpec) -> _Measured:
    """Tokenize ``ds`` at ``spec.cutoff_len`` (the counts training makes), then uncut the rows that may be cut.

    An Alpaca example is cut only to exactly ``cutoff_len`` tokens, or to its prompt (no label), so
    the other rows already have their full length and only these are tokenized again. A conversation
    is cut at a turn boundary and may end anywhere below ``cutoff_len``: every one is tokenized again.
    """
    names = ("length", "n_prompt", "turns")
    desc = f"inspect at cutoff_len {spec.cutoff_len}"
    prep, (n_label, *full) = _pass(ds, tokenizer, spec, ("n_label", *names), desc)
    if spec.kind == "alpaca":
        redo = np.flatnonzero((full[0] >= spec.cutoff_len - 1) | (n_label == 0))  # cut, prompt only, or no label
    else:
        redo = np.arange(len(ds))
    if len(redo):
        subset = ds if len(redo) == len(ds) else ds.select(redo)
        _, uncut = _pass(subset, tokenizer, replace(spec, cutoff_len=_UNCUT), names, "inspect uncut lengths")
        for values, measured in zip(full, uncut, strict=True):
            values[redo] = measured
    return _Measured(prep, n_label > 0, *full)


def _pass(ds: datasets.Dataset, tokenizer: Any, spec: TokenizeSpec, names: tuple[str, ...],
          desc: str) -> tuple[PrepareReport, list[np.ndarray]]:
    """One :func:`tokenize_all` into a temporary folder, removed after: its report and the columns ``names``."""
    with tempfile.TemporaryDirectory(prefix="alpaca-lora-inspect-", ignore_cleanup_errors=True) as folder:
        table = tokenize_all(ds, tokenizer, spec, cache_file=Path(folder) / "tokenized.arrow", desc=desc)
        found = report_of(table), [np.array(column(table, name)) for name in names]  # copies, off the files
        del table
    return found


def _alpaca_example_index(ds: datasets.Dataset, m: _Measured, cutoff_len: int) -> int:
    """The first record with an input that fits (it shows the most of the template), else the first that fits.

    Failing both (every kept record is truncated), the first kept record.
    """
    fits = (m.length <= cutoff_len) & _non_empty(ds, "output")
    for candidates in (fits & _non_empty(ds, "input"), fits, m.kept):
        found = np.flatnonzero(candidates)
        if len(found):
            return int(found[0])
    raise AssertionError("an example is chosen only when some record is kept")


def _chat_example_index(ds: datasets.Dataset, m: _Measured, cutoff_len: int) -> int:
    """Of the first conversations that fit whole (else that are kept), the one showing the most roles, then turns.

    Only the first :data:`EXAMPLE_CANDIDATES` are read back as Python objects.
    """
    fits = np.flatnonzero((m.length <= cutoff_len) & (m.turns > 0))
    candidates = (fits if len(fits) else np.flatnonzero(m.kept))[:EXAMPLE_CANDIDATES].tolist()
    roles = [len({turn["role"] for turn in messages}) for messages in ds.select(candidates)["messages"]]
    best = max(range(len(candidates)), key=lambda k: (roles[k], int(m.turns[candidates[k]])))
    return candidates[best]


def _non_empty(ds: datasets.Dataset, name: str) -> np.ndarray:
    """``(N,)`` bool: whether each record's string column ``name`` is non-empty (from the Arrow offsets only)."""
    values = ds.with_format("arrow", columns=[name])[:][name]
    return pc.fill_null(pc.binary_length(values), 0).to_numpy() > 0


def _example(record: dict[str, Any], tokenizer: Any, spec: TokenizeSpec) -> str:
    """One record tokenized as training does, decoded with its masked spans marked."""
    if spec.kind == "chat":
        encoded = encode_conversation(record["messages"], record["tools"] or "", tokenizer, spec.chat_template)
        feats = truncate(encoded, spec.cutoff_len, spec.train_on_inputs)[0]
    else:
        feats = tokenize_instruction(record, tokenizer, spec.template, cutoff_len=spec.cutoff_len,
                                     train_on_inputs=spec.train_on_inputs, add_eos_token=spec.add_eos_token)
    return mark_masked(feats["input_ids"], feats["labels"], tokenizer)


def _source_name(data: Any) -> str:
    return str(data) if isinstance(data, (str, Path)) else type(data).__name__


def _chat_template_name(chat_template: str | Path | None) -> str:
    if chat_template is None:
        return "the tokenizer's own"
    text = str(chat_template)
    return "a Jinja string" if "{{" in text or "{%" in text else text


def mark_masked(input_ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """Decode ``input_ids``, wrapping every run of masked positions (label -100) in ``[[...]]``.

    Special tokens (BOS, EOS) are kept in the text, so the EOS that ends the trained span shows.
    """
    out: list[str] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            out.append(f"{MASK_OPEN}{text}{MASK_CLOSE}" if labels[start] == IGNORE_INDEX else text)
            start = i
    return "".join(out)


def percentiles(values: list[int] | np.ndarray) -> dict[str, int]:
    """``{"p50", "p90", "p99", "max"}`` of ``values`` (the smallest value at or above each rank); zeros if empty."""
    arr = np.asarray(values)
    if arr.size == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    keys = [f"p{q}" if q < 100 else "max" for q in PERCENTILES]
    return {k: int(np.percentile(arr, q, method="higher")) for k, q in zip(keys, PERCENTILES, strict=True)}


def format_inspection(report: InspectionReport, max_bad: int = 10) -> str:
    """Render an :class:`InspectionReport` as text for a terminal."""
    r = report
    good = r.good_records
    chat = r.turns is not None
    lines = [
        f"data:        {r.source}" + (f" ({r.data_format} conversations)" if chat else ""),
        f"tokenizer:   {r.base_model}",
        f"{'chat template: ' if chat else 'template:    '}{r.template}   cutoff_len: {r.cutoff_len}   "
        f"train_on_inputs: {r.train_on_inputs}",
        "",
        f"records:     {r.records} read, {good} good, {r.bad_count} bad",
    ]
    shown_bad = r.bad_records[:max_bad]
    lines += [f"  bad: {reason}" for reason in shown_bad]
    if r.bad_count > len(shown_bad):
        lines.append(f"  ... and {r.bad_count - len(shown_bad)} more bad record(s)")
    lp, pp = r.length_percentiles, r.prompt_percentiles
    lines += [
        f"tokens:      example  p50 {lp['p50']}  p90 {lp['p90']}  p99 {lp['p99']}  max {lp['max']}"
        f"   (cutoff_len {r.cutoff_len})",
        f"             prompt   p50 {pp['p50']}  p90 {pp['p90']}  p99 {pp['p99']}  max {pp['max']}"
        + ("   (before the first assistant turn)" if chat else ""),
        f"over cutoff: {r.over_cutoff} of {good} ({_pct(r.over_cutoff, good)}) longer than cutoff_len",
        f"training:    {r.kept} kept, {r.truncated} of them truncated "
        + ("(last turns cut off, end-of-turn kept); " if chat else "(response cut, EOS kept); ")
        + f"{sum(r.dropped.values())} dropped" + "".join(f"; {reason}: {n}" for reason, n in sorted(r.dropped.items())),
    ]
    if chat:
        lines.append(f"             {r.turns} assistant turns trained, {r.dropped_turns} turns cut off at cutoff_len")
    lines.append(f"             {r.total_tokens} tokens, {r.label_tokens} with loss "
                 f"({_pct(r.label_tokens, r.total_tokens)})")
    if r.example:
        mask = ("every token carries loss" if r.train_on_inputs
                else f"no loss on {MASK_OPEN}...{MASK_CLOSE}, loss on the rest")
        lines += ["", f"example (good {'conversation' if chat else 'record'} {r.example_index}; {mask}):", r.example]
    return "\n".join(lines)


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "0.0%"
