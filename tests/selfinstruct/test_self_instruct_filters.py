"""The parser and the filters on fixed teacher answers whose verdicts are written down here."""

import json

import pytest
from rouge_score import rouge_scorer
from teacher_server import SEEDS

from alpaca_lora.selfinstruct.filters import BLACKLIST, Judge, Rules, normalized
from alpaca_lora.selfinstruct.prompting import (
    TASKS_PER_PROMPT,
    answer_prompt,
    parse_answer,
    parse_instructions,
    prompt_body,
    prompt_header,
)
from alpaca_lora.selfinstruct.seeds import Task, load_seed_tasks
from alpaca_lora.selfinstruct.similarity import SimilarityIndex, rouge_l

SEED = Task("Suggest a healthy breakfast that has no eggs but plenty of protein.", "", "Greek yogurt with nuts.")

# One teacher answer (continuing "4. Instruction:"), block by block, with the verdict each must get.
BLOCKS = [
    (" Classify the sentiment of the given movie review as positive or negative.\n4. Input:\nThe plot dragged, "
     "but the acting was superb.\n4. Output:\nPositive", None),
    ("5. Instruction: Suggest a healthy breakfast that has no eggs but plenty of protein.\n5. Input:\n<noinput>\n"
     "5. Output:\nOatmeal with peanut butter.", "duplicate"),  # the seed, word for word
    ("6. Instruction: Suggest a healthy breakfast that has no eggs but lots of protein.\n6. Input:\n<noinput>\n"
     "6. Output:\nTofu scramble.", "similar"),  # one word changed: ROUGE-L 0.92
    ("7. Instruction: Draw a picture of a cat sitting on a fence.\n7. Input:\n<noinput>\n7. Output:\n(a drawing)",
     "blacklisted"),
    ("8. Instruction: Sort these.\n8. Input:\n3, 1, 2\n8. Output:\n1, 2, 3", "too_short"),
    ("9. Instruction: " + "Explain " * 151 + "\n9. Input:\n<noinput>\n9. Output:\nNo.", "too_long"),
    ("10. Instruction: Name the capital of France.\n10. Output:\nParis", "unparseable"),  # no input label
    ("11. Instruction: Write a program that prints the first ten primes.\n11. Input:\n<noinput>\n11. Output:\n"
     "print(2)", "program"),
    ('12. Instruction: "Quote" the most famous line of Hamlet, please.\n12. Input:\n<noinput>\n12. Output:\n'
     "To be, or not to be.", "punctuation_start"),
    ("13. Instruction: Écrivez une phrase sur la mer et le soleil.\n13. Input:\n<noinput>\n13. Output:\n"
     "La mer brille.", "non_ascii_start"),
    ("14. Instruction: List three primary colors of light for screens.\n14. Input:\n<noinput>\n14. Output:\n",
     "empty_output"),
    ("15. Instruction: Rewrite the sentence in the passive voice, keeping its tense.\n15. Input:\nThe dog chased "
     "the ball.\n15. Output:\nThe ball was chased by the dog.", None),
    ("16. Instruction: CLASSIFY the sentiment of the given movie review, as positive or negative!\n16. Input:\nThe "
     "plot dragged but the acting was superb\n16. Output:\nNegative", "duplicate"),  # block 1 but for case and marks
    ("17. Instruction: Translate the following sentence into Spanish for a tourist who is", "cut_off"),
]


def _judge_all(answer: str, cut: bool, rules: Rules | None = None) -> list[tuple[str | None, Task | None]]:
    judge = Judge(rules or Rules())
    judge.remember(SEED)
    verdicts = []
    for parsed in parse_answer(answer, 4, cut):
        if not parsed.complete:
            verdicts.append(("cut_off", parsed.task))
            continue
        if parsed.task is None:
            verdicts.append(("unparseable", None))
            continue
        reason = judge.verdict(parsed.task)[0]
        if reason is None:
            judge.remember(parsed.task)
        verdicts.append((reason, parsed.task))
    return verdicts


def test_each_block_gets_its_written_verdict():
    answer = "\n###\n".join(text for text, _ in BLOCKS)
    verdicts = _judge_all(answer, cut=True)
    assert [v for v, _ in verdicts] == [v for _, v in BLOCKS]
    kept = [t for v, t in verdicts if v is None]
    assert kept[0] == Task("Classify the sentiment of the given movie review as positive or negative.",
                           "The plot dragged, but the acting was superb.", "Positive")
    assert kept[1].input == "The dog chased the ball."


def test_a_complete_answer_keeps_its_last_block():
    answer = "\n###\n".join(text for text, _ in BLOCKS[:-1])
    assert [v for v, _ in _judge_all(answer, cut=False)] == [v for _, v in BLOCKS[:-1]]


def test_the_similarity_rule_is_rouge_l_at_the_threshold():
    near = "Suggest a healthy breakfast that has no eggs but lots of protein."
    score = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(SEED.instruction, near)["rougeL"].fmeasure
    assert score == pytest.approx(11 / 12)  # 12 words each, 11 in common, in order
    answer = f" {near}\n4. Input:\n<noinput>\n4. Output:\nTofu."
    assert _judge_all(answer, False, Rules(similarity_threshold=0.95))[0][0] is None
    assert _judge_all(answer, False, Rules(similarity_threshold=0.91))[0][0] == "similar"


def test_rouge_l_equals_rouge_score_on_the_seed_tasks():
    seeds = [t.instruction for t in load_seed_tasks(SEEDS)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    index = SimilarityIndex()
    for text in seeds[:120]:
        index.add(text)
    for text in seeds[120:]:
        best, closest = index.most_similar(text)
        scores = [scorer.score(other, text)["rougeL"].fmeasure for other in seeds[:120]]
        assert best == pytest.approx(max(scores), abs=1e-12)
        assert closest == seeds[scores.index(max(scores))]
    assert rouge_l([], ["a"]) == 0.0 and rouge_l(["a", "b", "c"], ["a", "c"]) == pytest.approx(0.8)


def test_blacklist_matches_whole_words_only():
    judge = Judge(Rules())
    assert judge.verdict(Task("Summarize the audio recording in two sentences.", "", "x"))[0] == "blacklisted"
    assert judge.verdict(Task("Explain what a profile of a company should contain.", "", "x"))[0] is None  # "file"
    assert judge.verdict(Task("Go to the store and buy some milk today.", "", "x"))[0] == "blacklisted"
    assert "image" in BLACKLIST
    custom = Judge(Rules(blacklist=("milk",)))
    assert custom.verdict(Task("Go to the store and buy some milk today.", "", "x"))[0] == "blacklisted"
    assert custom.verdict(Task("Describe an image of the sea at dawn.", "", "x"))[0] is None


def test_exact_duplicates_fold_case_punctuation_and_spaces():
    assert normalized("  Name THREE colors!! ") == normalized("name three, colors") == "name three colors"


def test_the_prompt_shows_the_examples_and_ends_with_the_next_number():
    examples = load_seed_tasks(SEEDS)[:3]
    body, header = prompt_body(examples), prompt_header(examples)
    assert header == "4. Instruction:" and body.endswith("###\n")
    assert f"1. Instruction: {examples[0].instruction}\n1. Input:\n<noinput>\n1. Output:\n" in body
    assert f"set of {TASKS_PER_PROMPT} diverse task instructions" in body
    parsed = parse_answer(body.split("###\n", 1)[1] + "4. Instruction: Name a fruit that is red.\n4. Input:\n"
                          "<noinput>\n4. Output:\nA strawberry.", 99, cut=False)
    assert [p.task for p in parsed][:3] == examples  # the prompt's own blocks read back as the seeds
    assert parsed[3].task == Task("Name a fruit that is red.", "", "A strawberry.")


def test_tasks_past_the_list_are_not_read():
    answer = f"{TASKS_PER_PROMPT}. Instruction: Name a fruit that is red.\n{TASKS_PER_PROMPT}. Input:\n<noinput>\n" \
             f"{TASKS_PER_PROMPT}. Output:\nA cherry.\n###\n{TASKS_PER_PROMPT + 1}. Instruction: Name a blue fruit."\
             f"\n{TASKS_PER_PROMPT + 1}. Input:\n<noinput>\n{TASKS_PER_PROMPT + 1}. Output:\nA blueberry."
    assert [p.task.output for p in parse_answer(answer, 4, cut=False)] == ["A cherry."]


def test_two_step_instructions_and_answer_prompts():
    answer = " Name a fruit that is red.\nTask 10: Explain why the sky is blue\n  in one sentence.\nTask 11:\n" \
             "Task 12: Give an example of a mammal that"
    parsed = parse_instructions(answer, 9, cut=True)
    assert [p.task.instruction if p.task else None for p in parsed] == [
        "Name a fruit that is red.", "Explain why the sky is blue in one sentence.", None,
        "Give an example of a mammal that"]
    assert [p.complete for p in parsed] == [True, True, True, False]
    body, header = answer_prompt("Name a fruit.", "completions")
    assert header == "### Response:\n" and body.endswith("### Instruction:\nName a fruit.\n\n")
    assert answer_prompt("Name a fruit.", "chat") == ("Name a fruit.", "")


def test_seed_forms_and_damaged_seed_files(tmp_path):
    from alpaca_lora import DataError

    seeds = load_seed_tasks(SEEDS)
    first = json.loads(SEEDS.read_text().splitlines()[0])
    assert len(seeds) == 175 and seeds[0].instruction == first["instruction"].strip()
    assert seeds[0].output == first["instances"][0]["output"].strip()
    alpaca = load_seed_tasks([{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                              {"instruction": "Add 2 and 3.", "input": "", "output": "five"}])
    assert alpaca == [Task("Add 2 and 3.", "", "5")]  # duplicates of an instruction dropped
    bad = tmp_path / "seeds.jsonl"
    bad.write_text(SEEDS.read_text().splitlines()[0] + "\n{\"instruction\": \"x\", \"instances\": []}\n")
    with pytest.raises(DataError, match=r"seeds.jsonl, line 2 is not a seed task"):
        load_seed_tasks(bad)
    bad.write_text(SEEDS.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"line 2 is not JSON"):
        load_seed_tasks(bad)
