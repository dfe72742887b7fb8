"""Hostile input: property tests of templates, masking and collation; fuzzed data files; untrusted weights.

Every fuzzed file must load or raise one of our own errors (``AlpacaLoraError``), quickly. The
hypothesis runs are derandomized, so a run is reproducible and the suite time is stable.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from alpaca_lora import AlpacaLoraError, InstructionCollator, ModelError, load_instructions, tokenize_instruction
from alpaca_lora.data.prepare import tokenize_prompt
from alpaca_lora.data.prompts import get_template, list_templates
from conftest import InputTally

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TIME_LIMIT_S = 5.0  # per file; the slowest honest case (a 4 MB field) takes well under a second alone
text = st.text(st.characters(codec="utf-8"), max_size=60)
_count = InputTally("hostile-input cases run")


# ---- templates ---------------------------------------------------------------------------------


@PROPERTY
@given(name=st.sampled_from(list_templates()), instruction=text.filter(str.strip), inp=text, output=text)
def test_template_render_and_split_round_trip(name, instruction, inp, output):
    _count("template")
    t = get_template(name)
    assume(t.response_split not in instruction + inp)  # a header inside user text is ambiguous by nature
    prompt = t.render(instruction, inp)
    assert instruction in prompt and inp in prompt
    assert prompt.index(instruction) + len(instruction) <= prompt.rindex(t.response_split)  # header ends it
    assert t.render(instruction, inp, output) == prompt + output
    assert t.split_response(prompt + output) == output.strip()
    assert t.render(instruction, inp or None) == t.render(instruction, inp)  # "" and None mean no input


# ---- tokenize_instruction with the real SmolLM2 tokenizer ---------------------------------------


@PROPERTY
@given(instruction=text.filter(str.strip), inp=text, output=text.filter(str.strip), cutoff=st.integers(1, 120),
       train_on_inputs=st.booleans(), add_eos=st.booleans())
def test_tokenize_instruction_masks_exactly_the_prompt(smol_tokenizer, instruction, inp, output, cutoff,
                                                       train_on_inputs, add_eos):
    _count("tokenize_instruction")
    record = {"instruction": instruction, "input": inp, "output": output}
    out = tokenize_instruction(record, smol_tokenizer, cutoff_len=cutoff, train_on_inputs=train_on_inputs,
                               add_eos_token=add_eos)
    ids, labels, mask = out["input_ids"], out["labels"], out["attention_mask"]
    prompt = tokenize_prompt(get_template("alpaca").render(instruction, inp), smol_tokenizer)
    response = smol_tokenizer(output, add_special_tokens=False)["input_ids"]
    eos = smol_tokenizer.eos_token_id
    assert len(ids) == len(labels) == len(mask) <= cutoff and set(mask) == {1}
    n = min(len(prompt), len(ids))
    assert ids[:n] == prompt[:n]
    assert labels[:n] == (ids[:n] if train_on_inputs else [-100] * n)  # -100 exactly on the prompt
    assert labels[n:] == ids[n:] and -100 not in labels[n:]
    if len(prompt) < cutoff - add_eos:  # room for a response: EOS last when asked, even when cut
        body = ids[n:-1] if add_eos else ids[n:]
        assert body == response[: len(body)] and len(body) == min(len(response), cutoff - add_eos - len(prompt))
        if add_eos:
            assert ids[-1] == eos
    else:
        assert ids == prompt[:cutoff]


# ---- InstructionCollator ----------------------------------------------------------------------

feature = st.integers(1, 40).flatmap(lambda n: st.fixed_dictionaries({
    "input_ids": st.lists(st.integers(0, 50), min_size=n, max_size=n),
    "attention_mask": st.lists(st.integers(0, 1), min_size=n, max_size=n),
    "labels": st.lists(st.one_of(st.just(-100), st.integers(0, 50)), min_size=n, max_size=n),
}))


class _Tok:
    def __init__(self, pad, eos):
        self.pad_token_id, self.eos_token_id = pad, eos


@PROPERTY
@given(features=st.lists(feature, min_size=1, max_size=6), multiple=st.sampled_from([None, 1, 3, 8]),
       pad=st.sampled_from([None, 0, 2]), eos=st.sampled_from([2, 7]))
def test_collator_pads_by_position_and_keeps_every_real_token(features, multiple, pad, eos):
    _count("collator")
    batch = InstructionCollator(_Tok(pad, eos), pad_to_multiple_of=multiple)(features)
    longest = max(len(f["input_ids"]) for f in features)
    width = -(-longest // multiple) * multiple if multiple else longest
    pad_id = eos if pad is None else pad
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (len(features), width) and batch[key].dtype == torch.long
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == f["input_ids"]
        assert batch["attention_mask"][row, :n].tolist() == f["attention_mask"]
        assert batch["labels"][row, :n].tolist() == f["labels"]  # a real EOS == pad id keeps its label
        assert set(batch["input_ids"][row, n:].tolist()) <= {pad_id}
        assert set(batch["attention_mask"][row, n:].tolist()) <= {0}
        assert set(batch["labels"][row, n:].tolist()) <= {-100}


# ---- fuzzed data files -------------------------------------------------------------------------

GOOD = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Quote \"this\", please", "input": "é 中文 🙂", "output": "multi\nline, with comma"}]
SUFFIXES = [".json", ".jsonl", ".csv", ".parquet"]


def _render(records: list, suffix: str) -> bytes:
    if suffix == ".json":
        return json.dumps(records, ensure_ascii=False).encode()
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    lines = ["instruction,input,output"] + [",".join(json.dumps(str(r.get(k, ""))) for k in ("instruction", "input",
                                                                                            "output"))
                                             for r in records if isinstance(r, dict)]
    return "\n".join(lines).encode()


def _load(tmp_path: Path, data: bytes, suffix: str, case: str) -> None:
    """Load ``data`` both strictly and skipping; it must load valid records or raise our error, quickly."""
    _count(case)
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    for skip in (False, True):
        start = time.perf_counter()
        try:
            ds = load_instructions(path, skip_bad_records=skip)
        except AlpacaLoraError as exc:
            assert str(path) in str(exc) or "column_map" in str(exc), str(exc)[:300]
        else:
            assert ds.column_names == ["instruction", "input", "output"] and len(ds) >= 1
            for row in ds:
                assert all(isinstance(v, str) for v in row.values()) and row["instruction"].strip()
        assert time.perf_counter() - start < TIME_LIMIT_S, f"{case}: {time.perf_counter() - start:.1f} s"


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=400))
def test_random_bytes(tmp_path, suffix, data):
    _load(tmp_path, data, suffix, "random bytes")


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES[:3]), cut=st.floats(0, 1))
def test_truncated_files(tmp_path, suffix, cut):
    data = _render(GOOD, suffix)
    _load(tmp_path, data[: int(cut * len(data))], suffix, "truncated")


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=8)


@FUZZ
@given(records=st.lists(st.one_of(json_value, st.fixed_dictionaries(
    {"instruction": json_value, "output": json_value}, optional={"input": json_value})), min_size=1, max_size=4),
    suffix=st.sampled_from([".json", ".jsonl"]))
def test_wrong_types_and_shapes(tmp_path, records, suffix):
    _load(tmp_path, _render(records, suffix), suffix, "wrong types")


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES[:3]), where=st.lists(st.floats(0, 1), min_size=1, max_size=3),
       junk=st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xe9", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\r", b"\x1a"]))
def test_nul_bytes_invalid_utf8_and_stray_boms_inside(tmp_path, suffix, where, junk):
    data = bytearray(_render(GOOD, suffix))
    for w in sorted(where, reverse=True):
        data[int(w * len(data)):int(w * len(data))] = junk
    _load(tmp_path, bytes(data), suffix, "NUL/invalid bytes")


@pytest.mark.parametrize("suffix", SUFFIXES[:3])
@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "mixed"])
def test_boms_and_encodings(tmp_path, suffix, encoding):
    text_ = _render(GOOD, suffix).decode()
    if encoding == "mixed":  # half the file in UTF-8, half in Latin-1
        half = len(text_) // 2
        data = text_[:half].encode() + text_[half:].encode("latin-1", errors="replace")
    else:
        data = text_.encode(encoding, errors="replace")
    _load(tmp_path, data, suffix, "encodings")


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("data", [b"", b"   \n\t\n", b"\xef\xbb\xbf", b"[]", b"{}", b"null", b"\n\n",
                                  b"[" * 100_000, b"{\"a\":" * 50_000, b"instruction,output\n"])
def test_empty_and_degenerate_files(tmp_path, suffix, data):
    _load(tmp_path, data, suffix, "empty/degenerate")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("body", [
    '{"instruction": "a", "instruction": 5, "output": "x"}',  # duplicate keys: the last one wins
    '{"instruction": "a", "output": "x", "output": "y"}',
    '{"instruction": "a", "output": ' + "1" * 5000 + "}",  # an integer Python refuses to convert
    '{"instruction": NaN, "output": Infinity}',
    '{"instruction": "\\ud800", "output": "x"}',  # an escaped lone surrogate
    '{"instruction": "a\\u0000b", "output": "x"}',
])
def test_duplicate_keys_odd_numbers_and_escapes(tmp_path, suffix, body):
    data = f"[{body}]" if suffix == ".json" else body + "\n"
    _load(tmp_path, data.encode(), suffix, "duplicate keys/literals")


@pytest.mark.parametrize("suffix", SUFFIXES[:3])
def test_huge_fields_load_quickly(tmp_path, suffix):
    records = [{"instruction": "Summarise.", "input": "x" * 4_000_000, "output": "y" * 300_000}, GOOD[0]]
    _load(tmp_path, _render(records, suffix), suffix, "huge fields")
    ds = load_instructions(tmp_path / f"fuzz{suffix}")
    assert len(ds[0]["input"]) == 4_000_000 and len(ds[0]["output"]) == 300_000


@pytest.mark.parametrize("seed", range(20))
def test_corrupted_parquet(tmp_path, seed):
    import datasets

    path = tmp_path / "good.parquet"
    datasets.Dataset.from_list(GOOD).to_parquet(str(path))
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    if seed % 2:
        data = data[: rng.randrange(len(data))]
    _load(tmp_path, bytes(data), ".parquet", "corrupted parquet")


# ---- untrusted weights -------------------------------------------------------------------------


def test_a_base_with_only_pickle_weights_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from alpaca_lora import load_model

    folder = tmp_path / "pickled-base"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="safetensors") as info:
        load_model(folder, None, "float32", device="cpu")
    assert str(folder) in str(info.value) and ".bin" in str(info.value)


def test_an_adapter_with_only_pickle_weights_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alpaca_lora import generate

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    folder = tmp_path / "pickled-adapter"
    model.save_pretrained(folder)
    torch.save({k: v for k, v in model.state_dict().items() if "lora_" in k}, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="only safetensors") as info:
        generate(folder, "Say hi.", base_model=str(tiny_model_dir), max_new_tokens=2)
    assert "adapter_model.bin" in str(info.value)


def test_generate_refuses_an_adapter_on_a_base_it_was_not_trained_on(tiny_model_dir, other_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alpaca_lora import generate
    from alpaca_lora.export.fingerprint import base_fingerprint
    from alpaca_lora.export.layout import FINGERPRINT_FILE, write_json

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(adapter)
    write_json(adapter / FINGERPRINT_FILE, {"base_model": base_fingerprint(tiny_model_dir)})
    with pytest.raises(ModelError, match="not the model the adapter") as info:
        generate(adapter, "Say hi.", base_model=str(other_model_dir), max_new_tokens=2)
    assert "num_hidden_layers" in str(info.value)
