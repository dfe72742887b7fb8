"""ROUGE-L between instructions, with rouge-score's tokenizer, against every instruction kept so far."""

from __future__ import annotations

from collections import Counter
from typing import Any


class SimilarityIndex:
    """The instructions kept so far, tokenized once, and the highest ROUGE-L F of a new one against them.

    The score is rouge-score's ``RougeScorer(["rougeL"]).score(...).fmeasure`` (no stemming, as Stanford
    Alpaca scored), computed from cached tokens: the longest common subsequence of the two token lists.
    """

    def __init__(self) -> None:
        from rouge_score.tokenizers import DefaultTokenizer

        self._tokenize: Any = DefaultTokenizer(use_stemmer=False).tokenize
        self._kept: list[tuple[list[str], Counter[str]]] = []
        self.texts: list[str] = []

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, text: str) -> None:
        """Add an instruction."""
        tokens = self._tokenize(text)
        self._kept.append((tokens, Counter(tokens)))
        self.texts.append(text)

    def most_similar(self, text: str) -> tuple[float, str | None]:
        """The highest ROUGE-L F of ``text`` against the kept instructions, and that instruction."""
        tokens = self._tokenize(text)
        if not tokens:
            return 0.0, None
        counts = Counter(tokens)
        best, best_i = 0.0, None
        for i, (other, other_counts) in enumerate(self._kept):
            shared = sum((counts & other_counts).values())  # bounds the common subsequence: skip what cannot win
            if not shared or 2 * shared / (len(tokens) + len(other)) <= best:
                continue
            score = rouge_l(tokens, other)
            if score > best:
                best, best_i = score, i
        return best, (self.texts[best_i] if best_i is not None else None)


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two token lists: ``2 * LCS / (len(a) + len(b))`` (recall and precision weighted equally)."""
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return 2 * previous[-1] / (len(a) + len(b))
