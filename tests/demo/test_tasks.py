"""Built-in tasks: determinism, correctness of every answer, balance, disjoint splits and scoring."""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime

import pytest

from alpaca_lora.data.prompts import get_template
from alpaca_lora.demo.tasks import (
    TASK_KINDS,
    TaskScore,
    exact_match,
    format_score_table,
    make_tasks,
    normalize_answer,
    score_predictions,
    train_test_tasks,
)
from alpaca_lora.errors import ConfigError, DataError

KEYS = {"instruction", "input", "output", "kind"}


def _split_items(text: str) -> list[str]:
    return text.split(", ")


def _check_uppercase(r: dict[str, str]) -> None:
    assert r["instruction"] == "Convert the text to uppercase."
    assert r["input"] == r["input"].lower() and r["input"].replace(" ", "").isalpha()
    assert r["output"] == r["input"].upper() and r["output"].isupper()


def _check_reverse_list(r: dict[str, str]) -> None:
    items = _split_items(r["input"])
    assert 3 <= len(items) <= 4 and len(set(items)) == len(items)
    assert _split_items(r["output"]) == items[::-1]


def _check_sort_numbers(r: dict[str, str]) -> None:
    numbers = [int(x) for x in r["input"].split(" ")]
    answer = [int(x) for x in r["output"].split(" ")]
    assert Counter(numbers) == Counter(answer)  # same multiset ...
    assert all(a < b for a, b in zip(answer, answer[1:], strict=False))  # ... strictly ascending
    assert len(numbers) == 3 and all(10 <= x <= 99 for x in numbers)


def _check_add(r: dict[str, str]) -> None:
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["instruction"])
    assert m and r["input"] == ""
    assert int(r["output"]) == int(m.group(1)) + int(m.group(2))
    assert r["output"] == str(int(r["output"]))  # plain digits, no padding


def _check_extract_field(r: dict[str, str]) -> None:
    field = re.fullmatch(r"What is the person's (name|age|city)\?", r["instruction"]).group(1)
    m = re.fullmatch(r"(\w+) is (\d+) years old and lives in (\w+)\.", r["input"])
    assert m
    assert r["output"] == {"name": m.group(1), "age": m.group(2), "city": m.group(3)}[field]


def _check_format_date(r: dict[str, str]) -> None:
    parsed = datetime.strptime(r["input"], "%B %d, %Y")
    assert r["output"] == parsed.date().isoformat()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["output"])


def _check_join_words(r: dict[str, str]) -> None:
    m = re.fullmatch(r'Join the words "([a-z]+)" and "([a-z]+)" with a hyphen\.', r["instruction"])
    assert m and r["input"] == "" and m.group(1) != m.group(2)
    assert r["output"].split("-") == [m.group(1), m.group(2)]


def _check_last_item(r: dict[str, str]) -> None:
    items = _split_items(r["input"])
    assert len(items) >= 3 and r["output"] == items[-1]


CHECKS = {
    "uppercase": _check_uppercase,
    "reverse_list": _check_reverse_list,
    "sort_numbers": _check_sort_numbers,
    "add": _check_add,
    "extract_field": _check_extract_field,
    "format_date": _check_format_date,
    "last_item": _check_last_item,
    "join_words": _check_join_words,
}


def test_kinds_are_varied_and_each_has_an_independent_check() -> None:
    assert len(TASK_KINDS) >= 6 and len(set(TASK_KINDS)) == len(TASK_KINDS)
    assert set(TASK_KINDS) == set(CHECKS)
    records = make_tasks(20 * len(TASK_KINDS))
    with_input = {r["kind"] for r in records if r["input"]}
    without_input = {r["kind"] for r in records if not r["input"]}
    assert with_input and without_input and not with_input & without_input


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_every_output_is_correct(kind: str) -> None:
    records = make_tasks(300, seed=7, kinds=[kind])
    assert len(records) == 300
    for r in records:
        assert set(r) == KEYS and all(isinstance(v, str) for v in r.values())
        assert r["kind"] == kind and r["output"] and r["output"] == normalize_answer(r["output"])
        CHECKS[kind](r)
    assert len({(r["instruction"], r["input"]) for r in records}) > 100  # not a handful of repeats


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    assert make_tasks(64, seed=3) == make_tasks(64, seed=3)
    assert make_tasks(64, seed=3) != make_tasks(64, seed=4)
    assert train_test_tasks(80, 24, seed=3) == train_test_tasks(80, 24, seed=3)
    assert train_test_tasks(80, 24, seed=3)[1] != train_test_tasks(80, 24, seed=4)[1]


def test_prefix_stable_and_kinds_independent() -> None:
    assert make_tasks(100, seed=1)[:37] == make_tasks(37, seed=1)
    # A kind's records do not depend on which other kinds are chosen.
    alone = make_tasks(10, seed=1, kinds=["add"])
    mixed = [r for r in make_tasks(20, seed=1, kinds=["uppercase", "add"]) if r["kind"] == "add"]
    assert alone == mixed


def test_balanced_round_robin_over_kinds() -> None:
    k = len(TASK_KINDS)
    records = make_tasks(3 * k + 2)
    assert [r["kind"] for r in records[:k]] == list(TASK_KINDS)
    counts = Counter(r["kind"] for r in records)
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 3 * k + 2
    assert make_tasks(0) == []


def test_kinds_subset_and_repeats() -> None:
    records = make_tasks(9, kinds=["add", "join_words", "add"])
    assert [r["kind"] for r in records] == ["add", "join_words"] * 4 + ["add"]
    assert {r["kind"] for r in make_tasks(4, kinds="uppercase")} == {"uppercase"}


@pytest.mark.parametrize("kinds", [["add", "multiply"], [], ["Uppercase"]])
def test_unknown_kind_is_a_config_error_listing_valid_kinds(kinds: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        make_tasks(4, kinds=kinds)
    assert all(k in str(info.value) for k in TASK_KINDS)
    with pytest.raises(ConfigError):
        train_test_tasks(4, 4, kinds=kinds)


@pytest.mark.parametrize("n", [-1, 2.5, "3"])
def test_bad_counts_are_config_errors(n: object) -> None:
    with pytest.raises(ConfigError, match="non-negative integer"):
        make_tasks(n)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_test"):
        train_test_tasks(4, n)  # type: ignore[arg-type]


def test_train_test_disjoint_unique_and_balanced() -> None:
    train, test = train_test_tasks(800, 160, seed=0)
    assert len(train) == 800 and len(test) == 160
    train_keys = [(r["instruction"], r["input"]) for r in train]
    test_keys = [(r["instruction"], r["input"]) for r in test]
    assert not set(train_keys) & set(test_keys)
    assert len(set(train_keys)) == len(train_keys) and len(set(test_keys)) == len(test_keys)
    assert Counter(r["kind"] for r in test) == {k: 160 // len(TASK_KINDS) for k in TASK_KINDS}
    assert Counter(r["kind"] for r in train) == {k: 800 // len(TASK_KINDS) for k in TASK_KINDS}
    for r in train + test:
        CHECKS[r["kind"]](r)


def test_test_set_does_not_depend_on_train_size() -> None:
    assert train_test_tasks(10, 40, seed=5)[1] == train_test_tasks(500, 40, seed=5)[1]


def test_too_many_distinct_examples_asked_is_a_config_error() -> None:
    # add has 80 * 9 = 720 distinct questions.
    with pytest.raises(ConfigError, match="'add' ran out of distinct examples"):
        train_test_tasks(700, 100, kinds=["add"])
    train, test = train_test_tasks(620, 100, kinds=["add"])
    assert len({(r["instruction"], r["input"]) for r in train + test}) == 720


def test_prompts_and_answers_are_short() -> None:
    template = get_template("alpaca")
    for r in make_tasks(50 * len(TASK_KINDS), seed=2):
        assert len(template.render(r["instruction"], r["input"])) < 600
        assert len(r["instruction"]) + len(r["input"]) < 120
        assert len(r["output"]) <= 40


def test_normalize_answer_and_exact_match() -> None:
    assert normalize_answer("  2021-03-05 \n") == "2021-03-05"
    assert normalize_answer("fig,\t pear,\n\napple") == "fig, pear, apple"
    assert normalize_answer("RED Star") == "RED Star"  # case is kept
    assert normalize_answer("") == ""
    assert exact_match(" 68\n", "68")
    assert not exact_match("red star", "RED STAR")
    assert not exact_match("68.", "68")
    assert not exact_match("The answer is 68", "68")


def test_score_predictions_counts_by_kind_and_overall() -> None:
    records = make_tasks(10, kinds=["add", "uppercase"])
    predictions = [r["output"] if i < 3 else "wrong" for i, r in enumerate(records)]
    scores = score_predictions(records, predictions)
    assert list(scores) == ["add", "uppercase", "overall"]
    assert (scores["add"].correct, scores["add"].total) == (2, 5)
    assert (scores["uppercase"].correct, scores["uppercase"].total) == (1, 5)
    assert (scores["overall"].correct, scores["overall"].total) == (3, 10)
    assert scores["overall"].accuracy == pytest.approx(0.3)
    assert TaskScore("x").accuracy == 0.0
    with pytest.raises(DataError, match="2 predictions for 10 records"):
        score_predictions(records, ["a", "b"])


def test_task_scores_count_the_evaluate_rows_by_kind() -> None:
    """The demo's table comes from evaluate()'s per-record exact match: no second scorer."""
    from alpaca_lora.demo.run import task_scores
    from alpaca_lora.inference.evaluate import EvalReport

    _, test = train_test_tasks(40, 24, seed=1)
    rows = [{"kind": r["kind"], "prediction": r["output"] if i % 2 else "x",
             "scores": {"exact_match": float(i % 2)}} for i, r in enumerate(test)]
    scores = task_scores(EvalReport({"exact_match": 0.5}, rows=rows))
    assert scores["overall"].total == 24 and scores["overall"].correct == 12
    assert sum(scores[k].correct for k in TASK_KINDS) == 12 and list(scores)[-1] == "overall"


def test_format_score_table() -> None:
    records = make_tasks(16, kinds=["add", "format_date"])
    before = score_predictions(records, ["x"] * 16)
    # all 8 "add" right; of the 8 "format_date" records, the 4 among the first 8 right.
    after = score_predictions(
        records, [r["output"] if r["kind"] == "add" or i < 8 else "x" for i, r in enumerate(records)]
    )
    table = format_score_table(before, after)
    lines = table.splitlines()
    assert lines[0].split() == ["kind", "base", "%", "tuned", "%", "n"]
    rows = {line.split()[0]: line.split()[1:] for line in lines if not line.startswith("-")}
    assert rows["add"] == ["0.0", "100.0", "8"]
    assert rows["format_date"] == ["0.0", "50.0", "8"]
    assert rows["overall"] == ["0.0", "75.0", "16"]
    assert lines[-2].startswith("---") and lines[-1].startswith("overall")
    assert len({len(line) for line in lines}) == 1  # columns aligned
    single = format_score_table(after).splitlines()
    assert single[0].split() == ["kind", "base", "%", "n"] and single[-1].split() == ["overall", "75.0", "16"]
