"""evaluate(): generation metrics and loss of a model on held-out records, optionally beside another model.

The model answers every record greedily through :func:`alpaca_lora.generate` (batched, the folder's
template); the answers are scored against the records' outputs with :mod:`alpaca_lora.data.metrics`
(exact match, sacreBLEU's BLEU and chrF, rouge-score's ROUGE-L). The same records also give the eval loss
(mean cross-entropy per response token, as training computes it) and its perplexity.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alpaca_lora.data import metrics as mx
from alpaca_lora.errors import ConfigError, DataError, shown


@dataclass
class EvalReport:
    """What :func:`evaluate` measured.

    Attributes:
        scores: Metric name -> corpus score (BLEU and chrF 0..100, exact match and ROUGE-L 0..1), plus
            ``eval_loss`` and ``perplexity`` when the loss was computed.
        intervals: Metric name -> 95% bootstrap interval ``(low, high)``.
        signatures: Metric name -> how it was computed (sacreBLEU's signature string, the normalisation).
        rows: One dict per record: ``instruction``, ``input``, ``reference``, ``prediction``, ``kind`` (when
            the records carry one) and the record's own scores.
        by_kind: Task kind -> metric -> score, when the records carry a ``kind``.
        settings: The arguments the scores depend on.
        compare: The same report for the ``compare=`` model, on the same records.

    """

    scores: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    compare: EvalReport | None = None

    def to_json(self, path: str | Path) -> Path:
        """Write everything but the rows as JSON; return the path."""
        data = {k: v for k, v in asdict(self).items() if k not in ("rows", "compare")}
        if self.compare is not None:
            data["compare"] = {k: v for k, v in asdict(self.compare).items() if k not in ("rows", "compare")}
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        return Path(path)

    def to_jsonl(self, path: str | Path) -> Path:
        """Write one JSON line per record (with the compared model's prediction and scores when there is one)."""
        other = self.compare.rows if self.compare is not None else [None] * len(self.rows)
        with open(path, "w", encoding="utf-8") as f:
            for row, alt in zip(self.rows, other, strict=True):
                line = dict(row)
                if alt is not None:
                    line["compare_prediction"] = alt["prediction"]
                    line["compare_scores"] = alt["scores"]
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        return Path(path)

    def table(self) -> str:
        """The scores as a text table; with ``compare``, side by side with the difference."""
        names = [m for m in (*mx.METRICS, "eval_loss", "perplexity") if m in self.scores]
        kinds = list(self.by_kind)
        lines = []
        if self.compare is None:
            lines.append(f"{'':<14}{'score':>12}  95% interval")
            for m in names:
                lo_hi = self.intervals.get(m)
                lines.append(f"{m:<14}{_fmt(m, self.scores[m]):>12}  "
                             + (f"{_fmt(m, lo_hi[0])} .. {_fmt(m, lo_hi[1])}" if lo_hi else ""))
        else:
            lines.append(f"{'':<14}{'compare':>12}{'model':>12}{'change':>12}")
            for m in names:
                if m in self.compare.scores:
                    a, b = self.compare.scores[m], self.scores[m]
                    lines.append(f"{m:<14}{_fmt(m, a):>12}{_fmt(m, b):>12}{_fmt(m, b - a, sign=True):>12}")
        if kinds:
            first = next(m for m in names if m in mx.METRICS)
            lines += ["", f"{first} by kind:", f"{'kind':<14}" + (f"{'compare':>12}" if self.compare else "")
                      + f"{'model':>12}{'n':>6}"]
            for k in kinds:
                n = sum(1 for r in self.rows if r.get("kind") == k)
                before = f"{_fmt(first, self.compare.by_kind[k][first]):>12}" if self.compare else ""
                lines.append(f"{k:<14}{before}{_fmt(first, self.by_kind[k][first]):>12}{n:>6}")
        return "\n".join(lines)

    def changed(self, n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` records whose first metric's score changed most against ``compare`` (largest change first)."""
        if self.compare is None:
            return []
        first = next(m for m in mx.METRICS if m in self.scores)
        pairs = zip(self.rows, self.compare.rows, strict=True)
        ranked = sorted(pairs, key=lambda p: -abs(p[0]["scores"][first] - p[1]["scores"][first]))
        return [{**r, "compare_prediction": c["prediction"], "change": r["scores"][first] - c["scores"][first]}
                for r, c in ranked[:n] if r["scores"][first] != c["scores"][first]]


def _fmt(metric: str, value: float, sign: bool = False) -> str:
    if metric in ("exact_match", "rouge_l"):
        return f"{100 * value:+.1f}%" if sign else f"{100 * value:.1f}%"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def evaluate(
    model_or_dir: str | Path | Any,
    data: Any,
    *,
    metrics: tuple[str, ...] | list[str] = mx.METRICS,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    template: Any = None,
    compare: str | Path | Any | None = None,
    ignore_case: bool = False,
    bootstrap: int = 1000,
    loss: bool = True,
    limit: int | None = None,
    tokenizer: Any = None,
    base_model: str | Path | None = None,
    compute_dtype: str = "auto",
    quantization: str | None = None,
) -> EvalReport:
    """Score a model's greedy answers on held-out records with exact match, BLEU, ROUGE-L and chrF.

    Args:
        model_or_dir: Anything :func:`alpaca_lora.generate` takes: an adapter folder, a merged or base model
            folder, or a loaded model (with ``tokenizer=``).
        data: Anything :func:`alpaca_lora.finetune` takes. Alpaca records are answered from instruction and
            input and scored against ``output``; a conversation is answered at its last assistant turn,
            which is the reference. A ``kind`` field (lists, Datasets, JSON/JSONL files) gives per-kind scores.
        metrics: Any of "exact_match", "bleu", "rouge_l", "chrf".
        max_new_tokens: Most tokens per answer.
        batch_size: Records answered per forward pass.
        template: Prompt template override (by default the folder's own).
        compare: Another model (anything ``model_or_dir`` takes; a loaded one uses ``tokenizer=`` too) scored
            on the same records, e.g. its base. Alpaca records get the same prompts (the model's template);
            conversations are rendered with each model's own chat template.
        ignore_case: Exact match ignores case.
        bootstrap: Resamples for the 95% intervals (0 or 1: none).
        loss: Also compute the eval loss and perplexity on the records' references.
        limit: Score only the first ``limit`` records.
        tokenizer: The tokenizer of a loaded model.
        base_model: For an adapter folder, the base to load instead of the recorded one.
        compute_dtype: As for :func:`alpaca_lora.generate`.
        quantization: As for :func:`alpaca_lora.generate`.

    Returns:
        An :class:`EvalReport`; ``report.table()`` prints it, ``to_json`` / ``to_jsonl`` save it.

    Raises:
        ConfigError: An unknown metric (with close matches), bad counts.
        DataError: No records, or records without a reference (an empty ``output``).

    Example:
        >>> report = evaluate("merged", "test.json", compare="base")  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP

    """
    chosen = mx.check_metrics(metrics)
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("batch_size", batch_size, 1),
                             ("bootstrap", bootstrap, 0), ("limit", limit, 1)):
        if value is None and name == "limit":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={shown(value)}: must be an integer >= {low}")
    items = _eval_items(data, limit)
    settings = {"metrics": list(chosen), "max_new_tokens": max_new_tokens, "greedy": True, "records": len(items),
                "ignore_case": ignore_case, "bootstrap": bootstrap,
                "template": None if template is None else str(getattr(template, "name", template))}
    gen = {"template": template, "tokenizer": tokenizer, "base_model": base_model, "compute_dtype": compute_dtype,
           "quantization": quantization}
    report = _score(model_or_dir, items, chosen, settings, gen, max_new_tokens, batch_size, ignore_case, bootstrap,
                    loss)
    if compare is not None:  # prompted exactly as the model: a base is scored on the tuned model's template
        from alpaca_lora.inference.generate import model_folder, prompt_template

        folder = (Path(model_or_dir).expanduser() if isinstance(model_or_dir, (str, Path))
                  else model_folder(model_or_dir))
        loaded = not isinstance(compare, (str, Path))  # a loaded compare model shares tokenizer=
        other = {**gen, "tokenizer": tokenizer if loaded else None, "base_model": None,
                 "template": prompt_template(folder, template)}
        report.compare = _score(compare, items, chosen, settings, other, max_new_tokens, batch_size, ignore_case,
                                bootstrap, loss)
    return report


def _eval_items(data: Any, limit: int | None) -> list[dict[str, Any]]:
    """``[{"request", "instruction", "input", "reference", "kind"}]`` from Alpaca records or conversations."""
    from alpaca_lora.data.sources import load_data

    dataset, fmt = load_data(data)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise DataError(f"{_name(data)} holds no records to evaluate on")
    kinds = _kinds(data, n)
    items = []
    for i in range(n):
        r = dataset[i]
        if fmt == "alpaca":
            item = {"request": r["instruction"], "instruction": r["instruction"], "input": r["input"] or "",
                    "reference": r["output"]}
        else:
            msgs = r["messages"]
            last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")  # load_data checked there is one
            item = {"request": [{"role": m["role"], "content": m["content"]} for m in msgs[:last]],
                    "instruction": msgs[last - 1]["content"] if last else "", "input": "",
                    "reference": msgs[last]["content"]}
        if not item["reference"].strip():
            raise DataError(f"{_name(data)}, record {i}: the reference (output) is empty, so there is nothing to score "
                            "the answer against; fill it in or drop the record")
        if kinds is not None:
            item["kind"] = str(kinds[i])
        items.append(item)
    return items


def _kinds(data: Any, n: int) -> list[Any] | None:
    """The records' ``kind`` field when they all carry one (lists, Datasets, JSON/JSONL files)."""
    import datasets

    if isinstance(data, (list, tuple)) and all(isinstance(r, dict) for r in data[:n]):
        values = [r.get("kind") for r in data[:n]]
    elif isinstance(data, datasets.Dataset) and "kind" in data.column_names:
        values = data.select(range(n))["kind"]
    elif isinstance(data, (str, Path)) and Path(data).suffix.lower() in (".json", ".jsonl"):
        path = Path(data).expanduser()
        try:  # load_data already read and checked the file; only the optional kinds are read here
            with open(path, encoding="utf-8-sig") as f:
                lines = itertools.islice(filter(str.strip, f), n)
                rows = json.load(f) if path.suffix.lower() == ".json" else [json.loads(line) for line in lines]
        except (OSError, ValueError):
            return None
        values = [r.get("kind") if isinstance(r, dict) else None for r in rows[:n]] if isinstance(rows, list) else []
    else:
        return None
    return values if len(values) == n and all(v is not None for v in values) else None


def _name(data: Any) -> str:
    return str(data) if isinstance(data, (str, Path)) else "the data"


def _score(model: Any, items: list[dict[str, Any]], metrics: tuple[str, ...], settings: dict[str, Any],
           gen: dict[str, Any], max_new_tokens: int, batch_size: int, ignore_case: bool, bootstrap: int,
           loss: bool) -> EvalReport:
    from tqdm.auto import tqdm

    from alpaca_lora.inference.generate import generate

    predictions: list[str] = []
    chunk = batch_size * 4
    for start in tqdm(range(0, len(items), chunk), desc="evaluate", unit="batch", leave=False):
        part = items[start:start + chunk]
        requests = [it["request"] for it in part]
        if isinstance(requests[0], str):
            answers = generate(model, requests, [it["input"] for it in part], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, **gen)
        else:
            answers = generate(model, requests, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               **{k: v for k, v in gen.items() if k != "template"})
        predictions += answers
    references = [it["reference"] for it in items]
    corpus = mx.corpus_scores(predictions, references, metrics, ignore_case=ignore_case, bootstrap=bootstrap)
    rows = [{**{k: it[k] for k in ("instruction", "input", "reference") if k in it},
             **({"kind": it["kind"]} if "kind" in it else {}), "prediction": p,
             "scores": mx.record_scores(p, it["reference"], metrics, ignore_case=ignore_case)}
            for it, p in zip(items, predictions, strict=True)]
    report = EvalReport(dict(corpus.scores), dict(corpus.intervals), dict(corpus.signatures), rows,
                        settings={**settings, "model": str(model) if isinstance(model, (str, Path)) else
                                  type(model).__name__})
    kinds = list(dict.fromkeys(r["kind"] for r in rows if "kind" in r))
    for k in kinds:
        sel = [i for i, r in enumerate(rows) if r.get("kind") == k]
        report.by_kind[k] = mx.corpus_scores([predictions[i] for i in sel], [references[i] for i in sel], metrics,
                                             ignore_case=ignore_case, bootstrap=0).scores
    if loss:
        from alpaca_lora.inference.eval_loss import eval_loss

        value = eval_loss(model, items, gen, batch_size)
        if value is not None:
            report.scores.update(eval_loss=value, perplexity=math.exp(min(value, 700.0)))
    return report
