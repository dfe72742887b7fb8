"""Metrics equal the libraries' own values: sacreBLEU's corpus BLEU and chrF, rouge-score's ROUGE-L."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from alpaca_lora import ConfigError, DataError
from alpaca_lora.data.metrics import METRICS, check_metrics, corpus_scores, exact_match, normalize_answer, record_scores

PREDICTIONS = ["The cat sat on the mat.", "red, green and blue", "42", "Paris is the capital of France",
               "running dogs", "  fig,\tpear  "]
REFERENCES = ["The cat is sitting on the mat.", "Red, green and blue.", "42", "The capital of France is Paris.",
              "the dog runs", "fig, pear"]


def test_corpus_scores_equal_the_libraries_reference_values():
    got = corpus_scores(PREDICTIONS, REFERENCES, METRICS, bootstrap=0)
    assert got.scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert got.scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
    assert got.scores["rouge_l"] == pytest.approx(sum(rouge) / len(rouge))
    assert got.scores["exact_match"] == pytest.approx(2 / 6)  # "42" and the whitespace-folded "fig, pear"
    assert 0 < got.scores["bleu"] < 100 and got.scores["rouge_l"] > got.scores["exact_match"]
    assert "version:" in got.signatures["bleu"] and "tok:13a" in got.signatures["bleu"]
    assert "Porter stemmer" in got.signatures["rouge_l"]


def test_perfect_and_empty_answers_and_the_stemmer():
    perfect = corpus_scores(REFERENCES, REFERENCES, METRICS, bootstrap=0).scores
    assert perfect == pytest.approx({"exact_match": 1.0, "bleu": 100.0, "rouge_l": 1.0, "chrf": 100.0})
    empty = corpus_scores([""] * 6, REFERENCES, METRICS, bootstrap=0).scores
    assert empty == pytest.approx({"exact_match": 0.0, "bleu": 0.0, "rouge_l": 0.0, "chrf": 0.0})
    assert record_scores("running dogs", "the dog runs", ["rouge_l"])["rouge_l"] == pytest.approx(0.4)  # stems match


def test_bootstrap_intervals_hold_the_score_and_are_reproducible():
    a = corpus_scores(PREDICTIONS * 5, REFERENCES * 5, METRICS, bootstrap=300)
    b = corpus_scores(PREDICTIONS * 5, REFERENCES * 5, METRICS, bootstrap=300)
    assert a.intervals == b.intervals
    for m in ("exact_match", "rouge_l"):
        low, high = a.intervals[m]
        assert low <= a.scores[m] <= high and low < high
    assert "bs:300" in a.signatures["bleu"]


def test_exact_match_normalisation_is_documented_behaviour():
    assert normalize_answer("  fig,\t pear,\n\napple ") == "fig, pear, apple"
    assert exact_match(" 68\n", "68") and not exact_match("68.", "68")
    assert not exact_match("RED star", "red star") and exact_match("RED star", "red star", ignore_case=True)
    assert record_scores("a", "a", METRICS) == pytest.approx({"exact_match": 1.0, "bleu": 100.0, "rouge_l": 1.0,
                                                             "chrf": 100.0})


def test_unknown_metrics_suggest_close_names_and_bad_lengths_are_refused():
    with pytest.raises(ConfigError, match="unknown metric 'blue'; did you mean 'bleu'"):
        check_metrics(["blue"])
    with pytest.raises(ConfigError, match="did you mean 'rouge_l'"):
        check_metrics("rouge-l")
    with pytest.raises(ConfigError, match="non-empty list"):
        check_metrics([])
    assert check_metrics(["bleu", "bleu", "chrf"]) == ("bleu", "chrf")
    with pytest.raises(DataError, match="one prediction per reference"):
        corpus_scores(["a"], ["a", "b"], METRICS)
