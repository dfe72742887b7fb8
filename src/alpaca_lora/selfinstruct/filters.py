"""The rules a generated task must pass to be kept, each a named reason when it fails.

Stanford Alpaca's filters, re-implemented: instruction length in words, words for things a text model
cannot do, programming requests, a leading punctuation mark or non-ASCII character, exact duplicates, and
near duplicates by ROUGE-L against every seed and kept instruction.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from alpaca_lora.selfinstruct.seeds import Task
from alpaca_lora.selfinstruct.similarity import SimilarityIndex

BLACKLIST = ("image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs", "chart", "charts",
             "diagram", "diagrams", "flowchart", "draw", "plot", "map", "maps", "video", "videos", "audio", "music",
             "sound", "file", "files", "go to", "download", "upload")
"""Words (whole words, any case) of tasks a text-only model cannot do: see, hear, draw, open files, act."""

REASONS = ("unparseable", "cut_off", "too_short", "too_long", "blacklisted", "program", "punctuation_start",
           "non_ascii_start", "empty_output", "duplicate", "similar")
"""Why a task is rejected, in the order the rules are tried."""


@dataclass(frozen=True)
class Rules:
    """The filter settings.

    Attributes:
        min_words: Fewest words in an instruction (Stanford Alpaca rejected 3 or fewer: 4).
        max_words: Most words in an instruction.
        blacklist: Whole words or phrases that reject an instruction (case-insensitive).
        similarity_threshold: Highest ROUGE-L F against a seed or kept instruction that is still kept.

    """

    min_words: int = 4
    max_words: int = 150
    blacklist: tuple[str, ...] = BLACKLIST
    similarity_threshold: float = 0.7

    def pattern(self) -> re.Pattern[str] | None:
        """One regular expression matching any blacklisted word or phrase as whole words."""
        if not self.blacklist:
            return None
        return re.compile(r"\b(" + "|".join(re.escape(w) for w in self.blacklist) + r")\b", re.IGNORECASE)


def rule_verdict(task: Task, rules: Rules, blacklist: re.Pattern[str] | None, output: bool = True) -> str | None:
    """The first rule ``task`` breaks, without the duplicate checks (and the output's, unless ``output``)."""
    words = task.instruction.split()
    if len(words) < rules.min_words:
        return "too_short"
    if len(words) > rules.max_words:
        return "too_long"
    if blacklist is not None and blacklist.search(task.instruction):
        return "blacklisted"
    if task.instruction.lower().startswith(("write a program", "write a code", "write code")):
        return "program"
    first = task.instruction[0]
    if first in string.punctuation:
        return "punctuation_start"
    if not first.isascii():
        return "non_ascii_start"
    if output and not task.output.strip():
        return "empty_output"
    return None


def normalized(text: str) -> str:
    """Lower case, punctuation and runs of spaces folded: the key of an exact duplicate."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class Judge:
    """Every rule, with the instructions seen so far for the duplicate checks."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self._blacklist = rules.pattern()
        self.index = SimilarityIndex()
        self._keys: set[str] = set()

    def remember(self, task: Task) -> None:
        """Count ``task`` (a seed or a kept task) in the duplicate checks."""
        self._keys.add(normalized(task.instruction + " " + task.input))
        self.index.add(task.instruction)

    def verdict(self, task: Task, output: bool = True) -> tuple[str | None, float, str | None]:
        """Judge ``task`` against every rule and the instructions seen (its output too, unless ``output`` is False).

        Returns:
            ``(reason, similarity, closest)``: why it is rejected (None: kept), its highest ROUGE-L against the
            instructions seen and that instruction (both only when the rules before them passed).

        """
        reason = rule_verdict(task, self.rules, self._blacklist, output)
        if reason is not None:
            return reason, 0.0, None
        if normalized(task.instruction + " " + task.input) in self._keys:
            return "duplicate", 1.0, None
        score, closest = self.index.most_similar(task.instruction)
        return ("similar" if score > self.rules.similarity_threshold else None), score, closest
