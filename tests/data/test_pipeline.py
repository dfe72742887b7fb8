"""The batched pipeline gives tokenize_instruction's / tokenize_conversation's features record for record,
and the tokenized-data cache is reused only when nothing that changes the features changed."""

from __future__ import annotations

import json

import datasets
import pytest

from alpaca_lora import tokenize_conversation, tokenize_instruction
from alpaca_lora.data import pipeline, token_cache
from alpaca_lora.data.conversations import load_conversations
from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.pipeline import alpaca_spec, prepare_conversations, prepare_dataset, tokenize_all
from alpaca_lora.data.prepare import DROP_EMPTY_RESPONSE, DROP_PROMPT_FULL, load_instructions

EDGE = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Long prompt " * 80, "input": "ctx " * 40, "output": "never fits"},  # prompt fills the cutoff
    {"instruction": "Empty input field.", "input": "", "output": "A reply that is rather long " * 12},  # cut
    {"instruction": "Unicode: 猫 and é.", "input": "naïve", "output": "ünïcödé ✓"},
    {"instruction": "Ends with EOS text", "input": "", "output": "done<|im_end|>"},  # pad == eos in the output
    {"instruction": "Whitespace", "input": "  ", "output": " \n spaced \n"},
]


def _expected(records, tokenizer, **kw):
    """Per-record tokenize_instruction results, without the records that have no label."""
    rows = [tokenize_instruction(r, tokenizer, **kw) for r in records]
    return [r for r in rows if any(x != IGNORE_INDEX for x in r["labels"])]


def _rows(ds):
    return [{k: ds[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(len(ds))]


@pytest.mark.parametrize("kw", [dict(cutoff_len=64), dict(cutoff_len=48), dict(cutoff_len=512, train_on_inputs=True),
                                dict(cutoff_len=40, add_eos_token=False), dict(cutoff_len=64, template="alpaca_short")])
def test_batched_alpaca_features_equal_tokenize_instruction(smol_tokenizer, real_records, kw):
    records = EDGE + real_records[:300]
    ds, report = prepare_dataset(load_instructions(records), smol_tokenizer, **kw)
    expected = _expected(records, smol_tokenizer, **kw)
    assert _rows(ds) == expected
    assert ds["length"] == [len(r["input_ids"]) for r in expected]
    assert report.kept == len(expected) and report.kept + report.dropped == len(records)
    assert report.label_tokens == sum(sum(x != IGNORE_INDEX for x in r["labels"]) for r in expected)


def test_two_worker_processes_give_the_same_table(smol_tokenizer, real_records):
    ds = load_instructions((EDGE + real_records) * 2)
    spec = alpaca_spec("alpaca", 96, False, True)
    one = tokenize_all(ds, smol_tokenizer, spec, num_proc=1)
    two = tokenize_all(ds, smol_tokenizer, spec, num_proc=2)
    assert one.to_dict() == two.to_dict()


def test_drop_reasons_and_the_report(smol_tokenizer):
    records = [*EDGE, {"instruction": "x", "input": "", "output": ""}]
    _, report = prepare_dataset(load_instructions(records, skip_bad_records=True), smol_tokenizer, cutoff_len=64,
                                add_eos_token=False)
    assert report.drop_reasons == {DROP_PROMPT_FULL: 1}  # the empty output was a bad record, skipped on reading
    table = tokenize_all(datasets.Dataset.from_list(records), smol_tokenizer, alpaca_spec("alpaca", 64, False, False))
    assert pipeline.report_of(table).drop_reasons == {DROP_PROMPT_FULL: 1, DROP_EMPTY_RESPONSE: 1}


def test_batched_conversations_equal_tokenize_conversation(smol_tokenizer, shared_data):
    ds = load_conversations(shared_data / "glaive_toolcall_sharegpt.json")
    for cutoff in (256, 2048):
        tokenized, report = prepare_conversations(ds, smol_tokenizer, cutoff_len=cutoff)
        expected = [tokenize_conversation(r["messages"], smol_tokenizer, cutoff_len=cutoff, tools=r["tools"])
                    for r in ds]
        expected = [e for e in expected if any(x != IGNORE_INDEX for x in e["labels"])]
        assert _rows(tokenized) == expected and report.kept == len(expected)


def test_a_record_without_output_names_its_index(smol_tokenizer):
    ds = datasets.Dataset.from_list([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}])
    with pytest.raises(Exception, match="dataset record index 1"):
        prepare_dataset(ds, smol_tokenizer)


# ---- the cache ---------------------------------------------------------------------------------------


def _table(records, tokenizer, cache_dir, key="k1", **kw):
    spec = alpaca_spec(kw.get("template", "alpaca"), kw.get("cutoff_len", 64), False, True)
    return token_cache.cached_table(load_instructions(records), tokenizer, spec, records_key=key, cache_dir=cache_dir)


def test_the_cache_is_reused_and_never_stale(smol_tokenizer, real_records, tmp_path, monkeypatch):
    records = real_records[:50]
    first, hit = _table(records, smol_tokenizer, tmp_path)
    assert not hit

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(token_cache, "tokenize_all", no_tokenizing)
    again, hit = _table(records, smol_tokenizer, tmp_path)
    assert hit and again.to_dict() == first.to_dict()
    monkeypatch.undo()
    changed = [dict(key="k2"), dict(cutoff_len=32), dict(template="alpaca_short")]
    for kw in changed:  # other records, cutoff or template: a new entry, never the stale one
        table, hit = _table(records, smol_tokenizer, tmp_path, **kw)
        assert not hit
    assert len(token_cache.list_cache(tmp_path)) == 1 + len(changed)
    other = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    other.add_tokens(["<new>"])
    assert token_cache.tokenizer_fingerprint(other) != token_cache.tokenizer_fingerprint(smol_tokenizer)
    assert token_cache.clear_cache(tmp_path)[0] == 4 and token_cache.list_cache(tmp_path) == []


def test_a_damaged_or_interrupted_entry_is_tokenized_again(smol_tokenizer, real_records, tmp_path):
    records = real_records[:20]
    table, _ = _table(records, smol_tokenizer, tmp_path)
    (entry,) = token_cache.list_cache(tmp_path)
    (entry.path / "meta.json").write_text(json.dumps({"version": token_cache.CACHE_VERSION, "files": ["gone.arrow"],
                                                      "records": 20}))
    again, hit = _table(records, smol_tokenizer, tmp_path)
    assert not hit and again.to_dict() == table.to_dict()
    (tmp_path / ".leftover.123.tmp").mkdir()  # a killed write
    assert len(token_cache.list_cache(tmp_path)) == 1
    assert token_cache.clear_cache(tmp_path)[0] == 2


@pytest.mark.slow
def test_every_record_of_a_10k_real_sample_equals_tokenize_instruction(smol_tokenizer, shared_data):
    """The issue's check: 10,000 real records (GSM8K, roleplay, toolformer in turn), two worker processes."""
    pools = [json.loads((shared_data / n).read_text(encoding="utf-8")) for n in
             ("gsm8k_train_alpaca.json", "gpteacher_roleplay_alpaca.json", "gpteacher_toolformer_alpaca.json")]
    records = [pools[i % 3][(i // 3) % len(pools[i % 3])] for i in range(10_000)]
    spec = alpaca_spec("alpaca", 256, False, True)
    table = tokenize_all(load_instructions(records), smol_tokenizer, spec, num_proc=2)
    expected = [tokenize_instruction(r, smol_tokenizer, cutoff_len=256) for r in records]
    assert len(table) == len(expected) == 10_000
    for i in range(0, 10_000, 1000):  # compared in slices: every record, bounded memory
        rows = table[i:i + 1000]
        for k, e in enumerate(expected[i:i + 1000]):
            assert [rows[c][k] for c in ("input_ids", "attention_mask", "labels")] == \
                [e["input_ids"], e["attention_mask"], e["labels"]], i + k
