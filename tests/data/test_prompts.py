"""Prompt templates: rendering, response splitting, loading by name/dict/path, validation."""

from __future__ import annotations

import json

import pytest

from alpaca_lora.data.prompts import PromptTemplate, get_template, list_templates
from alpaca_lora.errors import ConfigError

BUILT_INS = list_templates()
CUSTOM = {
    "description": "tiny",
    "prompt_input": "Q: {instruction}\nC: {input}\nA:",
    "prompt_no_input": "Q: {instruction}\nA:",
    "response_split": "A:",
}


def test_built_in_templates_are_listed_sorted():
    assert BUILT_INS == sorted(BUILT_INS)
    assert {"alpaca", "alpaca_legacy", "alpaca_short", "vigogne"} <= set(BUILT_INS)


@pytest.mark.parametrize("name", BUILT_INS)
def test_render_with_input(name):
    t = get_template(name)
    text = t.render("Add the numbers.", "2 and 3")
    assert t.name == name
    assert "Add the numbers." in text and "2 and 3" in text
    assert text.index("Add the numbers.") < text.index("2 and 3") < text.rindex(t.response_split)
    assert text.rstrip().endswith(t.response_split)  # the prompt ends with the response header
    assert "{" not in text  # every placeholder substituted


@pytest.mark.parametrize("name", BUILT_INS)
def test_render_without_input(name):
    t = get_template(name)
    text = t.render("Name a colour.")
    assert text == t.prompt_no_input.replace("{instruction}", "Name a colour.")
    assert t.render("Name a colour.", "") == text == t.render("Name a colour.", None)
    assert text.rstrip().endswith(t.response_split)


@pytest.mark.parametrize("name", BUILT_INS)
def test_render_with_output_and_split_response_round_trip(name):
    t = get_template(name)
    full = t.render("Name a colour.", "a hint", output="Blue, of course.")
    assert full == t.render("Name a colour.", "a hint") + "Blue, of course."
    assert t.split_response(full) == "Blue, of course."
    assert t.split_response(t.render("Name a colour.") + "  Red \n") == "Red"


def test_split_response_without_header_returns_stripped_text():
    t = get_template("alpaca")
    assert t.split_response("  just an answer\n") == "just an answer"
    # Only the first header splits: a response may itself mention the header.
    assert t.split_response("x ### Response: a ### Response: b") == "a ### Response: b"


def test_literal_placeholders_in_user_text_are_not_substituted():
    t = get_template("alpaca")
    text = t.render("Explain {input} and {instruction} in Python.", "CTX {instruction}")
    assert "Explain {input} and {instruction} in Python." in text
    assert "CTX {instruction}" in text
    assert text.count("CTX") == 1
    no_input = t.render("Use {input} literally.")
    assert "Use {input} literally." in no_input


def test_get_template_by_name_dict_path_and_instance(tmp_path, monkeypatch):
    by_name = get_template("alpaca")
    assert get_template(by_name) is by_name
    by_dict = get_template(by_name.to_dict())
    assert by_dict == by_name
    path = by_name.save(tmp_path / "mine.json")
    by_path = get_template(path)
    assert by_path.render("x", "y") == by_name.render("x", "y")
    assert get_template(str(path)).prompt_input == by_name.prompt_input
    custom = get_template(CUSTOM)
    assert custom.render("hi") == "Q: hi\nA:"
    assert custom.render("hi", "ctx") == "Q: hi\nC: ctx\nA:"
    assert custom.name == "custom"
    # Built-ins load from the package, whatever the working directory (alpaca-lora#531).
    monkeypatch.chdir(tmp_path)
    assert get_template("alpaca_short").name == "alpaca_short"


def test_saved_template_file_name_becomes_its_name(tmp_path):
    path = tmp_path / "support_bot.json"
    path.write_text(json.dumps(CUSTOM), encoding="utf-8")
    assert get_template(path).name == "support_bot"


def test_unknown_name_lists_close_matches():
    with pytest.raises(ConfigError) as info:
        get_template("alpacca")
    message = str(info.value)
    assert "alpacca" in message and "'alpaca'" in message and "Did you mean" in message
    assert "vigogne" in message  # the full list of built-ins is shown too
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"prompt_no_input": "Q:\nA:"}, "{instruction}"),
        ({"prompt_input": "Q: {instruction}\nA:"}, "{input}"),
        ({"response_split": "### Answer:"}, "does not occur"),
        ({"response_split": "  "}, "empty"),
    ],
)
def test_custom_template_with_missing_placeholder_or_header_is_rejected(change, needle):
    with pytest.raises(ConfigError, match="invalid") as info:
        get_template({**CUSTOM, **change})
    assert needle in str(info.value)


def test_template_dict_with_missing_or_unknown_fields_is_rejected():
    with pytest.raises(ConfigError, match="missing fields"):
        get_template({"prompt_input": "{instruction}{input}"})
    with pytest.raises(ConfigError, match="unknown fields"):
        get_template({**CUSTOM, "system": "be nice"})


def test_template_file_that_is_not_json_is_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.json"):
        get_template(bad)


def test_prompt_template_constructor_validates():
    with pytest.raises(ConfigError, match="lacks the placeholder"):
        PromptTemplate(description="", prompt_input="{input}", prompt_no_input="x", response_split="x")


# ---- hardening (issue #19) ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [5, 2.5, ["alpaca"], None, b"alpaca", object()])
def test_a_template_of_the_wrong_type_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="must be a built-in name"):
        get_template(bad)


def test_template_files_that_cannot_be_templates(tmp_path):
    cases = {"deep.json": b"[" * 100_000, "latin.json": '{"prompt_input": "é"}'.encode("latin-1"),
             "huge.json": b" " * (2**20 + 1) + b"{}", "list.json": b"[1, 2]"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=name) as info:
            get_template(tmp_path / name)
        assert len(str(info.value)) < 2000
    with pytest.raises(ConfigError, match="unknown prompt template") as info:
        get_template("x" * 100_000)  # a name too long for the file system
    assert len(str(info.value)) < 2000


def test_template_messages_quote_bounded_values():
    huge = "h" * 100_000
    with pytest.raises(ConfigError) as info:
        get_template({**CUSTOM, "response_split": huge})
    assert len(str(info.value)) < 2000
    with pytest.raises(ConfigError) as info:
        get_template({**CUSTOM, **{f"extra{i}": 1 for i in range(10_000)}})
    assert len(str(info.value)) < 2000
    with pytest.raises(ConfigError, match="'name' must be a string"):
        get_template({**CUSTOM, "name": ["x"] * 10_000})
