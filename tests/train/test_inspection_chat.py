"""inspect_data on conversations: the counts training makes, the masked example, bad records named."""

from __future__ import annotations

import json
import re

import pytest

from alpaca_lora import ConfigError, DataError
from alpaca_lora.data.pipeline import prepare_conversations
from alpaca_lora.data.sources import load_data
from alpaca_lora.model.load import load_tokenizer
from alpaca_lora.train.inspection import MASK_CLOSE, MASK_OPEN, format_inspection, inspect_data

EOT = "<|im_end|>"
CHATS = [
    {"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"}]},
    {"messages": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": '{"name": "sky", "arguments": {}}', "tool_call": True, "train": False},
        {"role": "tool", "content": '{"colour": "blue"}'},
        {"role": "assistant", "content": "Still blue, the tool agrees."},
    ]},
]


def _split(example):
    """``(trained text, masked text)`` of an example: the text outside and inside the markers."""
    masked = re.findall(re.escape(MASK_OPEN) + "(.*?)" + re.escape(MASK_CLOSE), example, flags=re.DOTALL)
    trained = re.sub(re.escape(MASK_OPEN) + ".*?" + re.escape(MASK_CLOSE), "", example, flags=re.DOTALL)
    return trained, "".join(masked)


@pytest.fixture(scope="module")
def glaive(shared_data):
    return shared_data / "glaive_toolcall_sharegpt.json"


@pytest.mark.parametrize(("cutoff_len", "chat_template", "train_on_inputs"),
                         [(256, None, False), (1024, "chatml", True)])
def test_the_counts_are_those_of_prepare_conversations(glaive, smol_dir, cutoff_len, chat_template,
                                                       train_on_inputs):
    report = inspect_data(glaive, smol_dir, cutoff_len=cutoff_len, chat_template=chat_template,
                          train_on_inputs=train_on_inputs)
    ds, fmt = load_data(glaive)
    _, prep = prepare_conversations(ds, load_tokenizer(smol_dir), chat_template=chat_template,
                                    cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
    assert fmt == report.data_format == "sharegpt"
    assert report.records == report.good_records == len(ds) == 300 and report.bad_records == []
    assert (report.kept, report.dropped, report.truncated) == (prep.kept, prep.drop_reasons, prep.truncated)
    assert (report.total_tokens, report.label_tokens) == (prep.total_tokens, prep.label_tokens)
    assert (report.turns, report.dropped_turns) == (prep.turns, prep.dropped_turns)
    assert report.truncated > 0 and report.dropped_turns > 0 and report.over_cutoff >= report.truncated
    assert report.length_percentiles["max"] > cutoff_len
    text = format_inspection(report)
    assert f"{prep.kept} kept, {prep.truncated} of them truncated" in text
    assert f"{prep.turns} assistant turns trained, {prep.dropped_turns} turns cut off" in text
    if cutoff_len == 256:  # some first prompts alone fill 256 tokens
        assert report.dropped == {"prompt fills cutoff_len": report.records - report.kept} and report.kept < 300


def test_the_example_trains_on_exactly_the_assistant_turns(smol_dir, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in CHATS) + "\n", encoding="utf-8")
    report = inspect_data(path, smol_dir, cutoff_len=512)
    assert report.data_format == "messages" and report.example_index == 1  # the one with the most roles
    trained, masked = _split(report.example)
    assert trained == f"Blue.{EOT}Still blue, the tool agrees.{EOT}"
    for turn in CHATS[1]["messages"]:
        if turn["role"] != "assistant" or turn.get("train") is False:
            assert turn["content"] in masked
    assert masked.count("<|im_start|>assistant\n") == 3 and "<|im_start|>tool\n" in masked
    assert report.turns == 3 and report.label_tokens == sum(  # red, Blue. and the last turn, each with <|im_end|>
        len(load_tokenizer(smol_dir)(t + EOT, add_special_tokens=False)["input_ids"])
        for t in ("red", "Blue.", "Still blue, the tool agrees."))
    assert report.example in format_inspection(report)
    # Everything carries loss with train_on_inputs: no marker is left.
    assert MASK_OPEN not in inspect_data(path, smol_dir, train_on_inputs=True).example


def test_a_cut_conversation_keeps_its_first_turns_and_a_full_prompt_drops_it(smol_dir, tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(CHATS[1:]), encoding="utf-8")
    report = inspect_data(path, smol_dir, cutoff_len=60, chat_template="chatml")
    # cut off: the untrained tool call (not counted) and the last trained answer
    assert report.template == "chatml" and report.truncated == 1 and report.dropped_turns == 1 and report.turns == 1
    assert _split(report.example)[0] == f"Blue.{EOT}"  # no conversation fits whole: the cut one is shown
    path.write_text(json.dumps(CHATS), encoding="utf-8")
    dropped = inspect_data(path, smol_dir, cutoff_len=4)
    assert dropped.kept == 0 and dropped.example == "" and sum(dropped.dropped.values()) == 2
    assert "0 kept" in format_inspection(dropped)


def test_a_bad_conversation_is_reported_with_its_file_record_and_turn(smol_dir, tmp_path):
    rows = [json.dumps(CHATS[0]), json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                           {"role": "robot", "content": "Beep"}]}),
            "{not json", json.dumps(CHATS[1])]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = inspect_data(path, smol_dir)
    assert report.records == 4 and report.good_records == 2 and report.kept == 2
    assert report.bad_records[0].startswith(f"{path} line 2, turn 1: unknown role 'robot'")
    assert report.bad_records[1].startswith(f"{path} line 3: not valid JSON")
    listed = path.with_suffix(".json")
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                {"conversations": [{"from": "human", "value": "Hi"}, {"value": "x"}]}]
    listed.write_text(json.dumps(sharegpt), encoding="utf-8")
    other = inspect_data(listed, smol_dir)
    assert other.data_format == "sharegpt" and other.kept == 1
    assert other.bad_records == [f"{listed}, record index 1, turn 1: has no 'from'; roles are human, gpt, system, "
                                 "function_call, observation (or user, assistant, tool)"]
    text = format_inspection(report)
    assert "4 read, 2 good, 2 bad" in text and f"bad: {path} line 2, turn 1" in text


def test_the_format_and_column_map_are_checked_as_in_training(smol_dir, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(CHATS[0]) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="data_format='chat'"):
        inspect_data(path, smol_dir, data_format="chat")
    with pytest.raises(ConfigError, match="column_map maps Alpaca columns"):
        inspect_data(path, smol_dir, column_map={"q": "instruction"})
    with pytest.raises(DataError, match="format='alpaca' does not fit the columns"):  # load_data's, as finetune's
        inspect_data(path, smol_dir, data_format="alpaca")
    alpaca = tmp_path / "records.json"
    alpaca.write_text(json.dumps([{"instruction": "Say red.", "output": "red"}]), encoding="utf-8")
    assert inspect_data(alpaca, smol_dir).data_format == "alpaca"
    with pytest.raises(DataError, match="format='sharegpt' does not fit the columns"):
        inspect_data(alpaca, smol_dir, data_format="sharegpt")
