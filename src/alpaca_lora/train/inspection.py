"""Look at a data set through a tokenizer before training: what will be kept, cut and dropped.

:func:`inspect_data` answers, before a run, the questions people otherwise ask after one: how many
records are bad and why, how long the examples are in tokens against ``cutoff_len``, how many will
be truncated or dropped, and what one training example looks like with its loss mask.
The counts come from the same code as training (:func:`~alpaca_lora.data.pipeline.prepare_dataset` for
Alpaca records, :func:`~alpaca_lora.data.pipeline.prepare_conversations` for conversations), so they are
what ``finetune`` will do with the same settings.

In the decoded example every masked span (labels -100, no loss) is shown between ``[[`` and ``]]``;
the text outside them is what the model is trained to produce: an Alpaca response and its EOS, or
each trained assistant turn and its end-of-turn token (role headers, system, user and tool turns are
masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from alpaca_lora.data.chat import Encoded, encode_conversation, truncate
from alpaca_lora.data.chat_templates import resolve_chat_template
from alpaca_lora.data.conversations import CONVERSATION_FORMATS, conversations_dataset, read_conversations
from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.pipeline import prepare_conversations, prepare_dataset
from alpaca_lora.data.prepare import tokenize_instruction
from alpaca_lora.data.prompts import PromptTemplate, get_template
from alpaca_lora.data.records import FIELDS, check_records, read_items
from alpaca_lora.data.sources import FORMATS, detect_format
from alpaca_lora.errors import ConfigError, DataError, shown

MASK_OPEN, MASK_CLOSE = "[[", "]]"
PERCENTILES = (50, 90, 99, 100)
_UNCUT = 1 << 30  # a cutoff no example reaches: gives each example's full length


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
        bad_records: One reason per bad record (file, line or index, and what is wrong).
        kept: Good records that keep at least one trainable token at ``cutoff_len``.
        dropped: Good records dropped, by reason.
        truncated: Kept records whose response is cut at ``cutoff_len`` (EOS is kept).
        over_cutoff: Good records whose full tokenized length exceeds ``cutoff_len``.
        length_percentiles: Full (uncut) tokens per good record: ``p50``, ``p90``, ``p99``, ``max``.
        prompt_percentiles: Prompt tokens per good record, same keys; for a conversation, the tokens
            before its first trained assistant turn (a prompt that fills ``cutoff_len`` drops it).
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
        return self.records - len(self.bad_records)


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

    Bad records are reported (as with ``skip_bad_records=True``), not raised.

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
        DataError: The file cannot be read, holds no usable record, or holds a conversation the chat
            template refuses.
        ConfigError: An unknown ``data_format``, ``column_map`` with conversations, or no usable chat template.
        ModelError: No tokenizer can be loaded for ``base_model``.

    """
    from alpaca_lora.model.load import load_tokenizer

    if base_model is None:
        from alpaca_lora.model.embedded import default_base_model

        base_model = default_base_model()
    name, items, columns = read_items(data)
    fmt = _data_format(name, columns, data_format, column_map)
    if fmt in CONVERSATION_FORMATS:
        conversations, bad = read_conversations(name, items, format=fmt, skip_bad_records=True)
        tokenizer = load_tokenizer(base_model)
        return _inspect_conversations(
            InspectionReport(source=_source_name(data), base_model=str(base_model), cutoff_len=cutoff_len,
                             template=_chat_template_name(chat_template), train_on_inputs=train_on_inputs,
                             records=len(items), bad_records=bad, kept=0, dropped={}, truncated=0, over_cutoff=0,
                             length_percentiles={}, prompt_percentiles={}, total_tokens=0, label_tokens=0,
                             data_format=fmt),
            conversations, tokenizer, resolve_chat_template(tokenizer, chat_template))
    tmpl = get_template(template)
    records, bad = check_records(name, items, columns, column_map=column_map, skip_bad_records=True)
    tokenizer = load_tokenizer(base_model)
    ds = datasets.Dataset.from_dict({f: [r[f] for r in records] for f in FIELDS})
    opts = dict(template=tmpl, train_on_inputs=train_on_inputs, add_eos_token=add_eos_token)
    full = [tokenize_instruction(r, tokenizer, cutoff_len=_UNCUT, **opts) for r in records]
    lengths = [len(f["input_ids"]) for f in full]
    prompts = [_prompt_length(r, tokenizer, tmpl) for r in records]
    try:
        tokenized, prep = prepare_dataset(ds, tokenizer, cutoff_len=cutoff_len, desc="inspect", **opts)
        kept, dropped, truncated = prep.kept, dict(prep.drop_reasons), prep.truncated
        total_tokens, label_tokens = prep.total_tokens, prep.label_tokens
    except DataError:  # every record dropped: report it rather than fail
        tokenized, kept, dropped, truncated = None, 0, {"no trainable token within cutoff_len": len(records)}, 0
        total_tokens = label_tokens = 0
    example, example_index = "", None
    if tokenized is not None:
        example_index = _example_index(records, full, cutoff_len)
        feats = tokenize_instruction(records[example_index], tokenizer, cutoff_len=cutoff_len, **opts)
        example = mark_masked(feats["input_ids"], feats["labels"], tokenizer)
    return InspectionReport(
        source=_source_name(data),
        base_model=str(base_model), cutoff_len=cutoff_len, template=tmpl.name, train_on_inputs=train_on_inputs,
        records=len(records) + len(bad), bad_records=bad, kept=kept, dropped=dropped, truncated=truncated,
        over_cutoff=sum(n > cutoff_len for n in lengths), length_percentiles=percentiles(lengths),
        prompt_percentiles=percentiles(prompts), total_tokens=total_tokens, label_tokens=label_tokens,
        example=example, example_index=example_index,
    )


def _inspect_conversations(report: InspectionReport, conversations: list[dict[str, Any]], tokenizer: Any,
                           source: str) -> InspectionReport:
    """Fill ``report`` for conversations: the counts of ``prepare_conversations``, the uncut lengths, an example."""
    full = [_encoded(i, c, tokenizer, source) for i, c in enumerate(conversations)]
    lengths = [len(e.input_ids) for e in full]
    trained = [[t for t in e.turns if t.train or report.train_on_inputs] for e in full]
    ds = conversations_dataset(conversations, [])
    try:
        _, prep = prepare_conversations(ds, tokenizer, chat_template=source, cutoff_len=report.cutoff_len,
                                        train_on_inputs=report.train_on_inputs, desc="inspect")
    except DataError:  # every conversation dropped (a refused one failed above): report it rather than fail
        prep = None
    if prep is not None:
        report.kept, report.dropped, report.truncated = prep.kept, dict(prep.drop_reasons), prep.truncated
        report.total_tokens, report.label_tokens = prep.total_tokens, prep.label_tokens
        report.turns, report.dropped_turns = prep.turns, prep.dropped_turns
        fits = [i for i, n in enumerate(lengths) if n <= report.cutoff_len and trained[i]] or \
            [i for i, t in enumerate(trained) if t and t[0].start < report.cutoff_len - 1]  # kept, truncated
        if fits:  # the one showing the most roles, then the most turns
            index = max(fits, key=lambda i: (len({m["role"] for m in conversations[i]["messages"]}), len(trained[i])))
            feats = truncate(full[index], report.cutoff_len, report.train_on_inputs)[0]
            report.example = mark_masked(feats["input_ids"], feats["labels"], tokenizer)
            report.example_index = index
    else:
        report.dropped, report.turns = {"no trainable token within cutoff_len": len(conversations)}, 0
    report.over_cutoff = sum(n > report.cutoff_len for n in lengths)
    report.length_percentiles = percentiles(lengths)
    report.prompt_percentiles = percentiles([t[0].start if t else len(e.input_ids) for e, t in zip(full, trained,
                                                                                                 strict=True)])
    return report


def _encoded(index: int, conversation: dict[str, Any], tokenizer: Any, source: str) -> Encoded:
    """The whole conversation tokenized as in training; a refused one is a DataError naming it."""
    try:
        return encode_conversation(conversation["messages"], conversation["tools"], tokenizer, source)
    except DataError as exc:
        raise DataError(f"good conversation {index}: {exc}") from None


def _data_format(name: str, columns: list[str], data_format: str, column_map: dict[str, str] | None) -> str:
    """The format the records are read as: ``data_format``, or for "auto" the one their columns show."""
    if data_format not in FORMATS:
        raise ConfigError(f"data_format={shown(data_format, 60)}: unknown data format; use one of "
                          f"{', '.join(FORMATS)} ('auto' detects it from the columns)")
    fmt = detect_format(columns) if data_format == "auto" else data_format
    if fmt in CONVERSATION_FORMATS and column_map is not None:
        raise ConfigError(f"column_map={shown(column_map)}: {name} is read as conversations ({fmt} form), and "
                          "column_map maps Alpaca columns (instruction/input/output) only; drop it, or pass "
                          "data_format='alpaca'")
    return fmt


def _source_name(data: Any) -> str:
    return str(data) if isinstance(data, (str, Path)) else type(data).__name__


def _chat_template_name(chat_template: str | Path | None) -> str:
    if chat_template is None:
        return "the tokenizer's own"
    text = str(chat_template)
    return "a Jinja string" if "{{" in text or "{%" in text else text


def _prompt_length(record: dict[str, str], tokenizer: Any, template: PromptTemplate) -> int:
    from alpaca_lora.data.prepare import tokenize_prompt

    return len(tokenize_prompt(template.render(record["instruction"], record["input"] or None), tokenizer))


def _example_index(records: list[dict[str, str]], full: list[dict[str, list[int]]], cutoff_len: int) -> int:
    """The first record with an input that fits (it shows the most of the template), else the first that fits."""
    fits = [i for i, f in enumerate(full) if len(f["input_ids"]) <= cutoff_len and records[i]["output"]]
    with_input = [i for i in fits if records[i]["input"]]
    return (with_input or fits or [0])[0]


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


def percentiles(values: list[int]) -> dict[str, int]:
    """``{"p50", "p90", "p99", "max"}`` of ``values`` (the smallest value at or above each rank); zeros if empty."""
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    arr = np.asarray(values)
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
        f"records:     {r.records} read, {good} good, {len(r.bad_records)} bad",
    ]
    for reason in r.bad_records[:max_bad]:
        lines.append(f"  bad: {reason}")
    if len(r.bad_records) > max_bad:
        lines.append(f"  ... and {len(r.bad_records) - max_bad} more bad record(s)")
    lp, pp = r.length_percentiles, r.prompt_percentiles
    lines += [
        f"tokens:      example  p50 {lp['p50']}  p90 {lp['p90']}  p99 {lp['p99']}  max {lp['max']}"
        f"   (cutoff_len {r.cutoff_len})",
        f"             prompt   p50 {pp['p50']}  p90 {pp['p90']}  p99 {pp['p99']}  max {pp['max']}"
        + ("   (before the first trained assistant turn)" if chat else ""),
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
