"""Faults injected into real training processes: SIGKILL at random moments and mid-save, SIGTERM, Ctrl-C.

Each fault hits ``python -m alpaca_lora finetune`` in a subprocess; afterwards the newest checkpoint
must be complete and loadable, and resuming must end with the same adapter (and loss curve) as a run
that was never interrupted.
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.train.checkpoint import latest_checkpoint
from alpaca_lora.train.recipe import finetune

pytestmark = pytest.mark.slow

RECORDS = [{"instruction": f"Spell the number {i}.", "input": "" if i % 2 else "digits", "output": f"number {i}"}
           for i in range(6)]
# Gradient accumulation 2, LoRA dropout on, 3 micro-batches per epoch (2 steps, the second partial).
# A constant learning rate makes the schedule independent of max_steps, so a run started with many
# steps and resumed with fewer follows exactly the run that went straight to the smaller count.
SETTINGS = dict(batch_size=4, micro_batch_size=2, learning_rate=5e-3, lr_scheduler="constant", warmup_ratio=0.0,
                lora_r=4, lora_alpha=8, lora_dropout=0.1, val_set_size=0, cutoff_len=64,
                gradient_checkpointing=False, logging_steps=1, save_total_limit=2,
                cpu_matmul="blas")  # "auto" times the backends per process: a loaded machine may pick either
TIMEOUT = 300


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-job")
    (folder / "data.json").write_text(json.dumps(RECORDS))
    FinetuneConfig(**SETTINGS).save(folder / "run.json")
    return folder


def _start(base, job, out, max_steps, save_steps, resume=False):
    cmd = [sys.executable, "-m", "alpaca_lora", "finetune", "--base_model", str(base), "--data",
           str(job / "data.json"), "--output_dir", str(out), "--config", str(job / "run.json"),
           "--max_steps", str(max_steps), "--save_steps", str(save_steps)]
    if resume:
        cmd += ["--resume_from_checkpoint", "true"]
    log = open(out.parent / f"{out.name}-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 - closed by _finish
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log


def _finish(proc, log):
    proc.wait(timeout=TIMEOUT)
    log.seek(0)
    text = log.read()
    log.close()
    return proc.returncode, text


def _wait_for(predicate, proc, what, poll=0.005):
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return True


def _logged_steps(out):
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _newest_step(out):
    newest = latest_checkpoint(out)
    return int(newest.name.split("-")[1]) if newest else 0


def _temp_folders(out):
    return [p for p in out.glob(".checkpoint-*") if ".tmp-" in p.name]


def _assert_loadable(folder):
    """Every file of a checkpoint parses: safetensors headers and data, JSON state."""
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == int(folder.name.split("-")[1])
    for name in ("adapter_model.safetensors", "optimizer.safetensors", "rng_state.safetensors"):
        assert load_file(str(folder / name)), name
    for name in ("optimizer.json", "scheduler.json", "rng_state.json", "adapter_config.json"):
        json.loads((folder / name).read_text())


def _reference(base, job, out, max_steps):
    """The uninterrupted run, in this process."""
    config = FinetuneConfig.from_file(job / "run.json")
    return finetune(base, str(job / "data.json"), out, config=config, max_steps=max_steps, save_steps=1000)


def _compare(resumed_out, reference_out):
    a = load_file(str(resumed_out / "adapter_model.safetensors"))
    b = load_file(str(reference_out / "adapter_model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)

    def curve(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    steps = [s for s, _ in curve(resumed_out)]
    assert steps == list(range(1, len(steps) + 1)), steps  # one record per step, none twice, none lost
    assert [s for s, _ in curve(reference_out)] == steps
    assert [v for _, v in curve(resumed_out)] == pytest.approx([v for _, v in curve(reference_out)], abs=1e-6)
    return diff


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_exits_and_resumes_to_the_uninterrupted_adapter(tiny_model_dir, job, tmp_path,
                                                                                   sig):
    out = tmp_path / "out"
    out.mkdir()
    proc, log = _start(tiny_model_dir, job, out, max_steps=10_000, save_steps=10_000)
    assert _wait_for(lambda: _logged_steps(out) >= 2, proc, "two training steps"), _finish(proc, log)[1][-3000:]
    proc.send_signal(sig)
    code, text = _finish(proc, log)
    assert code == 128 + sig, text[-3000:]
    stopped = latest_checkpoint(out)
    assert stopped is not None
    k = int(stopped.name.split("-")[1])
    _assert_loadable(stopped)
    assert f"training stopped by {sig.name} after step {k} of 10000" in text
    assert f"the state is saved in {stopped}" in text and "--resume_from_checkpoint true" in text
    assert "Traceback" not in text
    assert not _temp_folders(out)

    total = k + 2
    config = FinetuneConfig.from_file(job / "run.json")
    resumed = finetune(tiny_model_dir, str(job / "data.json"), out, config=config, max_steps=total,
                       save_steps=10_000, resume_from_checkpoint=True)
    reference = _reference(tiny_model_dir, job, tmp_path / "reference", total)
    diff = _compare(out, reference.adapter_dir)
    print(f"{sig.name} after step {k}, resumed to {total}: max abs adapter difference {diff:.1e}")
    assert resumed.steps == total and diff <= 1e-6


def test_sigkill_at_random_moments_and_mid_save_never_loses_a_checkpoint(tiny_model_dir, job, tmp_path):
    """Kill a run that checkpoints every step, again and again; resume each time; finish; compare.

    Odd kills land at a random moment after training progressed; even kills land the moment a
    checkpoint's temporary folder appears (mid-save).
    """
    total, kills_wanted = 24, 4
    rng = random.Random(7)
    out = tmp_path / "out"
    out.mkdir()
    kills = mid_save = 0
    while kills < kills_wanted:
        done = _newest_step(out)
        proc, log = _start(tiny_model_dir, job, out, total, save_steps=1, resume=done > 0)
        progressed = _wait_for(lambda d=done: _newest_step(out) > d, proc, "a new checkpoint")
        if progressed and kills % 2:
            time.sleep(rng.uniform(0.0, 0.4))
        elif progressed:
            _wait_for(lambda: bool(_temp_folders(out)), proc, "a checkpoint being written", poll=0.0005)
        if proc.poll() is not None:
            code, text = _finish(proc, log)
            assert code == 0, text[-3000:]
            pytest.fail(f"the run completed {total} steps before {kills_wanted} kills; raise total")
        proc.send_signal(signal.SIGKILL)
        code, text = _finish(proc, log)
        assert code == -signal.SIGKILL
        kills += 1
        mid_save += bool(_temp_folders(out))
        assert _newest_step(out) > done, text[-3000:]
        _assert_loadable(latest_checkpoint(out))
    reached = _newest_step(out)
    print(f"SIGKILL: {kills} kills, {mid_save} of them mid-save (a temp folder was left), "
          f"all survived; the last checkpoint reached step {reached} of {total}")
    assert mid_save >= 1
    config = FinetuneConfig.from_file(job / "run.json")
    resumed = finetune(tiny_model_dir, str(job / "data.json"), out, config=config, max_steps=total, save_steps=1,
                       resume_from_checkpoint=True)
    assert not _temp_folders(out) and resumed.steps == total
    reference = _reference(tiny_model_dir, job, tmp_path / "reference", total)
    diff = _compare(out, reference.adapter_dir)
    print(f"SIGKILL: resumed to step {total}: max abs adapter difference {diff:.1e}")
    assert diff <= 1e-6


def test_a_second_ctrl_c_aborts_at_once_without_saving(tiny_model_dir, tmp_path):
    """Long steps (32 micro-batches each) leave time for a second Ctrl-C while the step runs."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "data.json").write_text(json.dumps(RECORDS * 11))
    FinetuneConfig(**{**SETTINGS, "batch_size": 64, "micro_batch_size": 2}).save(job / "run.json")
    out = tmp_path / "out"
    out.mkdir()
    proc, log = _start(tiny_model_dir, job, out, max_steps=10_000, save_steps=10_000)
    assert _wait_for(lambda: _logged_steps(out) >= 1, proc, "a first step")
    proc.send_signal(signal.SIGINT)
    log_path = Path(log.name)
    assert _wait_for(lambda: "SIGINT received" in log_path.read_text(), proc, "the first Ctrl-C to be noted")
    proc.send_signal(signal.SIGINT)
    code, text = _finish(proc, log)
    assert code == 130, text[-3000:]
    assert "alpaca-lora: interrupted" in text and "training stopped by" not in text
    assert latest_checkpoint(out) is None and not _temp_folders(out)
