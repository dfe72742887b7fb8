"""The main job on the embedded default, with a small budget: exact match must rise."""

import json
import subprocess
import sys

import pytest

from alpaca_lora.demo.run import DemoConfig, format_report, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo run (16 steps, 16 held-out tasks) and its folder."""
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(output_dir=str(out / "demo"), max_steps=16, n_train=256, n_test=16)
    return run_demo(cfg, log=lambda *_: None), out


@pytest.mark.slow
def test_demo_lifts_exact_match(demo):
    report, tmp_path = demo
    base, tuned = report.base["overall"], report.tuned["overall"]
    print(format_report(report))
    assert tuned.total == base.total == 16
    assert tuned.accuracy > base.accuracy
    saved = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert saved["tuned"]["overall"]["correct"] == tuned.correct
    assert (report.merged_dir / "config.json").is_file()
    assert (report.adapter_dir / "adapter_model.safetensors").is_file()
    assert report.metrics_tuned["exact_match"] == tuned.accuracy and "bleu" in report.metrics_tuned
    assert "bleu" in format_report(report) and saved["metrics_base"]["exact_match"] == base.accuracy


@pytest.mark.slow
def test_eval_command_repeats_the_demo_figures(demo, tmp_path, capsys):
    """The command the demo prints scores the merged model and the base side by side with the demo's figures."""
    from alpaca_lora.cli.main import main

    report, _ = demo
    capsys.readouterr()
    args = report.eval_command.split()[1:] + ["--bootstrap", "0", "--output", str(tmp_path / "eval.json")]
    assert main(args) == 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["scores"]["exact_match"] == report.tuned["overall"].accuracy
    assert saved["compare"]["scores"]["exact_match"] == report.base["overall"].accuracy
    assert "exact_match by kind" in capsys.readouterr().out


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
