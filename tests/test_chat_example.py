"""examples/chat_toolcall.py runs end to end (on a tiny model) and scores what it says it scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chat_toolcall.py"


def _example():
    spec = importlib.util.spec_from_file_location("chat_toolcall", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_name_reads_tool_call_blocks_and_bare_calls():
    ex = _example()
    assert ex.tool_name('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>') == "f"
    assert ex.tool_name('{"name": "g"}') == "g"
    assert ex.tool_name("The weather is fine.") is None and ex.tool_name('<tool_call>\n{"x": 1}') is None


def test_the_example_runs_and_scores_the_held_out_conversations(tiny_model_dir, shared_data, tmp_path):
    data = json.loads((shared_data / "glaive_toolcall_sharegpt.json").read_text(encoding="utf-8"))[:16]
    (tmp_path / "glaive.json").write_text(json.dumps(data), encoding="utf-8")
    report = _example().main(["--data", str(tmp_path / "glaive.json"), "--out", str(tmp_path / "run"),
                              "--base_model", str(tiny_model_dir), "--held_out", "4", "--max_steps", "1",
                              "--max_new_tokens", "4", "--cutoff_len", "1000"])
    assert report["data_format"] == "sharegpt" and report["train_conversations"] == 12 and report["held_out"] == 4
    scored = report["scored"]  # held-out prompts that fit cutoff_len with their answer
    assert 1 <= scored <= 4
    for name in ("base", "tuned"):
        calls = report[name]["tool_call_references"]
        assert report[name]["answers"] == scored and 0 <= calls <= scored
        assert 0 <= report[name]["tool_calls_right"] <= calls and 0 <= report[name]["stopped"] <= scored
    assert json.loads((tmp_path / "run" / "chat_toolcall.json").read_text())["tuned"] == report["tuned"]
