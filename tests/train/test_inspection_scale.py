"""inspect_data at scale: the counts of training, the lengths of the per-record definition, bad records
counted exactly, and a memory peak that does not grow with the number of records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from alpaca_lora.data.chat import encode_conversation
from alpaca_lora.data.chat_templates import resolve_chat_template
from alpaca_lora.data.pipeline import prepare_dataset
from alpaca_lora.data.prepare import tokenize_instruction, tokenize_prompt
from alpaca_lora.data.prompts import get_template
from alpaca_lora.data.sources import load_data
from alpaca_lora.train.inspection import format_inspection, inspect_data, mark_masked, percentiles

UNCUT = 1 << 30
BAD_LINES = ['{"instruction": "no output"}', "{not json", '{"instruction": 3, "output": "x"}', "[1, 2]"]


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    return json.loads((shared_data / "gsm8k_train_alpaca.json").read_text(encoding="utf-8"))


def _good_records(gsm8k):
    """41 records: GSM8K (no input) with one record that has an input at index 5."""
    with_input = {"instruction": "Translate to French.", "input": "The cat sleeps.", "output": "Le chat dort."}
    return [*gsm8k[:5], with_input, *gsm8k[5:40]]


@pytest.mark.parametrize(("train_on_inputs", "add_eos_token"), [(False, True), (True, False)])
def test_alpaca_counts_lengths_and_example_are_those_of_training(smol_dir, smol_tokenizer, gsm8k, tmp_path,
                                                                 train_on_inputs, add_eos_token):
    opts = {"train_on_inputs": train_on_inputs, "add_eos_token": add_eos_token}
    records = _good_records(gsm8k)
    lines = [json.dumps(r) for r in records]
    for k in range(8):  # 8 bad records among the good ones, at lines 3, 8, 13, ...
        lines.insert(2 + 5 * k, BAD_LINES[k % len(BAD_LINES)])
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = inspect_data(path, smol_dir, cutoff_len=128, **opts)

    assert (report.records, report.good_records, report.bad_count) == (49, 41, 8)
    assert len(report.bad_records) == 5 and report.bad_records[0].startswith(f"{path} line 3: ")
    assert report.bad_records[1].startswith(f"{path} line 8: not valid JSON")
    text = format_inspection(report)
    assert "49 read, 41 good, 8 bad" in text and "... and 3 more bad record(s)" in text
    assert text.count("  bad: ") == 5

    with pytest.warns(UserWarning, match="skipped 8 bad record"):  # inspect_data lists them instead
        ds, _ = load_data(path, skip_bad_records=True)
    _, prep = prepare_dataset(ds, smol_tokenizer, cutoff_len=128, **opts)
    assert (report.kept, report.dropped, report.truncated) == (prep.kept, prep.drop_reasons, prep.truncated)
    assert (report.total_tokens, report.label_tokens) == (prep.total_tokens, prep.label_tokens)
    assert report.truncated > 0 and report.turns is None

    # The lengths are those of tokenizing each record whole (not only those cut at cutoff_len measured again);
    # the prompts those of the rendered prompt.
    lengths = [len(tokenize_instruction(r, smol_tokenizer, cutoff_len=UNCUT, **opts)["input_ids"]) for r in records]
    template = get_template("alpaca")
    prompts = [len(tokenize_prompt(template.render(r["instruction"], r["input"] or None), smol_tokenizer))
               for r in records]
    assert report.length_percentiles == percentiles(lengths) and report.prompt_percentiles == percentiles(prompts)
    assert report.over_cutoff == sum(n > 128 for n in lengths) > 0

    # The example: the first record with an input that fits, tokenized as training does.
    assert report.example_index == 5 and "### Input:" in report.example.split("]]")[0]
    feats = tokenize_instruction(records[5], smol_tokenizer, cutoff_len=128, **opts)
    assert report.example == mark_masked(feats["input_ids"], feats["labels"], smol_tokenizer)


def test_a_file_read_whole_counts_every_bad_record_too(smol_dir, gsm8k, tmp_path):
    items = [*gsm8k[:10], *({"instruction": f"bad {k}"} for k in range(7))]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    report = inspect_data(path, smol_dir, cutoff_len=512)
    assert (report.records, report.good_records, report.bad_count, len(report.bad_records)) == (17, 10, 7, 5)
    assert report.bad_records[0].startswith(f"{path}, record index 10")
    assert "17 read, 10 good, 7 bad" in format_inspection(report, max_bad=2)
    assert "... and 5 more bad record(s)" in format_inspection(report, max_bad=2)
    assert report.example_index == 0  # no record has an input: the first that fits


def test_conversation_lengths_are_those_of_each_whole_conversation(smol_dir, smol_tokenizer, shared_data):
    glaive = shared_data / "glaive_toolcall_sharegpt.json"
    report = inspect_data(glaive, smol_dir, cutoff_len=256)
    ds, _ = load_data(glaive)
    source = resolve_chat_template(smol_tokenizer, None)
    encoded = [encode_conversation(row["messages"], row["tools"] or "", smol_tokenizer, source) for row in ds]
    lengths = [len(e.input_ids) for e in encoded]
    assert report.length_percentiles == percentiles(lengths) and report.over_cutoff == sum(n > 256 for n in lengths)
    first_turns = [e.turns[0].start for e in encoded]  # the prompt: the tokens before the first assistant turn
    assert report.prompt_percentiles == percentiles(first_turns)
    assert report.example_index is not None and lengths[report.example_index] <= 256


MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path

    from alpaca_lora.train.inspection import inspect_data

    def status(key):  # MiB
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024

    small, big, base_model = sys.argv[1:4]
    inspect_data(small, base_model, cutoff_len=256)  # imports and the tokenizer: the baseline
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
    baseline = status("VmHWM")
    start = time.perf_counter()
    report = inspect_data(big, base_model, cutoff_len=256)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "seconds": time.perf_counter() - start,
                      "workers_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
                      "records": report.records, "kept": report.kept, "dropped": sum(report.dropped.values()),
                      "example_index": report.example_index}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident set from /proc")
def test_two_hundred_thousand_records_take_bounded_memory(smol_dir, gsm8k, tmp_path):
    n = 200_000
    big = tmp_path / "big.jsonl"
    with big.open("w", encoding="utf-8") as f:
        for i in range(n):
            r = gsm8k[i % len(gsm8k)]
            f.write(json.dumps({**r, "instruction": f"{r['instruction']} ({i})"}) + "\n")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in gsm8k[:20]), encoding="utf-8")
    script = tmp_path / "measure.py"
    script.write_text(MEASURE, encoding="utf-8")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    done = subprocess.run([sys.executable, str(script), str(small), str(big), str(smol_dir)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"inspect_data on {n} records: {got['seconds']:.0f} s, peak {got['peak']} MiB (baseline "
          f"{got['baseline']} MiB), worker processes' peak {got['workers_peak']} MiB")
    assert got["records"] == got["kept"] + got["dropped"] == n and got["example_index"] == 0
    # Read whole into Python lists, 200,000 records took gigabytes; streamed they take a bounded amount.
    assert got["peak"] - got["baseline"] < 600, got
    assert got["workers_peak"] - got["baseline"] < 600, got
