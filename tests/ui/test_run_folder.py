"""Reading a run folder while it is written: torn lines, progress, ETA, checkpoints; the training process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from alpaca_lora.errors import ConfigError
from alpaca_lora.ui import run_folder
from alpaca_lora.ui.process import Trainer, TrainingRun


def write_metrics(folder, records, torn=""):
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_metrics_skip_blank_and_torn_lines(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], torn='\n{"step": 3, "lo')
    assert [r["step"] for r in run_folder.read_metrics(tmp_path)] == [1, 2]
    assert run_folder.read_metrics(tmp_path / "missing") == []


def test_progress_reads_step_loss_lr_rate_and_eta(tmp_path):
    write_metrics(tmp_path, [
        {"step": 1, "loss": 3.0, "lr": 1e-3, "tokens_seen": 100, "elapsed_s": 1.0},
        {"step": 2, "eval_loss": 2.9},
        {"step": 2, "loss": 2.5, "lr": 9e-4, "tokens_seen": 200, "elapsed_s": 2.0},
    ])
    (tmp_path / "train.log").write_text("preflight:\n  steps         10 optimizer steps of 8 examples\n")
    p = run_folder.progress(tmp_path)
    assert (p.step, p.total_steps, p.loss, p.eval_loss, p.lr) == (2, 10, 2.5, 2.9, 9e-4)
    assert p.tokens_per_s == pytest.approx(100.0) and p.eta_s == pytest.approx(8.0)
    assert p.line() == "step 2/10 · loss 2.5000 · eval loss 2.9000 · lr 0.0009 · 100 tokens/s · ETA 0:08"


def test_total_steps_fall_back_to_max_steps(tmp_path):
    (tmp_path / "finetune_config.json").write_text(json.dumps({"max_steps": 7}))
    assert run_folder.total_steps(tmp_path) == 7
    assert run_folder.progress(tmp_path).line() == "step 0/7"


def test_curves_and_checkpoints(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "loss": 3.0, "lr": 0.1}, {"step": 1, "eval_loss": "nan"}])
    rows = run_folder.curve_rows(run_folder.read_metrics(tmp_path))
    assert rows == [{"step": 1, "value": 3.0, "series": "train loss"}]
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert [p.name for p in run_folder.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert run_folder.kind(tmp_path) == "run"


def test_a_stopped_process_reports_the_graceful_stop(tmp_path):
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
              "print('re' + 'ady', flush=True)\n"
              "time.sleep(60)\n")
    from alpaca_lora.ui.process import _spawn

    run = TrainingRun(tmp_path, [sys.executable, "-c", script])
    run.process = _spawn(run.command, tmp_path / "train.log", append=False)
    deadline = time.monotonic() + 30
    while "ready" not in (tmp_path / "train.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.running and run.stop()
    assert run.process.wait(timeout=30) == 143
    assert run.status() == "stopped, checkpoint saved (exit status 143)"
    assert not run.stop()


def test_a_second_start_in_a_running_folder_is_refused(tmp_path):
    trainer = Trainer()
    run = TrainingRun(tmp_path, ["x"])
    run.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    trainer.runs[tmp_path] = run
    try:
        with pytest.raises(ConfigError, match="already training"):
            trainer.start("base", "data.json", tmp_path, {})
    finally:
        run.process.kill()
        run.process.wait()
