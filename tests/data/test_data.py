"""Data: reading every format, validation errors and skips, splitting, tokenization and masking."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpaca_lora.data.pipeline import prepare_dataset
from alpaca_lora.data.prepare import (
    DROP_EMPTY_RESPONSE,
    DROP_PROMPT_FULL,
    PrepareReport,
    data_fingerprint,
    load_instructions,
    read_records,
    split_dataset,
    tokenize_instruction,
)
from alpaca_lora.data.prompts import get_template
from alpaca_lora.errors import ConfigError, DataError

RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to French.", "input": "cat, dog", "output": "chat, chien"},
    {"instruction": "Quote: \"hi\"\nthen a newline", "input": "é ü 中文 🙂",
     "output": "multi\nline, with comma"},
]
# A tiny template keeps the character arithmetic of the masking tests readable.
TINY = {"prompt_input": "I:{instruction}\nC:{input}\nR:", "prompt_no_input": "I:{instruction}\nR:",
        "response_split": "R:"}


class CharTokenizer:
    """Deterministic test tokenizer: one token per character, BOS (1) on add_special_tokens, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, append_eos: bool = False, eos: int | None = 2) -> None:
        self.append_eos = append_eos
        self.eos_token_id = eos

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, list]:
        if isinstance(text, list):  # a batch, as fast tokenizers take one
            rows = [self(t, add_special_tokens)["input_ids"] for t in text]
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        ids = [ord(c) + 10 for c in text]
        if add_special_tokens:
            ids = [self.bos_token_id, *ids] + ([self.eos_token_id] if self.append_eos else [])
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def chars(text: str) -> list[int]:
    return [ord(c) + 10 for c in text]


def prompt_ids(instruction: str, input: str = "") -> list[int]:  # noqa: A002
    return [1, *chars(get_template(TINY).render(instruction, input))]


# ---- formats ---------------------------------------------------------------------------------


def write(path: Path, records: list[dict]) -> Path:
    """Write ``records`` in the format named by the suffix of ``path``."""
    if path.suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".csv":
        import csv

        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_format_reads_the_same_records(tmp_path, suffix):
    records, skipped = read_records(write(tmp_path / f"data{suffix}", RECORDS))
    assert records == RECORDS and skipped == []
    ds = load_instructions(str(tmp_path / f"data{suffix}"))
    assert ds.column_names == ["instruction", "input", "output"]
    assert all(v.dtype == "string" for v in ds.features.values())
    assert ds.to_list() == RECORDS


def test_dataset_datasetdict_and_list_sources():
    ds = datasets.Dataset.from_list(RECORDS)
    assert read_records(ds)[0] == RECORDS
    assert read_records(RECORDS)[0] == RECORDS
    assert read_records(tuple(RECORDS))[0] == RECORDS
    assert read_records(datasets.DatasetDict({"train": ds, "test": ds.select([0])}))[0] == RECORDS
    assert read_records(datasets.DatasetDict({"only": ds}))[0] == RECORDS
    with pytest.raises(DataError, match=r"splits \['a', 'b'\]"):
        read_records(datasets.DatasetDict({"a": ds, "b": ds}))
    with pytest.raises(DataError, match="cannot read data from a int"):
        read_records(42)


def test_input_is_optional_missing_null_or_empty(tmp_path):
    raw = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d"},
           {"instruction": "e", "input": "", "output": "f"}]
    for source in (raw, write(tmp_path / "x.jsonl", raw), write(tmp_path / "x.parquet", raw)):
        records, _ = read_records(source)
        assert [r["input"] for r in records] == ["", "", ""]
    ds = load_instructions([{"instruction": "a", "output": "b"}])
    assert ds.column_names == ["instruction", "input", "output"] and ds[0]["input"] == ""


def test_json_object_holding_one_list_and_jsonl_named_json(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": RECORDS}), encoding="utf-8")
    assert read_records(wrapped)[0] == RECORDS
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    assert read_records(lines)[0] == RECORDS
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"train": RECORDS, "test": RECORDS}), encoding="utf-8")
    with pytest.raises(DataError, match="two.json holds a JSON object"):
        read_records(two)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3", encoding="utf-8")
    with pytest.raises(DataError, match="scalar.json holds a JSON number"):
        read_records(scalar)


def test_csv_details_bom_multiline_and_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    text = 'instruction,input,output\n"two\nlines",,ok\nsecond,,\nthird,x,y\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    with pytest.raises(DataError) as info:
        read_records(path)
    assert f"{path} line 4: field 'output' is empty" in str(info.value)  # the record after a 2-line field
    records, skipped = read_records(path, skip_bad_records=True)
    assert records == [{"instruction": "two\nlines", "input": "", "output": "ok"},
                       {"instruction": "third", "input": "x", "output": "y"}]
    assert skipped == [f"{path} line 4: field 'output' is empty"]
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,output\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(DataError, match="ragged.csv line 3: has 3 field"):
        read_records(ragged)


# ---- column mapping --------------------------------------------------------------------------


def test_auto_mapping_of_common_layouts(caplog):
    caplog.set_level(logging.WARNING, logger="alpaca_lora.data.prepare")
    cases = [  # (record, expected (instruction, input, output), layout named in the notice)
        ({"prompt": "p", "completion": "c"}, ("p", "", "c"), "prompt/completion"),
        ({"instruction": "i", "context": "c", "response": "r", "category": "qa"}, ("i", "c", "r"), "dolly"),
        ({"instruction": "i", "response": "r"}, ("i", "", "r"), "dolly"),
        ({"question": "q", "answer": "a"}, ("q", "", "a"), "question/answer"),
        ({"question": "q", "context": "c", "answer": "a"}, ("q", "c", "a"), "question/answer"),
        ({"prompt": "p", "response": "r"}, ("p", "", "r"), "prompt/response"),
        ({"query": "q", "response": "r"}, ("q", "", "r"), "query/response"),
    ]
    for raw, expected, layout in cases:
        caplog.clear()
        assert [tuple(r.values()) for r in read_records([raw])[0]] == [expected]
        assert layout in caplog.text and "column_map" in caplog.text  # says which mapping was used
    caplog.clear()
    read_records(RECORDS)
    assert caplog.text == ""  # the alpaca layout needs no notice


def test_explicit_column_map(tmp_path):
    raw = [{"q": "What?", "ctx": "here", "a": "That.", "output": "ignored"}]
    mapping = {"q": "instruction", "ctx": "input", "a": "output"}
    expected = [{"instruction": "What?", "input": "here", "output": "That."}]
    assert read_records(raw, column_map=mapping)[0] == expected
    # An unmapped field falls back to the column of its own name.
    raw2 = [{"q": "What?", "output": "That."}]
    assert read_records(raw2, column_map={"q": "instruction"})[0][0]["output"] == "That."
    path = write(tmp_path / "m.csv", raw)
    assert read_records(path, column_map=mapping)[0][0]["input"] == "here"
    with pytest.raises(DataError, match="column 'nope'"):
        read_records(raw, column_map={"nope": "instruction", "a": "output"})
    with pytest.raises(ConfigError, match="must map your column names"):
        read_records(raw, column_map={"instruction": "q"})
    with pytest.raises(ConfigError, match="one field"):
        read_records(raw, column_map={"q": "instruction", "a": "instruction"})
    with pytest.raises(DataError, match="no column for 'output'"):
        read_records([{"q": "x", "y": "z"}], column_map={"q": "instruction"})


def test_unknown_layout_is_an_error_listing_columns_and_the_fix():
    with pytest.raises(DataError) as info:
        read_records([{"text": "hello", "label": 1}])
    message = str(info.value)
    assert "['label', 'text']" in message and "column_map" in message and "prompt/completion" in message


# ---- bad records -----------------------------------------------------------------------------

BAD = [
    ({"instruction": "x"}, "field 'output' is missing"),
    ({"output": "x"}, "field 'instruction' is missing"),
    ({"instruction": "x", "output": None}, "field 'output' is null"),
    ({"instruction": "x", "output": 5}, "field 'output' is a number, not a string"),
    ({"instruction": ["x"], "output": "y"}, "field 'instruction' is a JSON list, not a string"),
    ({"instruction": "x", "input": 3, "output": "y"}, "field 'input' is a number"),
    ({"instruction": "x", "output": ""}, "field 'output' is empty"),
    ({"instruction": " \n\t", "output": "y"}, "field 'instruction' is empty"),
    (["a", "b"], "is a JSON list, not an object"),
    ("just text", "is a string, not an object"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD)
@pytest.mark.parametrize("fmt", ["json", "jsonl", "list"])
def test_bad_record_raises_naming_file_and_position_or_is_skipped(tmp_path, fmt, bad, problem):
    raw = [RECORDS[0], RECORDS[1], bad, RECORDS[2]]
    if fmt == "list":
        source, where = raw, "list of records, index 2"
    else:
        source = tmp_path / f"data.{fmt}"
        if fmt == "json":
            source.write_text(json.dumps(raw), encoding="utf-8")
            where = f"{source}, record index 2"
        else:
            source.write_text("".join(json.dumps(r) + "\n" for r in raw), encoding="utf-8")
            where = f"{source} line 3"
    with pytest.raises(DataError) as info:
        read_records(source)
    message = str(info.value)
    assert message.startswith(f"{where}: {problem}")
    assert "skip_bad_records=True" in message  # the fix
    records, skipped = read_records(source, skip_bad_records=True)
    assert records == [RECORDS[0], RECORDS[1], RECORDS[2]]
    assert len(skipped) == 1 and skipped[0].startswith(f"{where}: {problem}")


def test_bad_records_in_csv_parquet_and_dataset_name_their_position(tmp_path):
    raw = [RECORDS[0], {"instruction": "x", "input": "", "output": ""}]
    csv_path = write(tmp_path / "d.csv", raw)
    with pytest.raises(DataError, match=r"d\.csv line 3: field 'output' is empty"):
        read_records(csv_path)
    pq_path = write(tmp_path / "d.parquet", raw)
    with pytest.raises(DataError, match=r"d\.parquet, record index 1: field 'output' is empty"):
        read_records(pq_path)
    with pytest.raises(DataError, match="Dataset, record index 1: field 'output' is empty"):
        read_records(datasets.Dataset.from_list(raw))
    typed = datasets.Dataset.from_dict({"instruction": ["a"], "output": [7]})
    with pytest.raises(DataError, match="Dataset, record index 0: field 'output' is a number"):
        read_records(typed)


def test_malformed_jsonl_line_names_its_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(RECORDS[0]), "", '{"instruction": "x", "output": ', json.dumps(RECORDS[1])]
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path} line 3: not valid JSON")
    records, skipped = read_records(path, skip_bad_records=True)
    assert records == RECORDS[:2] and len(skipped) == 1 and skipped[0].startswith(f"{path} line 3:")


def test_malformed_json_file_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]',
                    encoding="utf-8")
    for skip in (False, True):
        with pytest.raises(DataError) as info:
            read_records(path, skip_bad_records=skip)
        assert f"{path} line 3 column" in str(info.value) and "not valid JSON" in str(info.value)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    with pytest.raises(DataError, match="deep.json"):  # a RecursionError inside json, wrapped
        read_records(deep)


def test_non_utf8_bytes(tmp_path):
    good = json.dumps(RECORDS[0]).encode()
    jsonl = tmp_path / "bytes.jsonl"
    jsonl.write_bytes(good + b'\n{"instruction": "caf\xe9", "output": "x"}\n' + good + b"\n")
    with pytest.raises(DataError) as info:
        read_records(jsonl)
    assert str(info.value).startswith(f"{jsonl} line 2: field 'instruction' holds bytes that are not valid")
    records, skipped = read_records(jsonl, skip_bad_records=True)
    assert records == [RECORDS[0], RECORDS[0]] and "line 2" in skipped[0]
    # Bytes outside any string break the JSON itself: a file-level error that says why.
    broken = tmp_path / "broken.json"
    broken.write_bytes(b'[{"instruction": "a",\n \xff "output": "b"}]')
    with pytest.raises(DataError, match=r"not valid UTF-8 \(byte 0xff on line 2\)"):
        read_records(broken, skip_bad_records=True)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"instruction,output\ncaf\xe9,ok\nfine,ok\n")
    with pytest.raises(DataError, match=r"latin\.csv line 2: field 'instruction' holds bytes"):
        read_records(latin)
    records, _ = read_records(latin, skip_bad_records=True)
    assert records == [{"instruction": "fine", "input": "", "output": "ok"}]
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(json.dumps(RECORDS).encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        read_records(utf16)


@pytest.mark.parametrize("content", [b"", b"  \n\n", b"[]", b"{\"data\": []}"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_empty_files_are_errors(tmp_path, suffix, content):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_records(path, skip_bad_records=True)
    message = str(info.value)
    assert str(path) in message
    if not content.strip():
        assert "is empty" in message
    elif suffix != ".jsonl":
        assert "holds no records" in message
    elif content == b"[]":  # a line that is not an object: a bad record, and then nothing is left
        assert "no usable records" in message and "line 1: is a JSON list" in message
    else:  # one object without instruction/output columns
        assert "no known instruction/output columns among ['data']" in message


def test_file_level_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.json does not exist"):
        read_records(tmp_path / "missing.json")
    with pytest.raises(DataError, match="is a folder"):
        read_records(tmp_path)
    txt = tmp_path / "data.txt"
    txt.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.txt: unknown extension '\.txt'.*\.jsonl"):
        read_records(txt)
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(DataError, match="fake.parquet is not a readable Parquet file"):
        read_records(fake)
    no_header = tmp_path / "noheader.csv"
    no_header.write_text(",\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="header"):
        read_records(no_header)
    with pytest.raises(DataError, match="holds no records"):
        read_records([])


def test_zero_usable_records_after_skipping_is_an_error():
    with pytest.raises(DataError, match="no usable records, all 2 are bad") as info:
        read_records([{"instruction": "a", "output": ""}, {"instruction": "", "output": "b"}],
                     skip_bad_records=True)
    assert "index 0" in str(info.value) and "index 1" in str(info.value)


def test_load_instructions_warns_with_count_and_up_to_five_reasons():
    raw = [RECORDS[0]] + [{"instruction": f"i{k}", "output": ""} for k in range(7)]
    with pytest.warns(UserWarning, match=r"skipped 7 bad record\(s\) of 8") as caught:
        ds = load_instructions(raw, skip_bad_records=True)
    message = str(caught[0].message)
    assert message.count("field 'output' is empty") == 5 and "(and 2 more)" in message
    assert ds.to_list() == [RECORDS[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_instructions(RECORDS)  # nothing skipped, no warning


# ---- split -----------------------------------------------------------------------------------


def _numbered(n: int) -> datasets.Dataset:
    return load_instructions([{"instruction": f"task {i}", "output": str(i)} for i in range(n)])


def test_split_sizes_and_determinism():
    ds = _numbered(20)
    assert split_dataset(ds, 0, seed=1) == (ds, None)
    train, val = split_dataset(ds, 0.2, seed=1)
    assert (len(train), len(val)) == (16, 4)
    names = [list(d["instruction"]) for d in (train, val)]
    assert sorted(names[0] + names[1]) == sorted(ds["instruction"])  # disjoint and complete
    again = split_dataset(ds, 0.2, seed=1)
    assert [list(d["instruction"]) for d in again] == names  # same seed, same split
    assert list(split_dataset(ds, 0.2, seed=2)[1]["instruction"]) != names[1]
    assert len(split_dataset(ds, 0.001, seed=1)[1]) == 1  # a fraction holds out at least one record
    assert len(split_dataset(ds, 3, seed=1)[1]) == 3
    assert len(split_dataset(ds, 3.0, seed=1)[1]) == 3


def test_split_larger_than_data_is_clamped_with_a_warning():
    ds = _numbered(5)
    with pytest.warns(UserWarning, match=r"val_set_size=10 asks for 10 .* data has 5; clamped to 4"):
        train, val = split_dataset(ds, 10, seed=0)
    assert (len(train), len(val)) == (1, 4)
    with pytest.warns(UserWarning, match="clamped to 0"):
        assert split_dataset(_numbered(1), 0.5, seed=0)[1] is None
    with pytest.warns(UserWarning, match="clamped to 4"):
        split_dataset(ds, 5, seed=0)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "0.1", None])
def test_split_rejects_bad_sizes(bad):
    with pytest.raises(ConfigError, match="val_set_size"):
        split_dataset(_numbered(5), bad, seed=0)


# ---- tokenization and masking with a deterministic tokenizer ------------------------------------


def test_tokenize_masks_prompt_and_appends_eos():
    tok = CharTokenizer()
    out = tokenize_instruction({"instruction": "ab", "input": "", "output": "xyz"}, tok, TINY, cutoff_len=64)
    p = prompt_ids("ab")
    assert out["input_ids"] == p + chars("xyz") + [2]
    assert out["labels"] == [-100] * len(p) + chars("xyz") + [2]
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    with_input = tokenize_instruction({"instruction": "ab", "input": "c", "output": "z"}, tok, TINY)
    assert with_input["input_ids"][: len(prompt_ids("ab", "c"))] == prompt_ids("ab", "c")


def test_tokenize_options_train_on_inputs_and_no_eos():
    tok, rec = CharTokenizer(), {"instruction": "ab", "output": "xyz"}
    full = tokenize_instruction(rec, tok, TINY, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]
    no_eos = tokenize_instruction(rec, tok, TINY, add_eos_token=False)
    assert no_eos["input_ids"] == prompt_ids("ab") + chars("xyz")
    assert no_eos["labels"][-3:] == chars("xyz")


def test_truncation_cuts_the_response_and_keeps_eos_last():
    tok, rec = CharTokenizer(), {"instruction": "ab", "output": "0123456789"}
    p = prompt_ids("ab")
    exact = tokenize_instruction(rec, tok, TINY, cutoff_len=len(p) + 11)
    assert exact["input_ids"] == p + chars("0123456789") + [2]  # fits exactly: nothing cut
    cut = tokenize_instruction(rec, tok, TINY, cutoff_len=len(p) + 4)
    assert cut["input_ids"] == p + chars("012") + [2]
    assert cut["labels"] == [-100] * len(p) + chars("012") + [2]
    one = tokenize_instruction(rec, tok, TINY, cutoff_len=len(p) + 2)  # room for one response token + EOS
    assert one["input_ids"] == p + chars("0") + [2]
    no_eos = tokenize_instruction(rec, tok, TINY, cutoff_len=len(p) + 4, add_eos_token=False)
    assert no_eos["input_ids"] == p + chars("0123")


def test_prompt_that_fills_cutoff_gets_no_response_and_no_eos():
    tok, rec = CharTokenizer(), {"instruction": "ab", "output": "xyz"}
    p = prompt_ids("ab")
    for cutoff in (len(p) + 1, len(p), 5):
        out = tokenize_instruction(rec, tok, TINY, cutoff_len=cutoff)
        assert out["input_ids"] == p[: min(cutoff, len(p))]
        assert set(out["labels"]) == {-100}
        assert 2 not in out["input_ids"]
    on_inputs = tokenize_instruction(rec, tok, TINY, cutoff_len=5, train_on_inputs=True)
    assert on_inputs["labels"] == on_inputs["input_ids"] == p[:5]
    without_eos = tokenize_instruction(rec, tok, TINY, cutoff_len=len(p), add_eos_token=False)
    assert set(without_eos["labels"]) == {-100}


@settings(max_examples=200, deadline=None)
@given(instruction=st.text(min_size=1, max_size=30), output=st.text(max_size=40),
       cutoff=st.integers(1, 80), train_on_inputs=st.booleans(), add_eos=st.booleans())
def test_masking_invariants_hold_for_any_record_and_cutoff(instruction, output, cutoff, train_on_inputs,
                                                           add_eos):
    tok = CharTokenizer()
    out = tokenize_instruction({"instruction": instruction, "output": output}, tok, TINY, cutoff_len=cutoff,
                               train_on_inputs=train_on_inputs, add_eos_token=add_eos)
    ids, labels, p = out["input_ids"], out["labels"], prompt_ids(instruction)
    assert len(ids) == len(labels) == len(out["attention_mask"]) <= cutoff
    n_prompt = min(len(p), len(ids))
    assert ids[:n_prompt] == p[:n_prompt]  # the prompt is never altered, only cut
    assert labels[:n_prompt] == (ids[:n_prompt] if train_on_inputs else [-100] * n_prompt)
    assert labels[n_prompt:] == ids[n_prompt:]  # response (+ EOS) carries loss
    response = ids[n_prompt:]
    if len(p) < cutoff - add_eos:  # room for a response token: EOS is last whenever requested
        body = response[:-1] if add_eos else response
        assert chars(output)[: len(body)] == body
        assert len(body) == min(len(output), cutoff - add_eos - len(p))
        assert (response[-1:] == [2]) if add_eos else 2 not in response
    else:
        assert response == [] and ids == p[:cutoff]


def test_tokenizer_that_appends_eos_everywhere_keeps_one_eos_at_the_end():
    tok = CharTokenizer(append_eos=True)
    out = tokenize_instruction({"instruction": "ab", "output": "x"}, tok, TINY)
    assert out["input_ids"] == prompt_ids("ab") + chars("x") + [2]
    assert out["input_ids"].count(2) == 1


def test_tokenize_errors():
    with pytest.raises(ConfigError, match="no EOS token"):
        tokenize_instruction({"instruction": "a", "output": "b"}, CharTokenizer(eos=None), TINY)
    assert tokenize_instruction({"instruction": "a", "output": "b"}, CharTokenizer(eos=None), TINY,
                                add_eos_token=False)["input_ids"][-1] == chars("b")[0]
    with pytest.raises(DataError, match="'output'"):
        tokenize_instruction({"instruction": "a"}, CharTokenizer(), TINY)
    with pytest.raises(DataError, match="output: int"):
        tokenize_instruction({"instruction": "a", "output": 3}, CharTokenizer(), TINY)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ConfigError, match="cutoff_len"):
            tokenize_instruction({"instruction": "a", "output": "b"}, CharTokenizer(), TINY, cutoff_len=bad)
    with pytest.raises(ConfigError, match="unknown prompt template"):
        tokenize_instruction({"instruction": "a", "output": "b"}, CharTokenizer(), "alpacaa")


def test_template_by_name_dict_path_or_instance_gives_the_same_tokens(tmp_path):
    tok, rec = CharTokenizer(), {"instruction": "Name a colour.", "input": "warm", "output": "Red"}
    path = get_template("alpaca").save(tmp_path / "t.json")
    results = [tokenize_instruction(rec, tok, t) for t in
               ("alpaca", get_template("alpaca"), get_template("alpaca").to_dict(), path, str(path))]
    assert all(r == results[0] for r in results)
    assert results[0] == tokenize_instruction(rec, tok)  # alpaca is the default


# ---- real tokenizer --------------------------------------------------------------------------


def test_real_tokenizer_masks_exactly_where_a_bpe_merge_crosses_the_boundary(smol_tokenizer):
    tok = smol_tokenizer
    rec = {"instruction": "Say hi", "input": "", "output": "\n\nHello"}
    prompt = get_template("alpaca").render("Say hi")
    p = tok(prompt)["input_ids"]
    joined = tok(prompt + rec["output"])["input_ids"]
    assert joined[: len(p)] != p  # re-tokenizing the full text would shift the mask (DESIGN mistake 3)
    out = tokenize_instruction(rec, tok)
    response = tok(rec["output"], add_special_tokens=False)["input_ids"]
    assert out["input_ids"] == p + response + [tok.eos_token_id]
    assert [x for x in out["labels"] if x != -100] == response + [tok.eos_token_id]
    assert tok.decode([x for x in out["labels"] if x != -100]) == "\n\nHello" + tok.eos_token


def test_real_tokenizer_truncation_keeps_eos(smol_tokenizer):
    tok = smol_tokenizer
    rec = {"instruction": "Count.", "output": " ".join(str(i) for i in range(200))}
    p = tok(get_template("alpaca").render("Count."))["input_ids"]
    out = tokenize_instruction(rec, tok, cutoff_len=len(p) + 10)
    assert len(out["input_ids"]) == len(p) + 10
    assert out["input_ids"][-1] == out["labels"][-1] == tok.eos_token_id
    assert out["labels"][: len(p)] == [-100] * len(p) and -100 not in out["labels"][len(p):]


# ---- prepare_dataset -------------------------------------------------------------------------


def test_prepare_dataset_drops_prompt_only_records_and_reports():
    tok = CharTokenizer()
    raw = [{"instruction": "ab", "output": "xyz"},                      # prompt 8 tokens, fits
           {"instruction": "a" * 30, "output": "x"},                    # prompt fills the cutoff
           {"instruction": "cd", "output": "0123456789" * 3},           # response truncated
           {"instruction": "b" * 11, "output": "y"}]                    # prompt 18 = cutoff - 2: fits one
    cutoff = 20
    out, report = prepare_dataset(load_instructions(raw), tok, template=TINY, cutoff_len=cutoff)
    assert isinstance(report, PrepareReport)
    assert (report.kept, report.dropped, report.truncated) == (3, 1, 1)
    assert report.drop_reasons == {DROP_PROMPT_FULL: 1}
    assert out.column_names == ["input_ids", "attention_mask", "labels", "length"]
    rows = out.to_list()
    assert [r["input_ids"] for r in rows] == [tokenize_instruction(raw[i], tok, TINY, cutoff)["input_ids"]
                                              for i in (0, 2, 3)]  # order kept, same as the function
    assert all(r["length"] == len(r["input_ids"]) <= cutoff for r in rows)
    assert all(r["input_ids"][-1] == 2 for r in rows)
    assert report.total_tokens == sum(r["length"] for r in rows)
    assert report.label_tokens == sum(sum(x != -100 for x in r["labels"]) for r in rows)
    summary = report.summary()
    assert "kept 3 of 4" in summary and "prompt fills cutoff_len: 1" in summary and "truncated 1" in summary


def test_prepare_dataset_raises_when_every_record_is_dropped():
    raw = [{"instruction": "a" * 40, "output": "x"}, {"instruction": "b" * 50, "output": "y"}]
    with pytest.raises(DataError) as info:
        prepare_dataset(load_instructions(raw), CharTokenizer(), template=TINY, cutoff_len=16)
    message = str(info.value)
    assert "all 2 record(s) were dropped" in message and "prompt fills cutoff_len: 2" in message
    assert "cutoff_len=16" in message and "Raise cutoff_len" in message


def test_prepare_dataset_empty_response_and_train_on_inputs():
    ds = datasets.Dataset.from_dict({"instruction": ["ab", "cd"], "output": ["", "z"]})  # no input column
    out, report = prepare_dataset(ds, CharTokenizer(), template=TINY, add_eos_token=False)
    assert report.drop_reasons == {DROP_EMPTY_RESPONSE: 1} and report.kept == 1
    # With train_on_inputs a prompt-only record still has labels: it is kept, and counted as truncated.
    full = load_instructions([{"instruction": "a" * 30, "output": "x"}])
    out, report = prepare_dataset(full, CharTokenizer(), template=TINY, cutoff_len=10, train_on_inputs=True)
    assert (report.kept, report.dropped, report.truncated) == (1, 0, 1)


def test_prepare_dataset_validates_columns_and_records():
    with pytest.raises(DataError, match="no records"):
        prepare_dataset(datasets.Dataset.from_dict({"instruction": [], "output": []}), CharTokenizer())
    with pytest.raises(DataError, match=r"lacks column\(s\) \['output'\]"):
        prepare_dataset(datasets.Dataset.from_dict({"instruction": ["a"]}), CharTokenizer())
    ds = datasets.Dataset.from_dict({"instruction": ["a", "b"], "output": ["x", None]})
    with pytest.raises(DataError, match="dataset record index 1"):
        prepare_dataset(ds, CharTokenizer(), template=TINY)


# ---- fingerprint -----------------------------------------------------------------------------


def test_data_fingerprint_is_stable_and_sensitive(tmp_path):
    ds = load_instructions(RECORDS)
    fp = data_fingerprint(ds, tmp_path / "d.json")
    assert fp["num_records"] == 3 and len(fp["sha256"]) == 64 and fp["source"] == str(tmp_path / "d.json")
    assert data_fingerprint(load_instructions(list(RECORDS)))["sha256"] == fp["sha256"]
    assert data_fingerprint(ds, RECORDS)["source"] == "list"
    assert data_fingerprint(ds)["source"] is None
    changed = [dict(RECORDS[0], output="6"), *RECORDS[1:]]
    assert data_fingerprint(load_instructions(changed))["sha256"] != fp["sha256"]
    assert data_fingerprint(load_instructions(RECORDS[::-1]))["sha256"] != fp["sha256"]
    # Field boundaries are part of the hash: ("ab", "c") differs from ("a", "bc").
    a = load_instructions([{"instruction": "ab", "input": "c", "output": "x"}])
    b = load_instructions([{"instruction": "a", "input": "bc", "output": "x"}])
    assert data_fingerprint(a)["sha256"] != data_fingerprint(b)["sha256"]


# ---- hardening (issue #19) ----------------------------------------------------------------------


def test_a_datasetdict_without_splits_or_without_train_is_a_data_error():
    with pytest.raises(DataError, match="has no splits"):
        load_instructions(datasets.DatasetDict({}))
    ds = datasets.Dataset.from_list(RECORDS)
    with pytest.raises(DataError, match=r"none named 'train'; pass one, e.g. dd\['validation'\]"):
        load_instructions(datasets.DatasetDict({"validation": ds, "test": ds}))


@pytest.mark.parametrize("key", [1, None, 2.5, (1, 2), True])
def test_a_record_with_a_field_name_that_is_not_text_is_named(key):
    records = [RECORDS[0], {key: "x", "instruction": "a", "output": "b"}]
    with pytest.raises(DataError, match=r"list of records, index 1: has the field name .* which is not text"):
        load_instructions(records)
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        assert len(load_instructions(records, skip_bad_records=True)) == 1


@pytest.mark.parametrize("field", ["instruction", "input", "output"])
@pytest.mark.parametrize("surrogate", ["\ud800", "\udfff", "ok \udbff then"])
def test_lone_surrogates_in_any_field_are_refused_by_name(field, surrogate):
    record = {"instruction": "a", "input": "b", "output": "c", field: surrogate}
    with pytest.raises(DataError, match=f"index 0: field '{field}' holds a lone surrogate") as info:
        load_instructions([record])
    assert "fix the text" in str(info.value)
    with pytest.raises(DataError, match=f"'{field}' holds a lone surrogate"):
        tokenize_instruction(record, CharTokenizer(), TINY)


def test_split_dataset_refuses_non_finite_sizes():
    ds = datasets.Dataset.from_list(RECORDS)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="val_set_size"):
            split_dataset(ds, bad, seed=0)


def test_error_messages_quote_bounded_values():
    huge = "c" * 100_000
    with pytest.raises(DataError) as info:
        read_records([{huge: "x", "other": "y"}])
    assert len(str(info.value)) < 2000
    with pytest.raises(DataError) as info:
        read_records(RECORDS, column_map={huge: "instruction"})
    assert len(str(info.value)) < 2000
    with pytest.raises(ConfigError) as info:
        read_records(RECORDS, column_map={"instruction": huge})
    assert len(str(info.value)) < 2000
