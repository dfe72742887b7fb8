"""Built-in instruction tasks with exactly one correct answer, for demos and quick evaluations.

Each task kind is a small pure function of a seeded :class:`random.Random` that returns an
``(instruction, input, output)`` triple drawn from the short word lists below. The tasks are made to
be learnable by a ~135M-parameter model in a few hundred LoRA steps (short prompts, answers of a
few tokens, one fixed instruction wording per kind) and to be scored by exact string match, so a
fine-tune's effect shows up as held-out accuracy before and after training::

    train, test = train_test_tasks(800, 160, seed=0)
    report = alpaca_lora.evaluate("merged", test, compare="base")  # exact match, BLEU, ROUGE-L, chrF
    print(report.table())

Records are dicts with the Alpaca columns ``instruction``/``input``/``output`` plus ``kind``;
``input`` is ``""`` for kinds that need none. Exact match is :func:`alpaca_lora.data.metrics.exact_match`
(strip, collapse whitespace, case kept); this module does not depend on the model code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from alpaca_lora.data.metrics import exact_match, normalize_answer
from alpaca_lora.errors import ConfigError, DataError

__all__ = ["TASK_KINDS", "TaskScore", "exact_match", "format_score_table", "make_tasks", "normalize_answer",
           "score_predictions", "train_test_tasks"]

Triple = tuple[str, str, str]  # (instruction, input, output)

_WORDS = (
    "apple", "bird", "black", "blue", "boat", "book", "bread", "cake", "car", "cat", "city", "cloud",
    "cold", "dog", "door", "fast", "fish", "game", "gold", "good", "green", "happy", "horse", "house",
    "lamp", "light", "moon", "music", "night", "old", "paper", "park", "rain", "red", "river", "road",
    "small", "snow", "star", "stone", "sun", "table", "tree", "warm", "water", "white", "wind", "world",
)
_FRUITS = (
    "apple", "banana", "cherry", "grape", "lemon", "lime", "mango", "melon", "orange", "peach",
    "pear", "plum", "kiwi", "fig", "date", "papaya",
)
_NAMES = (
    "Anna", "Ben", "Carlos", "David", "Elena", "Emma", "Hugo", "Ivan", "James", "Julia", "Laura",
    "Leo", "Lucas", "Maria", "Marta", "Nina", "Omar", "Paul", "Sara", "Tom",
)
_CITIES = (
    "Berlin", "Boston", "Cairo", "Dublin", "Lima", "Lisbon", "London", "Lyon", "Madrid", "Milan",
    "Oslo", "Paris", "Prague", "Rome", "Seoul", "Sydney", "Tokyo", "Toronto", "Vienna", "Warsaw",
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)


def _uppercase(rng: random.Random) -> Triple:
    """``"green river"`` -> ``"GREEN RIVER"``."""
    text = " ".join(rng.sample(_WORDS, rng.randint(2, 3)))
    return "Convert the text to uppercase.", text, text.upper()


def _reverse_list(rng: random.Random) -> Triple:
    """``"apple, pear, fig"`` -> ``"fig, pear, apple"``."""
    items = rng.sample(_FRUITS, rng.randint(3, 4))
    return "Reverse the order of the items.", ", ".join(items), ", ".join(reversed(items))


def _sort_numbers(rng: random.Random) -> Triple:
    """``"71 42 19"`` -> ``"19 42 71"``.

    Three distinct two-digit numbers, so the order is unique and compares digit by digit. Mixing one-
    and two-digit numbers, and lists of four, were the main errors of a briefly tuned 135M model.
    """
    numbers = rng.sample(range(10, 100), 3)
    text = " ".join(map(str, numbers))
    return "Sort the numbers in ascending order.", text, " ".join(map(str, sorted(numbers)))


def _add(rng: random.Random) -> Triple:
    """``"What is 23 + 5?"`` -> ``"28"`` (no input).

    A two-digit plus a one-digit number: learnable in a few hundred steps by a 135M model, which got
    about half of two-digit plus two-digit sums right after the same training.
    """
    a, b = rng.randint(10, 89), rng.randint(1, 9)
    return f"What is {a} + {b}?", "", str(a + b)


def _extract_field(rng: random.Random) -> Triple:
    """``"What is the person's city?"`` + a sentence -> the name, age or city in it."""
    name, age, city = rng.choice(_NAMES), str(rng.randint(18, 80)), rng.choice(_CITIES)
    field, answer = rng.choice((("name", name), ("age", age), ("city", city)))
    return f"What is the person's {field}?", f"{name} is {age} years old and lives in {city}.", answer


def _format_date(rng: random.Random) -> Triple:
    """``"March 5, 2021"`` -> ``"2021-03-05"`` (days 1-28, valid in every month)."""
    year, month, day = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(1, 28)
    text = f"{_MONTHS[month - 1]} {day}, {year}"
    return "Convert the date to ISO format (YYYY-MM-DD).", text, f"{year:04d}-{month:02d}-{day:02d}"


def _join_words(rng: random.Random) -> Triple:
    """``'Join the words "red" and "moon" with a hyphen.'`` -> ``"red-moon"`` (no input)."""
    first, second = rng.sample(_WORDS, 2)
    return f'Join the words "{first}" and "{second}" with a hyphen.', "", f"{first}-{second}"


def _last_item(rng: random.Random) -> Triple:
    """``"red, cat, moon"`` -> ``"moon"``."""
    items = rng.sample(_WORDS, rng.randint(3, 5))
    return "What is the last item in the list?", ", ".join(items), items[-1]


_GENERATORS: dict[str, Callable[[random.Random], Triple]] = {
    "uppercase": _uppercase,
    "reverse_list": _reverse_list,
    "sort_numbers": _sort_numbers,
    "add": _add,
    "extract_field": _extract_field,
    "format_date": _format_date,
    "last_item": _last_item,
    "join_words": _join_words,
}

TASK_KINDS: tuple[str, ...] = tuple(_GENERATORS)
"""Names of the built-in task kinds, in the fixed order records cycle through them."""


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return TASK_KINDS
    chosen = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in chosen if k not in _GENERATORS]
    if unknown or not chosen:
        what = f"unknown task kinds {unknown}" if unknown else "no task kinds given"
        raise ConfigError(f"{what}; valid kinds are {list(TASK_KINDS)} (or pass kinds=None for all)")
    return tuple(dict.fromkeys(chosen))  # drop repeats, keep order


def _check_count(name: str, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {n!r}")


def _quotas(n: int, kinds: tuple[str, ...]) -> dict[str, int]:
    """Split ``n`` over ``kinds`` as evenly as possible; earlier kinds get the remainder."""
    base, extra = divmod(n, len(kinds))
    return {kind: base + (i < extra) for i, kind in enumerate(kinds)}


def _record(kind: str, triple: Triple) -> dict[str, str]:
    instruction, input_text, output = triple
    return {"instruction": instruction, "input": input_text, "output": output, "kind": kind}


def _interleave(by_kind: dict[str, list[dict[str, str]]]) -> list[dict[str, str]]:
    """Round-robin over kinds: record ``i`` has kind ``kinds[i % len(kinds)]`` while all last."""
    out: list[dict[str, str]] = []
    for i in range(max((len(v) for v in by_kind.values()), default=0)):
        out.extend(records[i] for records in by_kind.values() if i < len(records))
    return out


def _draw_unique(
    kind: str, count: int, rng: random.Random, exclude: set[tuple[str, str]]
) -> list[dict[str, str]]:
    """Draw ``count`` records of ``kind`` with (instruction, input) pairs not in ``exclude``; add them."""
    out: list[dict[str, str]] = []
    attempts, limit = 0, 50 * count + 1000
    while len(out) < count:
        attempts += 1
        if attempts > limit:
            raise ConfigError(
                f"task kind {kind!r} ran out of distinct examples after {len(out)} of {count}; "
                "ask for fewer records of this kind"
            )
        record = _record(kind, _GENERATORS[kind](rng))
        key = (record["instruction"], record["input"])
        if key not in exclude:
            exclude.add(key)
            out.append(record)
    return out


def make_tasks(n: int, *, seed: int = 0, kinds: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Generate ``n`` task records, cycling through the kinds.

    Each kind draws from its own generator seeded by ``(seed, kind)``, so a kind's records do not
    change when other kinds are added or removed, and ``make_tasks(m)`` is a prefix of
    ``make_tasks(n)`` for ``m <= n``. Records may repeat; use :func:`train_test_tasks` for
    disjoint splits.

    Args:
        n: Number of records.
        seed: Seed; the same seed gives the same records.
        kinds: Task kinds to use (names from :data:`TASK_KINDS`); ``None`` uses all of them.

    Returns:
        Records ``{"instruction", "input", "output", "kind"}``; ``input`` is ``""`` for kinds without one.

    Raises:
        ConfigError: ``n`` is negative or a kind is unknown.

    """
    _check_count("n", n)
    chosen = _check_kinds(kinds)
    rngs = {kind: random.Random(f"{seed}:{kind}") for kind in chosen}
    by_kind = {
        kind: [_record(kind, _GENERATORS[kind](rngs[kind])) for _ in range(count)]
        for kind, count in _quotas(n, chosen).items()
    }
    return _interleave(by_kind)


def train_test_tasks(
    n_train: int, n_test: int, *, seed: int = 0, kinds: Sequence[str] | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Generate disjoint train and test sets, both balanced over kinds.

    No (instruction, input) pair occurs twice in either set or in both, so test accuracy measures
    the rule the model learnt, not recall of training examples. The smallest kind, ``add``, has 720
    distinct questions, so up to about 5,000 records in all fit with every kind.

    Args:
        n_train: Number of training records.
        n_test: Number of held-out test records.
        seed: Seed; the same seed gives the same split.
        kinds: Task kinds to use; ``None`` uses all of :data:`TASK_KINDS`.

    Returns:
        ``(train, test)`` lists of records as returned by :func:`make_tasks`.

    Raises:
        ConfigError: A count is negative, a kind is unknown, or a kind has too few distinct examples.

    """
    _check_count("n_train", n_train)
    _check_count("n_test", n_test)
    chosen = _check_kinds(kinds)
    test_by_kind, train_by_kind = {}, {}
    for kind in chosen:
        seen: set[tuple[str, str]] = set()
        # Test first, so its size and content do not depend on n_train.
        rng = random.Random(f"{seed}:{kind}:test")
        test_by_kind[kind] = _draw_unique(kind, _quotas(n_test, chosen)[kind], rng, seen)
        rng = random.Random(f"{seed}:{kind}:train")
        train_by_kind[kind] = _draw_unique(kind, _quotas(n_train, chosen)[kind], rng, seen)
    return _interleave(train_by_kind), _interleave(test_by_kind)


@dataclass
class TaskScore:
    """Exact-match counts for one task kind (or ``"overall"``).

    Attributes:
        kind: Task kind, or ``"overall"``.
        correct: Number of exactly matching predictions.
        total: Number of records scored.

    """

    kind: str
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        """Fraction correct, in ``[0, 1]``; ``0.0`` when nothing was scored."""
        return self.correct / self.total if self.total else 0.0


def score_predictions(records: Sequence[dict[str, str]], predictions: Sequence[str]) -> dict[str, TaskScore]:
    """Score predictions against the records' outputs by exact match.

    Args:
        records: Records with ``output`` and ``kind`` (a missing kind counts as ``"unknown"``).
        predictions: One predicted answer per record, in order.

    Returns:
        Scores by kind, in order of first appearance, then ``"overall"`` last.

    Raises:
        DataError: The two sequences differ in length.

    """
    if len(records) != len(predictions):
        raise DataError(
            f"got {len(predictions)} predictions for {len(records)} records; pass one prediction per record"
        )
    return tally([r.get("kind", "unknown") for r in records],
                 [int(exact_match(p, r["output"])) for r, p in zip(records, predictions, strict=True)])


def tally(kinds: Sequence[str], hits: Sequence[int]) -> dict[str, TaskScore]:
    """Count ``hits`` (1 or 0 per record) by kind, in order of first appearance, then ``"overall"`` last."""
    scores: dict[str, TaskScore] = {}
    overall = TaskScore("overall")
    for kind, hit in zip(kinds, hits, strict=True):
        for s in (scores.setdefault(kind, TaskScore(kind)), overall):
            s.correct += hit
            s.total += 1
    scores["overall"] = overall
    return scores


def format_score_table(before: dict[str, TaskScore], after: dict[str, TaskScore] | None = None) -> str:
    """Render scores as a plain-text table: kind, base accuracy, tuned accuracy (if given), count.

    Args:
        before: Scores of the base model, from :func:`score_predictions`.
        after: Scores after fine-tuning on the same records, or ``None`` for a single column.

    Returns:
        The table, one line per kind and ``overall`` last, without a trailing newline.

    """
    kinds = [k for k in before if k != "overall"]
    kinds += [k for k in (after or {}) if k != "overall" and k not in before]
    kinds += ["overall"] if "overall" in before or (after and "overall" in after) else []
    header = ["kind", "base %"] + (["tuned %"] if after is not None else []) + ["n"]

    def cell(scores: dict[str, TaskScore], kind: str) -> str:
        return f"{100 * scores[kind].accuracy:.1f}" if kind in scores else "-"

    rows = []
    for kind in kinds:
        n = (before.get(kind) or (after or {})[kind]).total
        tuned = [cell(after, kind)] if after is not None else []
        rows.append([kind, cell(before, kind), *tuned, str(n)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    rule = "-" * len(line(header))
    body = [line(r) for r in rows]
    if kinds and kinds[-1] == "overall":
        body.insert(len(body) - 1, rule)
    return "\n".join([line(header), rule, *body])
