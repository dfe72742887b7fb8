"""Conversation data: OpenAI messages and ShareGPT read to one normalized form, validation, format detection."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import datasets
import pytest

from alpaca_lora.data.conversations import (
    conversation_features,
    load_conversations,
    read_conversations,
)
from alpaca_lora.data.records import check_records, load_instructions, read_items, read_records
from alpaca_lora.data.sources import FORMATS, detect_format, is_conversation_dataset, load_data
from alpaca_lora.errors import ConfigError, DataError

# The same three conversations in both forms; tool calls written as compact JSON so both normalize alike.
CALL = '{"name":"get_weather","arguments":{"city":"Paris"}}'
TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
MESSAGES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function",
                       "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"},
                  {"role": "assistant", "content": "21 degrees."}],
     "tools": json.dumps(TOOLS)},
    {"messages": [{"role": "user", "content": "é ü 中文 🙂\nline two"}, {"role": "assistant", "content": "ok"}]},
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"},
                       {"from": "gpt", "value": "4"}]},
    {"conversations": [{"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": CALL},
                       {"from": "observation", "value": '{"temp": 21}'},
                       {"from": "gpt", "value": "21 degrees."}],
     "tools": json.dumps(TOOLS)},
    {"conversations": [{"from": "user", "value": "é ü 中文 🙂\nline two"}, {"from": "assistant", "value": "ok"}]},
]


def turn(role: str, content: str, train: bool = True, tool_call: bool = False) -> dict:
    return {"role": role, "content": content, "train": train, "tool_call": tool_call}


EXPECTED = [
    {"messages": [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello!"),
                  turn("user", "2+2?"), turn("assistant", "4")], "tools": ""},
    {"messages": [turn("user", "Weather in Paris?"), turn("assistant", CALL, tool_call=True),
                  turn("tool", '{"temp": 21}'), turn("assistant", "21 degrees.")], "tools": json.dumps(TOOLS)},
    {"messages": [turn("user", "é ü 中文 🙂\nline two"), turn("assistant", "ok")], "tools": ""},
]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, data) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in data) + "\n", encoding="utf-8")
    return path


def one(messages: list, fmt: str = "messages", **record) -> list[dict]:
    """A normalized single conversation read from an in-memory record."""
    key = "messages" if fmt == "messages" else "conversations"
    records, _ = read_conversations("test", [("test, record index 0", {key: messages, **record}, None)], format=fmt)
    return records


# ---- both forms, one result --------------------------------------------------------------------


def test_both_forms_read_to_the_identical_normalized_result():
    assert load_conversations(MESSAGES).to_list() == EXPECTED
    assert load_conversations(SHAREGPT).to_list() == EXPECTED


def test_the_dataset_has_exactly_the_declared_features():
    ds = load_conversations(MESSAGES)
    assert ds.column_names == ["messages", "tools"] and ds.features == conversation_features()
    assert str(ds.data.schema.field("messages").type) == (
        "list<item: struct<role: string, content: string, train: bool, tool_call: bool>>")


@pytest.mark.parametrize("form", ["messages", "sharegpt"])
@pytest.mark.parametrize("kind", [".json", ".jsonl", "list", "Dataset", "DatasetDict"])
def test_format_is_detected_from_every_kind_of_source(tmp_path, form, kind):
    data = MESSAGES if form == "messages" else SHAREGPT
    table = [{**r, "tools": r.get("tools")} for r in data]  # Arrow: every row has every column (null when absent)
    source = {".json": lambda: write_json(tmp_path / "d.json", data),
              ".jsonl": lambda: write_jsonl(tmp_path / "d.jsonl", data),
              "list": lambda: data,
              "Dataset": lambda: datasets.Dataset.from_list(table),
              "DatasetDict": lambda: datasets.DatasetDict({"train": datasets.Dataset.from_list(table)})}[kind]()
    ds, found = load_data(source)
    assert found == form and ds.to_list() == EXPECTED
    assert is_conversation_dataset(ds)


def test_alpaca_data_goes_through_load_data_exactly_as_load_instructions(tmp_path):
    raw = [{"instruction": "Add 2 and 3.", "output": "5"}, {"instruction": "x", "output": ""}]
    with pytest.warns(UserWarning, match=r"skipped 1 bad record\(s\) of 2: .*record index 1") as caught:
        ds, found = load_data(write_json(tmp_path / "a.json", raw), skip_bad_records=True)
    assert caught[0].filename == __file__  # attributed to the caller, as load_instructions' warning is
    assert found == "alpaca" and not is_conversation_dataset(ds)
    with pytest.warns(UserWarning):
        assert ds.to_list() == load_instructions(raw, skip_bad_records=True).to_list()
    assert detect_format(["instruction", "output"]) == "alpaca" and not is_conversation_dataset([{"messages": 1}])


def test_read_records_is_read_items_then_check_records(tmp_path):
    path = write_json(tmp_path / "a.json", [{"instruction": "i", "output": "o"}, {"instruction": "i"}])
    name, items, columns = read_items(path)
    assert name == str(path) and columns == ["instruction", "output"] and items[1][0] == f"{path}, record index 1"
    assert check_records(name, items, columns, skip_bad_records=True) == read_records(path, skip_bad_records=True)


def test_normalized_data_reads_back_unchanged():
    ds = load_conversations(SHAREGPT)
    again, found = load_data(ds)
    assert found == "messages" and again.to_list() == ds.to_list()  # tool_call flags survive the round trip


def test_a_conversations_column_in_the_messages_form_reads_with_format_messages():
    renamed = [{"conversations": r["messages"], **({"tools": r["tools"]} if "tools" in r else {})} for r in MESSAGES]
    with pytest.raises(DataError, match="turn 0: has 'role'/'content' keys .* pass format='messages'"):
        load_data(renamed)
    ds, found = load_data(renamed, format="messages")
    assert found == "messages" and ds.to_list() == EXPECTED


# ---- turn details ------------------------------------------------------------------------------


def test_an_empty_system_prompt_is_valid():
    got = one([{"role": "system", "content": ""}, {"role": "user", "content": "q"},
               {"role": "assistant", "content": "a"}])
    assert got[0]["messages"][0] == turn("system", "")


def test_train_false_and_loss_weight_zero_exclude_a_turn_from_training():
    got = one([{"from": "human", "value": "q"}, {"from": "gpt", "value": "bad answer", "train": False},
               {"from": "human", "value": "again"}, {"from": "gpt", "value": "meh", "loss_weight": 0},
               {"from": "human", "value": "last"}, {"from": "gpt", "value": "good", "loss_weight": 1.0}], "sharegpt")
    assert [m["train"] for m in got[0]["messages"]] == [True, False, True, False, True, True]


def test_tool_calls_become_compact_json_text():
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": [1, 2], "b": "é"}'}}
    second = {"type": "function", "function": {"name": "g", "arguments": {"x": None}}}  # already parsed
    not_json = {"type": "function", "function": {"name": "h", "arguments": "not json"}}
    for calls, content, expected in [
        ([call], None, '{"name":"f","arguments":{"a":[1,2],"b":"é"}}'),
        ([call, second], "", '[{"name":"f","arguments":{"a":[1,2],"b":"é"}},{"name":"g","arguments":{"x":null}}]'),
        ([not_json], "  ", '{"name":"h","arguments":"not json"}'),
    ]:
        got = one([{"role": "user", "content": "q"},
                   {"role": "assistant", "content": content, "tool_calls": calls}])[0]["messages"][1]
        assert got == turn("assistant", expected, tool_call=True)
    plain = one([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": None}])
    assert plain[0]["messages"][1] == turn("assistant", "a")  # a null tool_calls (Arrow fills it in) is no call


def test_tools_as_a_list_are_stored_as_compact_json_and_an_empty_list_as_none():
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert one(chat, tools=TOOLS)[0]["tools"] == json.dumps(TOOLS, separators=(",", ":"))
    assert one(chat, tools=[])[0]["tools"] == "" and one(chat, tools=None)[0]["tools"] == ""
    assert one(chat, tools=' [ {"name": "f"} ] ')[0]["tools"] == ' [ {"name": "f"} ] '  # JSON text kept verbatim


# ---- validation: every problem names the file, the record and the turn --------------------------

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
BAD = [  # (the bad record, its turn or None for the record as a whole, what the message says)
    ({"tools": ""}, None, "has no 'messages' list"),
    ({"messages": None}, None, "has a null 'messages' list"),
    ({"messages": "hi"}, None, "'messages' is a string, not a list of turns"),
    ({"messages": []}, None, "'messages' is an empty list"),
    ({"messages": [U, "hello"]}, 1, "is a string, not an object with 'role' and 'content'"),
    ({"messages": [U, {"role": "bot", "content": "a"}]}, 1,
     "unknown role 'bot'; roles are system, user, assistant, tool"),
    ({"messages": [U, {"content": "a"}]}, 1, "has no 'role'"),
    ({"messages": [{"from": "human", "value": "q"}, A]}, 0, "pass format='sharegpt'"),
    ({"messages": [U, {"role": "assistant", "content": 5}]}, 1, "'content' is a number, not a string"),
    ({"messages": [U, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}, 1,
     "join the text parts into one string"),
    ({"messages": [U, {"role": "assistant"}]}, 1, "has no 'content'"),
    ({"messages": [{"role": "user", "content": None}, A]}, 0,
     "'content' is null (only an assistant message with tool_calls may have null content)"),
    ({"messages": [{"role": "user", "content": ""}, A]}, 0, "the user turn's 'content' is empty"),
    ({"messages": [U, {"role": "assistant", "content": " \n\t"}]}, 1, "the assistant turn's 'content' is empty"),
    ({"messages": [{"role": "system", "content": "s"}, U]}, None, "has no assistant turn"),
    ({"messages": [U, {"role": "assistant", "content": "a\ud800"}]}, 1, "holds a lone surrogate"),
    ({"messages": [U, {"role": "assistant", "content": "a", "train": "no"}]}, 1,
     "'train' is 'no'; it must be true or false"),
    ({"messages": [U, {"role": "assistant", "content": "a", "loss_weight": 0.5}]}, 1,
     "'loss_weight' is 0.5: only 0 (no loss) or 1 is supported"),
    ({"messages": [U, {"role": "assistant", "content": "I will call it", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 1, "has both text content"),
    ({"messages": [U, {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}]}, 1,
     "tool_calls[0] is {'type': 'function'}, with no function name"),
    ({**GOOD, "tools": "[{not json"}, None, "'tools' is not valid JSON"),
    ({**GOOD, "tools": 7}, None, "'tools' is a number"),
    ({**GOOD, "tools": '"just a string"'}, None, "'tools' holds a JSON string, not a list of tool schemas"),
]
SHAREGPT_BAD = [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, 1,
     "unknown role 'bot'; roles are human, gpt, system, function_call, observation (or user, assistant, tool)"),
    ({"conversations": [{"role": "user", "content": "q"}]}, 0, "pass format='messages'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": ""}]}, 1,
     "the assistant turn's 'value' is empty"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]}, 1, "'value' is null"),
]


@pytest.mark.parametrize(("bad", "at", "says"), BAD + SHAREGPT_BAD, ids=[s for _, _, s in BAD + SHAREGPT_BAD])
def test_a_bad_record_names_the_file_the_record_and_the_turn(tmp_path, bad, at, says):
    good = GOOD if "messages" in bad or "conversations" not in bad else \
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, bad]), encoding="utf-8")  # json.dumps keeps a lone surrogate escaped
    where = f"{path}, record index 1" + (f", turn {at}: " if at is not None else ": ")
    with pytest.raises(DataError) as info:
        load_data(path)
    assert where in str(info.value) and says in str(info.value) and "skip_bad_records=True" in str(info.value)
    with pytest.warns(UserWarning, match=r"skipped 1 bad record\(s\) of 2"):
        ds, _ = load_data(path, skip_bad_records=True)
    assert len(ds) == 1 and ds[0]["messages"][1]["content"] == "a"


def test_undecodable_bytes_name_the_line_and_turn(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD).encode()
    bad = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\xff"}]}'
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(DataError, match=rf"{path} line 2, turn 1: 'content' holds bytes that are not valid UTF-8"):
        load_conversations(path)


def test_skipping_keeps_the_good_records_and_reports_each_bad_one(tmp_path):
    data = [MESSAGES[0], *[bad for bad, _, _ in BAD], MESSAGES[2]]
    path = write_jsonl(tmp_path / "mixed.jsonl", data)
    name, items, _ = read_items(path)
    records, skipped = read_conversations(name, items, format="messages", skip_bad_records=True)
    assert records == [EXPECTED[0], EXPECTED[2]] and len(skipped) == len(BAD)
    for k, (reason, (_, at, says)) in enumerate(zip(skipped, BAD, strict=True)):
        assert reason.startswith(f"{path} line {k + 2}" + (f", turn {at}: " if at is not None else ": "))
        assert says in reason
    with pytest.warns(UserWarning, match=rf"skipped {len(BAD)} bad record\(s\) of {len(data)}: .*\(and ") as caught:
        assert len(load_conversations(path, skip_bad_records=True)) == 2
    assert caught[0].filename == __file__


def test_all_records_bad_is_an_error_even_when_skipping():
    with pytest.raises(DataError, match=r"list of records: no usable conversations, all 2 are bad"):
        load_conversations([{"messages": []}, {"messages": [U]}], skip_bad_records=True)
    with pytest.raises(DataError, match="holds no records"):
        load_conversations([], format="messages")


def test_a_gigantic_bad_value_gives_a_bounded_message():
    huge = "x" * 5_000_000
    for record in [{"messages": [U, {"role": huge, "content": "a"}]},
                   {"messages": [U, {"role": "assistant", "content": list(range(1_000_000))}]},
                   {"messages": [U, {"role": "assistant", "content": "a", "train": huge}]},
                   {"messages": [U, {"role": "assistant", "content": huge, "tool_calls": [{"name": "f"}]}]},
                   {**GOOD, "tools": "[" + huge}]:
        with pytest.raises(DataError) as info:
            load_conversations([record])
        assert len(str(info.value)) < 2_000, str(info.value)[:300]


# ---- format override and its errors ------------------------------------------------------------


def test_an_explicit_format_that_does_not_fit_names_the_columns_and_the_format_that_would():
    alpaca = [{"instruction": "i", "output": "o"}]
    with pytest.raises(DataError, match=r"format='sharegpt' does not fit the columns \['instruction', 'output'\]"
                                        r".*fit format='alpaca'"):
        load_data(alpaca, format="sharegpt")
    with pytest.raises(DataError, match=r"format='alpaca' does not fit the columns \['messages', 'tools'\].*"
                                        r"fit format='messages'"):
        load_data(MESSAGES, format="alpaca")
    both = [{**GOOD, "instruction": "i", "output": "o"}]  # holds both: each explicit format reads its own part
    assert load_data(both)[1] == "messages" and load_data(both, format="alpaca")[0].to_list() == [
        {"instruction": "i", "input": "", "output": "o"}]
    assert load_data(SHAREGPT, format="sharegpt")[0].to_list() == EXPECTED


def test_an_unknown_format_or_column_map_with_conversations_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown data format; use one of " + ", ".join(FORMATS)):
        load_data(MESSAGES, format="chatml")
    with pytest.raises(ConfigError, match="must be 'auto', 'messages' or 'sharegpt'"):
        load_conversations(MESSAGES, format="alpaca")
    with pytest.raises(ConfigError, match="column_map maps Alpaca columns"):
        load_data(MESSAGES, format="messages", column_map={"q": "instruction"})
    with pytest.raises(ConfigError, match="holds conversations .* pass format='alpaca'"):
        load_data(MESSAGES, column_map={"q": "instruction"})
    with pytest.raises(DataError, match="no 'messages' or 'conversations' column"):
        load_conversations([{"instruction": "i", "output": "o"}])


# ---- real data ---------------------------------------------------------------------------------


def test_real_glaive_tool_call_data_reads_as_sharegpt(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped
        ds, found = load_data(shared_data / "glaive_toolcall_sharegpt.json")
    assert found == "sharegpt" and len(ds) == 300
    counts = Counter((m["role"], m["tool_call"]) for r in ds["messages"] for m in r)
    # 746 plain assistant replies (gpt) plus 211 tool calls (function_call), each answered by a tool turn
    assert counts == {("user", False): 746, ("assistant", False): 746, ("assistant", True): 211, ("tool", False): 211}
    # 109 records hold "tools": "[]" (no tools offered), normalized to ""; every tool call has its schemas
    assert sum(r["tools"] == "" for r in ds) == 109
    for record in ds:
        calls = [json.loads(m["content"]) for m in record["messages"] if m["tool_call"]]
        assert all(set(call) == {"name", "arguments"} for call in calls)
        if record["tools"]:
            schemas = json.loads(record["tools"])
            assert isinstance(schemas, list) and schemas and all(s["name"] for s in schemas)
        assert not calls or record["tools"], record
