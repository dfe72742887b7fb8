"""Generation metrics from the libraries the field trusts: exact match, BLEU, chrF (sacreBLEU), ROUGE-L.

- ``exact_match``: the share of predictions equal to their reference after :func:`normalize_answer`
  (surrounding whitespace stripped, inner runs of whitespace collapsed to one space; case kept unless
  ``ignore_case=True``). In 0..1.
- ``bleu``: sacreBLEU's corpus BLEU (13a tokenization, exponential smoothing), 0..100.
- ``chrf``: sacreBLEU's corpus chrF (character 6-grams, beta 2), 0..100.
- ``rouge_l``: the mean over records of ``rouge-score``'s ROUGE-L F-measure, with the Porter stemmer
  (``use_stemmer=True``), 0..1.

Each corpus score comes with a 95% bootstrap confidence interval over records: sacreBLEU's own
resampling for BLEU and chrF (its signature records the resamples and seed), a seeded resampling of the
per-record scores for exact match and ROUGE-L. Per-record scores use sentence BLEU (effective order) and
sentence chrF.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alpaca_lora.errors import ConfigError, DataError, shown

METRICS = ("exact_match", "bleu", "rouge_l", "chrf")
"""Metric names, in report order."""
BOOTSTRAP_SEED = 12345  # sacreBLEU's own default seed, used for every metric so intervals are reproducible


@dataclass
class CorpusScores:
    """Corpus scores of predictions against references, with their intervals and provenance."""

    scores: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% bootstrap, same scale
    signatures: dict[str, str] = field(default_factory=dict)  # how each score was computed


def check_metrics(metrics: Any) -> tuple[str, ...]:
    """``metrics`` as a tuple of known names; a ConfigError naming close matches for an unknown one."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    if not isinstance(metrics, (list, tuple)) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"metrics={shown(metrics)}: give a non-empty list of names from {list(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            close = difflib.get_close_matches(m.lower().replace("-", "_"), METRICS, n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown metric {shown(m)}{hint} Known metrics: {list(METRICS)}")
    return tuple(dict.fromkeys(metrics))


def normalize_answer(text: str, *, ignore_case: bool = False) -> str:
    """Strip ``text`` and collapse inner runs of whitespace to one space (lower-cased if ``ignore_case``)."""
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


def exact_match(prediction: str, reference: str, *, ignore_case: bool = False) -> bool:
    """Whether ``prediction`` equals ``reference`` after :func:`normalize_answer`."""
    return normalize_answer(prediction, ignore_case=ignore_case) == normalize_answer(reference, ignore_case=ignore_case)


def record_scores(prediction: str, reference: str, metrics: Sequence[str], *,
                  ignore_case: bool = False) -> dict[str, float]:
    """One record's scores: exact match (0 or 1), sentence BLEU and chrF (0..100), ROUGE-L F (0..1)."""
    from sacrebleu.metrics import BLEU, CHRF

    out: dict[str, float] = {}
    for m in metrics:
        if m == "exact_match":
            out[m] = float(exact_match(prediction, reference, ignore_case=ignore_case))
        elif m == "bleu":
            out[m] = float(BLEU(effective_order=True).sentence_score(prediction, [reference]).score)
        elif m == "chrf":
            out[m] = float(CHRF().sentence_score(prediction, [reference]).score)
        elif m == "rouge_l":
            out[m] = _rouge_l([prediction], [reference])[0]
    return out


def corpus_scores(predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str], *,
                  ignore_case: bool = False, bootstrap: int = 1000) -> CorpusScores:
    """Corpus scores of ``predictions`` against ``references`` (one reference each), with 95% intervals.

    Raises:
        DataError: The two lists differ in length or are empty.

    """
    import numpy as np
    from sacrebleu.metrics import BLEU, CHRF

    if len(predictions) != len(references) or not references:
        raise DataError(f"got {len(predictions)} predictions for {len(references)} references; pass one prediction "
                        "per reference, and at least one")
    result = CorpusScores({})
    resamples = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(references), (max(bootstrap, 1),
                                                                                      len(references)))
    for m in metrics:
        if m in ("bleu", "chrf"):
            metric = BLEU() if m == "bleu" else CHRF()
            resampling = bootstrap > 1 and len(references) > 1
            # with n_bootstrap, .score is still the corpus score; sacreBLEU's interval is its mean +- 1.96 sd
            score = metric.corpus_score(list(predictions), [list(references)],
                                        n_bootstrap=bootstrap if resampling else 1)
            result.scores[m] = float(score.score)
            if resampling:
                result.intervals[m] = (float(score._mean - score._ci), float(score._mean + score._ci))
            result.signatures[m] = str(metric.get_signature())
        else:
            values = np.array([float(exact_match(p, r, ignore_case=ignore_case)) for p, r in
                               zip(predictions, references, strict=True)] if m == "exact_match"
                              else _rouge_l(predictions, references))
            result.scores[m] = float(values.mean())
            if bootstrap > 1 and len(references) > 1:
                means = values[resamples].mean(axis=1)
                result.intervals[m] = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
            result.signatures[m] = ("exact match after stripping and collapsing whitespace"
                                    + (", case folded" if ignore_case else ", case kept") if m == "exact_match"
                                    else "rouge-score ROUGE-L F-measure, Porter stemmer, mean over records")
    return result


def _rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(r, p)["rougeL"].fmeasure) for p, r in zip(predictions, references, strict=True)]
