"""evaluate(): scores of answers you control, the real model's loss, comparison, reports, and bad input."""

import json
import math

import pytest
import torch

from alpaca_lora import ConfigError, DataError
from alpaca_lora.data.prepare import tokenize_instruction
from alpaca_lora.inference import generate as generate_module
from alpaca_lora.inference.evaluate import evaluate
from conftest import SHORT_RECORDS

RECORDS = [dict(r, kind="short" if len(r["output"]) < 5 else "long") for r in SHORT_RECORDS]


@pytest.fixture
def scripted(monkeypatch):
    """generate() replaced by answers keyed by the model: "right" answers every record, "half" every other."""
    calls = []

    def answer(model, instruction, input=None, **kwargs):  # noqa: A002
        calls.append((model, kwargs.get("template")))
        outputs = {(r["instruction"], r["input"]): r["output"] for r in RECORDS}
        if isinstance(instruction[0], list):  # conversations: the last user turn keys the answer
            return [outputs.get((m[-1]["content"], ""), "?") for m in instruction]
        keys = list(zip(instruction, input, strict=True))
        if model == "right":
            return [f" {outputs[k]}\n" for k in keys]
        return [outputs[k] if (i % 2 == 0) else "wrong" for i, k in enumerate(keys)]

    monkeypatch.setattr(generate_module, "generate", answer)
    return calls


def test_scores_of_controlled_answers(scripted):
    right = evaluate("right", RECORDS, loss=False, bootstrap=0)
    assert right.scores["exact_match"] == 1.0 and right.scores["chrf"] == pytest.approx(100.0)
    assert right.scores["bleu"] == 0.0  # sacreBLEU's corpus BLEU of one-word answers: no 2- to 4-grams at all
    half = evaluate("half", RECORDS, loss=False, bootstrap=200)
    assert half.scores["exact_match"] == 0.5
    assert [r["scores"]["exact_match"] for r in half.rows] == [1.0, 0.0] * 4
    assert half.rows[1]["prediction"] == "wrong" and half.rows[1]["reference"] == RECORDS[1]["output"]
    assert set(half.by_kind) == {"short", "long"} and half.intervals["exact_match"][0] < 0.5
    assert half.settings["records"] == 8 and half.settings["greedy"]


def test_compare_scores_both_on_the_same_prompts(scripted, tmp_path):
    report = evaluate("half", RECORDS, compare="right", loss=False, bootstrap=0, batch_size=2)
    assert report.compare.scores["exact_match"] == 1.0 and report.scores["exact_match"] == 0.5
    table = report.table()
    assert "compare" in table and "-50.0%" in table and "exact_match by kind" in table
    changed = report.changed(3)
    assert len(changed) == 3 and all(c["prediction"] == "wrong" and c["change"] == -1.0 for c in changed)
    assert {template for _, template in scripted} == {None, scripted[-1][1]}  # compare got the model's template
    report.to_json(tmp_path / "r.json")
    report.to_jsonl(tmp_path / "r.jsonl")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["scores"]["exact_match"] == 0.5 and saved["compare"]["scores"]["exact_match"] == 1.0
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and lines[1]["compare_prediction"].strip() == lines[1]["reference"]


def test_conversations_are_scored_at_their_last_assistant_turn(scripted):
    chats = [{"messages": [{"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["output"]}]} for r in RECORDS if not r["input"]]
    report = evaluate("any", chats, loss=False, bootstrap=0)
    assert report.scores["exact_match"] == 1.0 and report.rows[0]["reference"] == chats[0]["messages"][1]["content"]


def test_bad_input_is_refused_clearly(scripted):
    with pytest.raises(DataError, match="holds no records"):
        evaluate("right", [], loss=False)
    with pytest.raises(DataError, match=r"index 1: field 'output' is empty"):
        evaluate("right", [RECORDS[0], {**RECORDS[1], "output": " "}], loss=False)
    with pytest.raises(ConfigError, match="did you mean 'exact_match'"):
        evaluate("right", RECORDS, metrics=["exact"], loss=False)
    with pytest.raises(ConfigError, match="batch_size=0"):
        evaluate("right", RECORDS, batch_size=0)
    with pytest.raises(DataError, match="has no assistant turn"):
        evaluate("right", [{"messages": [{"role": "user", "content": "hi"}]}], loss=False)


def test_real_model_answers_and_loss_match_generate_and_a_manual_forward(tiny_model_dir, smol_tokenizer):
    """No stub: the answers are generate()'s, and eval_loss is the response-token cross-entropy."""
    from alpaca_lora.inference.generate import generate
    from alpaca_lora.model.load import load_model

    report = evaluate(tiny_model_dir, RECORDS[:4], max_new_tokens=6, compute_dtype="float32", bootstrap=0)
    answers = generate(tiny_model_dir, [r["instruction"] for r in RECORDS[:4]], [r["input"] for r in RECORDS[:4]],
                       max_new_tokens=6, compute_dtype="float32")
    assert [r["prediction"] for r in report.rows] == answers
    model, tok = load_model(tiny_model_dir, None, "float32", device="cpu")
    total, count = 0.0, 0
    for r in RECORDS[:4]:
        f = tokenize_instruction(r, tok, "alpaca", cutoff_len=1024)
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum"))
        count += int((labels[0, 1:] != -100).sum())
    assert report.scores["eval_loss"] == pytest.approx(total / count, rel=1e-4)
    assert report.scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-3)


def test_real_model_on_conversations_answers_the_last_turn_and_has_a_loss(tiny_model_dir):
    from alpaca_lora.inference.generate import generate

    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["instruction"]},
              {"role": "assistant", "content": r["output"]}] for r in SHORT_RECORDS[:3]]
    report = evaluate(tiny_model_dir, [{"messages": c} for c in chats], max_new_tokens=5, compute_dtype="float32",
                      bootstrap=0)
    assert [r["prediction"] for r in report.rows] == generate(tiny_model_dir, [c[:-1] for c in chats],
                                                              max_new_tokens=5, compute_dtype="float32")
    assert [r["reference"] for r in report.rows] == [r["output"] for r in SHORT_RECORDS[:3]]
    assert math.isfinite(report.scores["eval_loss"]) and report.scores["eval_loss"] > 0


def test_a_model_passed_in_while_training_is_scored_without_dropout(tiny_model_dir):
    """A model straight from training (train mode, LoRA dropout 0.5): the same loss twice, still training after."""
    from alpaca_lora import FinetuneConfig
    from alpaca_lora.model.load import load_model
    from alpaca_lora.model.lora import attach_lora

    model, tok = load_model(tiny_model_dir, "nf4", "float32", device="cpu")
    model = attach_lora(model, FinetuneConfig(lora_dropout=0.5, lora_target_modules="all-linear")).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    losses = [evaluate(model, RECORDS[:4], tokenizer=tok, metrics=("exact_match",), max_new_tokens=2,
                       bootstrap=0).scores["eval_loss"] for _ in range(2)]
    assert losses[0] == losses[1] and math.isfinite(losses[0])
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn
    assert model.training  # given back as it came


def test_a_loaded_model_and_its_compare_are_prompted_with_its_folder_template(tiny_model_dir, tmp_path):
    """The first model loaded from a folder with a saved template: compare= (the same folder) gets that template
    too, so the two give the same answers; a loaded compare model takes tokenizer= as well."""
    import shutil

    from alpaca_lora.data.prompts import get_template
    from alpaca_lora.export import layout as art
    from alpaca_lora.inference.generate import resolve_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / art.TEMPLATE_FILE).write_text(json.dumps(get_template("alpaca_short").to_dict()))
    model, tok, _ = resolve_model(folder, None, None, "float32", None)
    report = evaluate(model, RECORDS[:3], tokenizer=tok, compare=folder, max_new_tokens=4, bootstrap=0,
                      compute_dtype="float32")
    assert [r["prediction"] for r in report.rows] == [r["prediction"] for r in report.compare.rows]
    alpaca = evaluate(model, RECORDS[:3], tokenizer=tok, template="alpaca", max_new_tokens=4, bootstrap=0,
                      compute_dtype="float32", loss=False)
    assert [r["prediction"] for r in alpaca.rows] != [r["prediction"] for r in report.rows]  # the template matters
    loaded = evaluate(folder, RECORDS[:3], tokenizer=tok, compare=model, max_new_tokens=4, bootstrap=0,
                      compute_dtype="float32", loss=False)
    assert [r["prediction"] for r in loaded.compare.rows] == [r["prediction"] for r in loaded.rows]


def test_kinds_are_read_from_any_spelling_of_a_json_path(scripted, tmp_path):
    path = tmp_path / "HELD.JSON"
    path.write_text(json.dumps(RECORDS))
    assert set(evaluate("half", path, loss=False, bootstrap=0).by_kind) == {"short", "long"}
