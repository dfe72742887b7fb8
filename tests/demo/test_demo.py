"""The main job on the embedded default, with a small budget: exact match must rise."""

import json
import subprocess
import sys

import pytest

from alpaca_lora.demo.run import DemoConfig, format_report, run_demo


@pytest.mark.slow
def test_demo_lifts_exact_match(tmp_path):
    cfg = DemoConfig(output_dir=str(tmp_path / "demo"), max_steps=16, n_train=256, n_test=16)
    report = run_demo(cfg, log=lambda *_: None)
    base, tuned = report.base["overall"], report.tuned["overall"]
    print(format_report(report))
    assert tuned.total == base.total == 16
    assert tuned.accuracy > base.accuracy
    saved = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert saved["tuned"]["overall"]["correct"] == tuned.correct
    assert (report.merged_dir / "config.json").is_file()
    assert (report.adapter_dir / "adapter_model.safetensors").is_file()


def test_demo_flags_are_validated():
    with pytest.raises(Exception, match="budget"):
        DemoConfig(budget="huge").steps()
    assert DemoConfig(budget="quick").steps() < DemoConfig().steps() < DemoConfig(budget="long").steps()
    assert DemoConfig(max_steps=7).steps() == 7


def test_demo_command_help_lists_budget_flags():
    out = subprocess.run([sys.executable, "-m", "alpaca_lora", "demo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--budget", "--max_steps", "--output_dir", "--n_test"):
        assert flag in out
