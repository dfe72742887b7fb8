"""Masking with SmolLM2's real BPE tokenizer on 1,000 real Alpaca records (GSM8K, GPTeacher).

For every record and cutoff: labels are -100 exactly on the prompt, equal input_ids elsewhere, the
trained span is the separately tokenized output (cut when needed) followed by EOS, and nothing is
longer than cutoff_len. Prompt-only results (no room for a response) are what prepare_dataset drops.
"""

from __future__ import annotations

from collections import Counter

import pytest

from alpaca_lora.data.pipeline import prepare_dataset
from alpaca_lora.data.prepare import DROP_PROMPT_FULL, load_instructions, tokenize_instruction
from alpaca_lora.data.prompts import get_template


@pytest.mark.parametrize("cutoff_len", [128, 512])
def test_masking_on_real_records(smol_tokenizer, real_records, cutoff_len):
    tok, template = smol_tokenizer, get_template("alpaca")
    eos = tok.eos_token_id
    counts: Counter[str] = Counter()
    for i, rec in enumerate(real_records):
        out = tokenize_instruction(rec, tok, template, cutoff_len=cutoff_len)
        ids, labels = out["input_ids"], out["labels"]
        prompt = tok(template.render(rec["instruction"], rec["input"]), add_special_tokens=True)["input_ids"]
        response = tok(rec["output"], add_special_tokens=False)["input_ids"]
        assert len(ids) == len(labels) == len(out["attention_mask"]) <= cutoff_len, i
        assert out["attention_mask"] == [1] * len(ids)
        if len(prompt) >= cutoff_len - 1:  # the prompt leaves no room: prompt only, nothing trained
            assert ids == prompt[:cutoff_len] and labels == [-100] * len(ids), i
            counts["prompt only"] += 1
            continue
        p = len(prompt)
        assert ids[:p] == prompt, i  # the prompt tokens are exactly the separately tokenized prompt
        assert labels[:p] == [-100] * p, i  # masked exactly on the prompt positions ...
        assert labels[p:] == ids[p:] and -100 not in labels[p:], i  # ... and equal to input_ids elsewhere
        assert ids[-1] == labels[-1] == eos, i  # EOS is last, truncated or not
        trained = ids[p:-1]
        if p + len(response) + 1 <= cutoff_len:
            assert trained == response, i
            assert tok.decode(labels[p:]) == tok.decode(response) + tok.eos_token, i
            counts["full"] += 1
            counts["decodes to output exactly"] += tok.decode(trained) == rec["output"]
        else:
            assert trained == response[: cutoff_len - 1 - p] and len(ids) == cutoff_len, i
            counts["truncated"] += 1
    checked = sum(counts[k] for k in ("prompt only", "full", "truncated"))
    print(f"\ncutoff_len={cutoff_len}: checked {checked} real records: {dict(counts)}")
    assert checked == len(real_records) == 1000
    # Measured: at 128, 277 full, 638 truncated, 85 prompt only; at 512, all 1,000 full.
    assert counts["full"] >= (200 if cutoff_len == 128 else 950)
    assert counts["decodes to output exactly"] >= 0.95 * counts["full"]
    if cutoff_len == 128:  # both cut paths are exercised on real data
        assert counts["truncated"] > 100 and counts["prompt only"] > 0

    # prepare_dataset drops exactly the prompt-only records and counts the truncated ones.
    ds, report = prepare_dataset(load_instructions(real_records), tok, cutoff_len=cutoff_len)
    assert report.kept == len(ds) == counts["full"] + counts["truncated"]
    assert report.dropped == counts["prompt only"]
    assert report.drop_reasons == ({DROP_PROMPT_FULL: counts["prompt only"]} if counts["prompt only"] else {})
    assert report.truncated == counts["truncated"]
    assert max(ds["length"]) <= cutoff_len
