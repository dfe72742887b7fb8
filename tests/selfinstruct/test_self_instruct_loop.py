"""The self-instruct loop with a scripted teacher: what is kept, the report, resume after a crash, bad settings."""

import json
from collections import Counter

import pytest
from teacher_server import SEEDS
from test_self_instruct_filters import BLOCKS

from alpaca_lora import ConfigError, DataError, self_instruct
from alpaca_lora.selfinstruct.filters import REASONS, Judge, Rules, rule_verdict
from alpaca_lora.selfinstruct.similarity import rouge_l
from alpaca_lora.selfinstruct.teachers import Answer

SEED_RECORDS = [{"instruction": "Suggest a healthy breakfast that has no eggs but plenty of protein.", "input": "",
                 "output": "Greek yogurt with nuts."},
                {"instruction": "Name the largest planet of the solar system.", "input": "", "output": "Jupiter"},
                {"instruction": "Turn the sentence into a question about its subject.", "input": "Cats purr.",
                 "output": "Do cats purr?"}]


class ScriptedTeacher:
    """Answers prompts from a list of answers, in order; records the prompts it was given."""

    description = "scripted"

    def __init__(self, answers: list[str | Answer], fail_after: int | None = None) -> None:
        self.answers, self.prompts, self.fail_after = list(answers), [], fail_after

    def answer(self, prompts, seed):
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise KeyboardInterrupt  # a Ctrl-C in the middle of a run
        self.prompts.extend(prompts)
        return [a if isinstance(a, Answer) else Answer(a, cut=False, tokens=len(a.split()))
                for a in (self.answers.pop(0) if self.answers else "" for _ in prompts)]


def _numbered(first: int, tasks: list[tuple[str, str, str]]) -> str:
    """A teacher answer continuing task ``first`` with ``tasks``."""
    blocks = [f"{n}. Instruction: {i}\n{n}. Input:\n{x or '<noinput>'}\n{n}. Output:\n{o}"
              for n, (i, x, o) in enumerate(tasks, first)]
    return "\n###\n".join(blocks)[len(f"{first}. Instruction:"):]


DISTINCT = [
    "Explain why leaves change colour in autumn.", "List four uses of baking soda around a house.",
    "Compose a haiku about a lighthouse at night.", "Convert 72 degrees Fahrenheit to Celsius and show the steps.",
    "Give three tips for a first job interview.", "Summarize the story of Romeo and Juliet in one sentence.",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?", "Suggest a name for a bakery that sells bagels.",
    "Describe the taste of a lemon to someone who never had one.", "Rewrite this sentence so that it sounds polite.",
    "What causes the tides of the ocean?", "Invent a riddle whose answer is a shadow.",
    "Outline a weekly budget for a college student.", "Tell whether the number 91 is prime.",
    "Recommend a board game for a family of five.", "Translate good morning into Italian and German.",
    "Argue for or against school uniforms in two sentences.", "How do bees make honey?",
    "Plan a three-course vegetarian dinner menu.", "Correct the grammar of the given paragraph.",
    "Estimate how many minutes a 5 km walk takes.", "Classify a tomato as a fruit or a vegetable and say why.",
    "Create a slogan for a bicycle repair shop.", "Name the planets of the solar system in order from the sun.",
    "Explain the difference between weather and climate.", "Pick the odd one out: apple, banana, carrot, grape.",
    "Write a thank-you note to a neighbour who watered plants.", "Why does ice float on water?",
    "Propose a stretching routine for office workers.", "Solve for x: 3x + 7 = 22.",
]


def _distinct(k: int, start: int = 0) -> list[tuple[str, str, str]]:
    """``k`` tasks of :data:`DISTINCT` from ``start``: no two within ROUGE-L 0.7 of each other."""
    return [(text, "", f"Answer {start + j}.") for j, text in enumerate(DISTINCT[start:start + k])]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_fixed_answer_is_judged_and_reported_block_by_block(tmp_path):
    out = tmp_path / "gen.jsonl"
    answer = Answer("\n###\n".join(text for text, _ in BLOCKS), cut=True, tokens=900)
    teacher = ScriptedTeacher([answer])
    self_instruct(SEED_RECORDS, teacher, out, num_instructions=5, request_batch_size=1, patience=1, progress=False)
    kept = _lines(out)
    assert [r["instruction"] for r in kept] == [
        "Classify the sentiment of the given movie review as positive or negative.",
        "Rewrite the sentence in the passive voice, keeping its tense."]
    report = json.loads((tmp_path / "gen.report.json").read_text())
    expected = Counter(v for _, v in BLOCKS if v is not None)
    expected["unparseable"] += 1  # the second round's empty answer
    assert report["rejected"] == {r: expected.get(r, 0) for r in REASONS}
    assert report["kept"] == 2 and report["requests"] == 2 and report["answer_tokens"] == 900
    assert report["status"] == "no_progress"  # patience=1: the next (empty) round kept nothing
    assert report["rejected_examples"]["similar"][0]["closest"] == SEED_RECORDS[0]["instruction"]
    # the prompt showed the seeds as numbered examples and asked for task 4
    body, header = teacher.prompts[0]
    assert header == "4. Instruction:" and all(r["instruction"] in body for r in SEED_RECORDS)


def test_every_kept_record_passes_the_filters_and_is_far_from_the_others(tmp_path):
    out = tmp_path / "gen.jsonl"
    near = [(t[0].rstrip(".?") + " today.", "", "x") for t in _distinct(6)]
    answers = [_numbered(4, _distinct(6)), _numbered(4, near + _distinct(6, 6)), _numbered(4, _distinct(8, 12))]
    self_instruct(SEED_RECORDS, ScriptedTeacher(answers), out, num_instructions=15, request_batch_size=1,
                  progress=False)
    kept = _lines(out)
    assert len(kept) == 15
    assert all(rule_verdict(_task(r), Rules(), Rules().pattern()) is None for r in kept)
    from rouge_score.tokenizers import DefaultTokenizer

    tokens = [DefaultTokenizer().tokenize(r["instruction"]) for r in kept + SEED_RECORDS]
    worst = max(rouge_l(a, b) for i, a in enumerate(tokens) for b in tokens[:i])
    assert worst <= 0.7
    report = json.loads((tmp_path / "gen.report.json").read_text())
    assert report["rejected"]["similar"] == 6 and report["status"] == "done" and max(report["similarity"]) <= 0.7


def _task(record):
    from alpaca_lora.selfinstruct.seeds import Task

    return Task(record["instruction"], record["input"], record["output"])


def test_an_interrupted_run_resumes_without_duplicates(tmp_path):
    out = tmp_path / "gen.jsonl"
    answers = [_numbered(4, _distinct(4, 4 * k)) for k in range(5)]
    with pytest.raises(KeyboardInterrupt):
        self_instruct(SEED_RECORDS, ScriptedTeacher(answers, fail_after=2), out, num_instructions=12,
                      request_batch_size=1, progress=False)
    first = out.read_text()
    assert len(_lines(out)) == 8
    report = json.loads((tmp_path / "gen.report.json").read_text())
    assert report["status"] == "interrupted" and report["kept"] == 8 and report["requests"] == 2
    with out.open("a") as f:  # a write cut short by the crash
        f.write('{"instruction": "Half a rec')
    # the resumed teacher repeats the whole first answer: all of it is a duplicate now
    teacher = ScriptedTeacher([answers[0], *answers[2:]])
    self_instruct(SEED_RECORDS, teacher, out, num_instructions=12, request_batch_size=1, progress=False)
    text = out.read_text()
    assert text.startswith(first) and len(_lines(out)) == 12
    instructions = [r["instruction"] for r in _lines(out)]
    assert len(set(instructions)) == 12
    report = json.loads((tmp_path / "gen.report.json").read_text())
    assert report["requests"] == 4 and report["rejected"]["duplicate"] == 4 and report["status"] == "done"
    # asked again: already complete, the teacher is not asked at all
    idle = ScriptedTeacher([])
    self_instruct(SEED_RECORDS, idle, out, num_instructions=12, progress=False)
    assert idle.prompts == [] and out.read_text() == text


def test_generated_tasks_join_the_examples_when_asked(tmp_path):
    teacher = ScriptedTeacher([_numbered(4, _distinct(3)), _numbered(4, _distinct(3, 3))])
    self_instruct(SEED_RECORDS, teacher, tmp_path / "gen.jsonl", num_instructions=6, request_batch_size=1,
                  generated_per_prompt=2, progress=False)
    first, second = (body for body, _ in teacher.prompts)
    assert sum(r["instruction"] in first for r in SEED_RECORDS) == 3
    assert sum(r["instruction"] in second for r in SEED_RECORDS) == 1
    assert sum(t[0] in second for t in _distinct(3)) == 2


def test_two_step_asks_for_instructions_then_answers_each(tmp_path):
    out = tmp_path / "gen.jsonl"
    instructions = [t[0] for t in _distinct(3)]
    first = " " + instructions[0] + "\n" + "".join(f"Task {n}: {i}\n" for n, i in enumerate(instructions[1:], 5))
    answers = [first + "Task 7: Draw a map of the town.\nTask 8: " + instructions[0],
               "A river is long.\n\n### Response:\nmore", Answer("cut", cut=True), "   "]
    teacher = ScriptedTeacher(answers)
    self_instruct(SEED_RECORDS, teacher, out, method="two_step", num_instructions=5, request_batch_size=1,
                  patience=1, progress=False)
    assert teacher.prompts[0][1] == "Task 4:" and teacher.prompts[0][0].startswith("Come up with a series of tasks")
    assert [p[1] for p in teacher.prompts[1:4]] == ["### Response:\n"] * 3  # the answers, as Alpaca prompts
    assert teacher.prompts[1][0].endswith(f"### Instruction:\n{instructions[0]}\n\n")
    assert len(teacher.prompts) == 5  # round 2: an empty answer, nothing to answer; patience=1 ends the run
    assert _lines(out) == [{"instruction": instructions[0], "input": "", "output": "A river is long."}]
    report = json.loads((tmp_path / "gen.report.json").read_text())
    assert {k: v for k, v in report["rejected"].items() if v} == {"blacklisted": 1, "duplicate": 1, "cut_off": 1,
                                                                  "empty_output": 1, "unparseable": 1}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_instructions": 0}, "num_instructions=0: must be an integer >= 1"),
    ({"temperature": 0}, r"temperature=0: must be a number in \(0.0, 2.0\]"),
    ({"similarity_threshold": 1.5}, "similarity_threshold=1.5"),
    ({"api": "rest"}, "api='rest': must be one of"),
    ({"method": "magic"}, "method='magic'"),
    ({"num_prompt_instructions": 20}, "must be below 20"),
    ({"min_words": 9, "max_words": 3}, "min_words=9 is above max_words=3"),
    ({"blacklist": "image"}, "blacklist='image': must be None or a list"),
    ({"output": "gen.json"}, "must be a path ending in .jsonl"),
])
def test_bad_settings_are_refused_before_any_request(tmp_path, kwargs, match):
    teacher = ScriptedTeacher([])
    with pytest.raises(ConfigError, match=match):
        self_instruct(SEED_RECORDS, teacher, kwargs.pop("output", tmp_path / "gen.jsonl"), progress=False, **kwargs)
    assert teacher.prompts == []


def test_an_output_that_is_not_ours_is_never_appended_to(tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text('{"text": "my notes"}\n')
    with pytest.raises(DataError, match=r"notes.jsonl, line 1 is not an Alpaca record"):
        self_instruct(SEED_RECORDS, ScriptedTeacher([]), out, progress=False)
    assert out.read_text() == '{"text": "my notes"}\n'


def test_a_missing_teacher_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is neither a folder nor an http"):
        self_instruct(SEEDS, tmp_path / "nowhere", tmp_path / "gen.jsonl", progress=False)


def test_the_judge_remembers_inputs_with_instructions():
    judge = Judge(Rules())
    task = _task({"instruction": "Turn the sentence into a question about it.", "input": "Dogs bark.", "output": "?"})
    judge.remember(task)
    assert judge.verdict(task)[0] == "duplicate"
