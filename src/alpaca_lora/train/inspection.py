"""Look at a data set through a tokenizer before training: what will be kept, cut and dropped.

:func:`inspect_data` answers, before a run, the questions people otherwise ask after one: how many
records are bad and why, how long the examples are in tokens against ``cutoff_len``, how many will
be truncated or dropped, and what one training example looks like with its loss mask.
The counts come from the same code as training (:func:`~alpaca_lora.data.prepare.prepare_dataset`), so
they are what ``finetune`` will do with the same settings.

In the decoded example the masked prompt span (labels -100, no loss) is shown between ``[[`` and
``]]``; the text after ``]]`` is what the model is trained to produce, EOS included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.prepare import prepare_dataset, tokenize_instruction
from alpaca_lora.data.prompts import PromptTemplate, get_template
from alpaca_lora.data.records import FIELDS, read_records
from alpaca_lora.errors import DataError

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
        template: Name of the prompt template.
        train_on_inputs: Whether prompt tokens carry loss.
        records: Records read, good and bad.
        bad_records: One reason per bad record (file, line or index, and what is wrong).
        kept: Good records that keep at least one trainable token at ``cutoff_len``.
        dropped: Good records dropped, by reason.
        truncated: Kept records whose response is cut at ``cutoff_len`` (EOS is kept).
        over_cutoff: Good records whose full tokenized length exceeds ``cutoff_len``.
        length_percentiles: Full (uncut) tokens per good record: ``p50``, ``p90``, ``p99``, ``max``.
        prompt_percentiles: Prompt tokens per good record, same keys.
        total_tokens: Tokens of the kept records after cutting.
        label_tokens: Of those, tokens that carry loss.
        example: One kept record decoded, the masked span in ``[[...]]`` (see the module docs).
        example_index: Index of that record among the good records.

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
) -> InspectionReport:
    """Count, measure and mask a data set exactly as ``finetune`` would, without loading a model.

    Bad records are reported (as with ``skip_bad_records=True``), not raised.

    Args:
        data: A .json/.jsonl/.csv/.parquet path, a ``datasets.Dataset`` or a list of dicts.
        base_model: Model folder or cached Hub id whose tokenizer counts the tokens; None uses the
            embedded default base (SmolLM2-135M).
        cutoff_len: Longest tokenized example, as in training.
        template: Prompt template: a built-in name, a JSON file path or a dict.
        train_on_inputs: Also put loss on the prompt tokens.
        add_eos_token: Append EOS to every example.
        column_map: Map your column names to instruction/input/output, e.g. {"question": "instruction"}.

    Returns:
        An :class:`InspectionReport`; :func:`format_inspection` prints it.

    Raises:
        DataError: The file cannot be read, or holds no usable record.
        ModelError: No tokenizer can be loaded for ``base_model``.

    """
    from alpaca_lora.model.load import load_tokenizer

    if base_model is None:
        from alpaca_lora.model.embedded import default_base_model

        base_model = default_base_model()
    tmpl = get_template(template)
    records, bad = read_records(data, column_map=column_map, skip_bad_records=True)
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
        source=str(data) if isinstance(data, (str, Path)) else type(data).__name__,
        base_model=str(base_model), cutoff_len=cutoff_len, template=tmpl.name, train_on_inputs=train_on_inputs,
        records=len(records) + len(bad), bad_records=bad, kept=kept, dropped=dropped, truncated=truncated,
        over_cutoff=sum(n > cutoff_len for n in lengths), length_percentiles=percentiles(lengths),
        prompt_percentiles=percentiles(prompts), total_tokens=total_tokens, label_tokens=label_tokens,
        example=example, example_index=example_index,
    )


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
    lines = [
        f"data:        {r.source}",
        f"tokenizer:   {r.base_model}",
        f"template:    {r.template}   cutoff_len: {r.cutoff_len}   train_on_inputs: {r.train_on_inputs}",
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
        f"             prompt   p50 {pp['p50']}  p90 {pp['p90']}  p99 {pp['p99']}  max {pp['max']}",
        f"over cutoff: {r.over_cutoff} of {good} ({_pct(r.over_cutoff, good)}) longer than cutoff_len",
        f"training:    {r.kept} kept, {r.truncated} of them truncated (response cut, EOS kept); "
        f"{sum(r.dropped.values())} dropped" + "".join(f"; {reason}: {n}" for reason, n in sorted(r.dropped.items())),
        f"             {r.total_tokens} tokens, {r.label_tokens} with loss ({_pct(r.label_tokens, r.total_tokens)})",
    ]
    if r.example:
        mask = ("every token carries loss" if r.train_on_inputs
                else f"no loss on {MASK_OPEN}...{MASK_CLOSE}, loss on the rest")
        lines += ["", f"example (good record {r.example_index}; {mask}):", r.example]
    return "\n".join(lines)


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "0.0%"
