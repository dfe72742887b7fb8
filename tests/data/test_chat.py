"""tokenize_conversation: the ids are the rendered chat, the labels exactly the assistant turns and their end."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from alpaca_lora import ConfigError, DataError, tokenize_conversation
from alpaca_lora.data import chat_templates
from alpaca_lora.data.chat import encode_conversation, normalize_messages, truncate
from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.prompts import get_template

CONV = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]

# Renders the last message differently (a marker), so a rendered prefix is not a prefix of the whole text.
LAST_MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% if loop.last %}{{ '[end]' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3.1's boilerplate: a system header with a date line the model must not be trained to write.
DATED_LLAMA3 = (
    "{{ bos_token }}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
    "Today Date: 26 Jul 2024\\n\\n<|eot_id|>' }}{% for message in messages %}{{ '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_tokenizer(smol_dir):
    """SmolLM2's BPE with Llama 3's special tokens, pad == eos == <|eot_id|>."""
    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                         "<|begin_of_text|>"]})
    tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"
    return tok


def _runs(ids, labels):
    """Maximal runs of labelled positions, as (start, end)."""
    runs, start = [], None
    for k, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = k
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, k))
            start = None
    return runs


def _check(messages, tokenizer, chat_template, strip=False, tools=None):
    """Assert the contract on one conversation; return the features."""
    source = chat_templates.resolve_chat_template(tokenizer, chat_template)
    f = tokenize_conversation(messages, tokenizer, chat_template=chat_template, cutoff_len=100_000, tools=tools)
    norm = normalize_messages(messages)
    msgs, schemas = chat_templates.template_messages(norm, tools or "", source)
    text = tokenizer.apply_chat_template(msgs, tools=schemas, chat_template=source, tokenize=False)
    assert tokenizer.decode(f["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
    assert f["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(f["input_ids"]) == len(f["labels"]) == len(f["attention_mask"])
    shift = len(msgs) - len(norm)  # a system message added for tool schemas
    trained = [msgs[i + shift] for i, m in enumerate(norm) if m["role"] == "assistant" and m["train"]]
    runs = _runs(f["input_ids"], f["labels"])
    assert len(runs) == len(trained)
    special = set(tokenizer.all_special_ids)
    for (s, e), m in zip(runs, trained, strict=True):
        assert f["labels"][s:e] == f["input_ids"][s:e]
        assert f["input_ids"][e - 1] in special  # the end-of-turn token is trained, last
        content = tokenizer.decode(f["input_ids"][s:e - 1], clean_up_tokenization_spaces=False)
        assert content == (m["content"].strip() if strip else m["content"])
    return f


@pytest.mark.parametrize("template", [None, "chatml", "alpaca", "vigogne", LAST_MARKED])
def test_smollm_templates_label_exactly_the_assistant_turns(smol_tokenizer, template):
    assert smol_tokenizer.pad_token_id == smol_tokenizer.eos_token_id  # pad == eos == <|im_end|>
    f = _check(CONV, smol_tokenizer, template)
    eot = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for i, lab in zip(f["input_ids"], f["labels"], strict=True) if i == eot and lab == eot) == 2


@pytest.mark.parametrize("template", ["llama3", DATED_LLAMA3])
def test_llama3_style_templates_with_pad_equal_eos(llama3_tokenizer, template):
    f = _check([{"role": "system", "content": "Be brief."}, *CONV], llama3_tokenizer, template, strip=True)
    text = llama3_tokenizer.decode([i for i, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != -100])
    assert "Date" not in text and "Be brief" not in text and "assistant" not in text
    assert text == "Paris.<|eot_id|>Rome, of course.<|eot_id|>"


def test_default_system_prompt_and_headers_are_masked(smol_tokenizer):
    f = tokenize_conversation(CONV[:2], smol_tokenizer)
    masked = smol_tokenizer.decode([i for i, lab in zip(f["input_ids"], f["labels"], strict=True) if lab == -100])
    assert "You are a helpful AI assistant named SmolLM" in masked  # the template's own system prompt
    assert "<|im_start|>assistant\n" in masked and "France" in masked


def test_a_one_turn_alpaca_chat_renders_as_the_alpaca_record(smol_tokenizer):
    source = chat_templates.resolve_chat_template(smol_tokenizer, "alpaca")
    t = get_template("alpaca")
    for system, expected in (("", t.render("Add 2 and 3.")), ("2, 3", t.render("Add 2 and 3.", "2, 3"))):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
        text = smol_tokenizer.apply_chat_template(msgs, chat_template=source, tokenize=False)
        assert text == expected + "5" + smol_tokenizer.eos_token


def test_untrained_turns_and_train_on_inputs(smol_tokenizer):
    conv = [dict(CONV[0]), {**CONV[1], "train": False}, *CONV[2:]]
    f = _check(conv, smol_tokenizer, None)
    assert "Paris" not in smol_tokenizer.decode([i for i, lab in zip(f["input_ids"], f["labels"], strict=True)
                                                if lab != -100])
    g = tokenize_conversation(CONV, smol_tokenizer, train_on_inputs=True)
    assert g["labels"] == g["input_ids"]


def _full(tok, conv=CONV):
    return tokenize_conversation(conv, tok, cutoff_len=100_000)


def test_truncation_drops_whole_turns_and_keeps_the_end_of_turn_last(smol_tokenizer):
    full = _full(smol_tokenizer)
    eot = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    (first_start, first_end), (_, second_end) = _runs(full["input_ids"], full["labels"])
    assert second_end == len(full["input_ids"]) - 1  # ChatML's newline after the last <|im_end|>
    for cutoff in range(first_end, second_end):  # the second turn does not fit: dropped whole
        f = tokenize_conversation(CONV, smol_tokenizer, cutoff_len=cutoff)
        assert f["input_ids"] == full["input_ids"][:first_end] and f["labels"][-1] == eot
    assert tokenize_conversation(CONV, smol_tokenizer, cutoff_len=second_end)["input_ids"] == \
        full["input_ids"][:second_end]
    for cutoff in range(first_start + 2, first_end):  # the first turn is cut: content shortened, <|im_end|> last
        f = tokenize_conversation(CONV, smol_tokenizer, cutoff_len=cutoff)
        assert len(f["input_ids"]) == cutoff and f["input_ids"][-1] == eot == f["labels"][-1]
        assert f["input_ids"][:-1] == full["input_ids"][:cutoff - 1]
        assert f["labels"][first_start:] == f["input_ids"][first_start:]
    f = tokenize_conversation(CONV, smol_tokenizer, cutoff_len=first_start + 1)  # no room for one content token
    assert all(lab == -100 for lab in f["labels"]) and len(f["input_ids"]) == first_start + 1


def test_truncation_status_and_turn_counts(smol_tokenizer):
    source = chat_templates.resolve_chat_template(smol_tokenizer, None)
    enc = encode_conversation(normalize_messages(CONV), "", smol_tokenizer, source)
    assert truncate(enc, 100_000, False)[1:] == ("ok", 0)
    assert truncate(enc, enc.turns[0].end, False)[1:] == ("truncated", 1)
    assert truncate(enc, 3, False)[1][0:6] == "prompt"


def test_a_template_without_a_special_end_of_turn_is_refused(smol_tokenizer):
    with pytest.raises(ConfigError, match="never learn to stop"):
        tokenize_conversation(CONV, smol_tokenizer, chat_template="llama3")  # <|eot_id|> is plain text here


def test_tool_calls_render_as_text_without_template_support(smol_tokenizer):
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    conv = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": call, "tool_call": True},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."}]
    tools = json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}])
    f = tokenize_conversation(conv, smol_tokenizer, tools=tools)
    text = smol_tokenizer.decode(f["input_ids"])
    assert "<tool_call>\n" + call + "\n</tool_call>" in text and "<tools>" in text and "<|im_start|>tool" in text
    trained = smol_tokenizer.decode([i for i, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != -100])
    assert trained == "<tool_call>\n" + call + "\n</tool_call><|im_end|>It is 21 degrees.<|im_end|>"


def test_tool_calls_are_structured_where_the_template_supports_them(smol_tokenizer):
    tooled = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
              "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m['content'] }}"
              "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    conv = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": '{"name": "w", "arguments": {"c": "P"}}', "tool_call": True}]
    f = tokenize_conversation(conv, smol_tokenizer, chat_template=tooled)
    trained = smol_tokenizer.decode([i for i, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != -100])
    assert trained == 'CALL w {"c": "P"}<|im_end|>'


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty list"), ([{"role": "bot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": 3}], "string 'content'"), ([{"role": "user", "content": "hi"}], "no assistant"),
    ([{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}], "surrogate"),
])
def test_bad_conversations_are_data_errors(smol_tokenizer, bad, match):
    with pytest.raises(DataError, match=match):
        tokenize_conversation(bad, smol_tokenizer)


def test_bad_templates_are_config_errors(smol_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="not valid Jinja"):
        tokenize_conversation(CONV, smol_tokenizer, chat_template="{% for %}")
    with pytest.raises(ConfigError, match="not a built-in name"):
        tokenize_conversation(CONV, smol_tokenizer, chat_template="chatmll")
    (tmp_path / "t.jinja").write_text(chat_templates.CHATML, encoding="utf-8")
    assert tokenize_conversation(CONV, smol_tokenizer, chat_template=tmp_path / "t.jinja") == \
        tokenize_conversation(CONV, smol_tokenizer, chat_template="chatml")
    bare = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        tokenize_conversation(CONV, bare)


def test_a_template_that_refuses_the_order_is_a_data_error(smol_tokenizer):
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{{ m['content'] }}<|im_end|>"
              "{% endfor %}")
    with pytest.raises(DataError, match="roles must alternate"):
        tokenize_conversation([CONV[1], CONV[0], CONV[1]], smol_tokenizer, chat_template=strict)


@pytest.mark.parametrize("template", [None, "alpaca", "llama3", LAST_MARKED],
                         ids=["own", "alpaca", "llama3", "searched"])
def test_every_real_sharegpt_conversation_is_masked_exactly(smol_tokenizer, llama3_tokenizer, shared_data, template):
    """All 300 glaive conversations (tool calls, tool answers, multi-turn): ids decode to the rendered chat and
    the labels are exactly each assistant turn's text and its end-of-turn token."""
    from alpaca_lora.data.conversations import load_conversations

    ds = load_conversations(shared_data / "glaive_toolcall_sharegpt.json")
    tokenizer = llama3_tokenizer if template == "llama3" else smol_tokenizer
    turns = 0
    for row in ds:
        f = _check(row["messages"], tokenizer, template, strip=template == "llama3", tools=row["tools"])
        turns += len(_runs(f["input_ids"], f["labels"]))
    assert len(ds) == 300 and turns == 957


def test_the_report_counts_trained_turns_when_an_untrained_one_is_cut(smol_tokenizer):
    import datasets

    from alpaca_lora.data.pipeline import prepare_conversations

    conv = normalize_messages([CONV[0], CONV[1], {**CONV[2]}, {**CONV[3], "train": False},
                               {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "Welcome."}])
    full = tokenize_conversation(conv, smol_tokenizer, cutoff_len=100_000)
    first_end = _runs(full["input_ids"], full["labels"])[0][1]
    ds = datasets.Dataset.from_dict({"messages": [conv], "tools": [""]})
    report = prepare_conversations(ds, smol_tokenizer, cutoff_len=first_end + 3)[1]
    assert (report.turns, report.dropped_turns, report.truncated) == (1, 1, 1)  # "Welcome." cut; "Rome" untrained
    report = prepare_conversations(ds, smol_tokenizer, cutoff_len=100_000)[1]
    assert (report.turns, report.dropped_turns, report.truncated) == (2, 0, 0)
