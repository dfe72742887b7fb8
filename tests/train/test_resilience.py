"""finetune() under trouble: divergence, resume by path, refused resumes, signal handlers after a run."""

import json
import math
import signal

import pytest
from safetensors.torch import load_file

from alpaca_lora import CheckpointError, TrainingDiverged
from alpaca_lora.train.recipe import finetune
from conftest import SHORT_RECORDS

RECORDS = SHORT_RECORDS[:6]
# Gradient accumulation 2 (batch 4 of micro-batches of 2), LoRA dropout on, 6 records: an epoch is
# 2 steps, so step 3 stops in the middle of the second epoch.
SETTINGS = dict(batch_size=4, micro_batch_size=2, learning_rate=5e-3, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                val_set_size=0, warmup_ratio=0.0, cutoff_len=48, gradient_checkpointing=False, logging_steps=1)


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def foreign_handlers():
    """Handlers a host (a notebook kernel) had installed before calling finetune()."""

    def host_handler(signum, frame):
        raise AssertionError("the host's handler ran during finetune()")

    old = {s: signal.signal(s, host_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    yield host_handler
    for s, h in old.items():
        signal.signal(s, h)


@pytest.fixture(scope="module")
def run4(tiny_model_dir, tmp_path_factory):
    """Four steps with a checkpoint after every step (checkpoint-2 and -3 remain)."""
    out = tmp_path_factory.mktemp("run4")
    finetune(tiny_model_dir, RECORDS, out, max_steps=4, save_steps=1, **SETTINGS)
    return out


def test_resume_from_a_path_mid_epoch_equals_the_uninterrupted_run(run4, tiny_model_dir, tmp_path,
                                                                   foreign_handlers):
    import shutil

    shutil.copytree(run4 / "checkpoint-3", tmp_path / "checkpoint-3")
    resumed = finetune(tiny_model_dir, RECORDS, tmp_path, max_steps=4, save_steps=1,
                       resume_from_checkpoint=tmp_path / "checkpoint-3", **SETTINGS)
    diff = _max_diff(_adapter(run4), _adapter(resumed.adapter_dir))
    print(f"resume from a path at step 3 of 4: max abs adapter difference {diff:.1e}")
    assert diff <= 1e-6 and resumed.steps == 4
    # The resumed curve holds the uninterrupted run's step 4 (steps 1-3 were logged by that run).
    full = {r["step"]: r["loss"] for r in _metrics(run4) if "loss" in r}
    assert [r["loss"] for r in _metrics(tmp_path) if "loss" in r] == pytest.approx([full[4]], abs=1e-6)
    # finetune() gives the host its signal handlers back.
    assert signal.getsignal(signal.SIGINT) is foreign_handlers
    assert signal.getsignal(signal.SIGTERM) is foreign_handlers


@pytest.mark.parametrize("change, needle", [
    ({"lora_r": 8, "lora_alpha": 16}, "lora_r: 4 -> 8"),
    ({"learning_rate": 1e-3}, "learning_rate: 0.005 -> 0.001"),
    ({"data": RECORDS[:5]}, "the training data differs"),
])
def test_resume_with_other_settings_or_data_is_refused(run4, tiny_model_dir, tmp_path, change, needle):
    import shutil

    shutil.copytree(run4 / "checkpoint-3", tmp_path / "checkpoint-3")
    change = dict(change)
    data = change.pop("data", RECORDS)
    with pytest.raises(CheckpointError, match="checkpoint-3") as info:
        finetune(tiny_model_dir, data, tmp_path, max_steps=4, resume_from_checkpoint=True,
                 **{**SETTINGS, **change})
    assert needle in str(info.value)


def test_resume_on_another_base_is_refused(run4, other_model_dir, tmp_path):
    import shutil

    shutil.copytree(run4 / "checkpoint-3", tmp_path / "out" / "checkpoint-3")
    with pytest.raises(CheckpointError, match="belongs to another run") as info:
        finetune(other_model_dir, RECORDS, tmp_path / "out", max_steps=4, resume_from_checkpoint=True, **SETTINGS)
    assert "intermediate_size" in str(info.value)


def test_resume_without_a_checkpoint_says_what_to_do(tiny_model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        finetune(tiny_model_dir, RECORDS, tmp_path, max_steps=2, resume_from_checkpoint=True, **SETTINGS)
    with pytest.raises(CheckpointError, match="does not exist"):
        finetune(tiny_model_dir, RECORDS, tmp_path, max_steps=2, resume_from_checkpoint=str(tmp_path / "nope"),
                 **SETTINGS)


def test_divergence_stops_with_the_last_good_state_and_a_visible_nan(tiny_model_dir, tmp_path, foreign_handlers):
    """lr=1e30: step 1 is finite, then the LoRA product overflows and the loss is NaN or inf."""
    huge = {**SETTINGS, "learning_rate": 1e30, "lora_dropout": 0.0}
    with pytest.raises(TrainingDiverged) as info:
        finetune(tiny_model_dir, RECORDS, tmp_path / "diverged", max_steps=10, save_steps=100, **huge)
    error = info.value
    message = str(error)
    print(message)
    assert error.step == 2 and "at step 2" in message and "not applied" in message
    assert "learning_rate" in message and "max_grad_norm" in message and "bfloat16" in message
    assert error.checkpoint == tmp_path / "diverged" / "checkpoint-1" and str(error.checkpoint) in message
    # The saved state is step 1 exactly, not weights touched by the bad step: it equals a 1-step run.
    one_step = finetune(tiny_model_dir, RECORDS, tmp_path / "one-step", max_steps=1, **huge)
    saved = _adapter(error.checkpoint)
    assert _max_diff(saved, _adapter(one_step.adapter_dir)) == 0.0
    assert all(bool(t.isfinite().all()) for t in saved.values())
    moments = load_file(str(error.checkpoint / "optimizer.safetensors"))
    assert moments and all(bool(t.isfinite().all()) for t in moments.values())
    # The metrics show the bad step as text (JSON has no NaN), never as a silently dropped value.
    rows = _metrics(tmp_path / "diverged")
    bad = [r for r in rows if r.get("diverged")]
    assert len(bad) == 1 and bad[0]["step"] == 2 and bad[0]["loss"] in ("nan", "inf", "-inf")
    assert not math.isfinite(float(bad[0]["loss"]))
    assert signal.getsignal(signal.SIGTERM) is foreign_handlers


def test_divergence_at_the_first_step_saves_nothing(tiny_model_dir, tmp_path):
    """A base holding an infinite weight (a broken conversion) gives a NaN loss at once: nothing to keep."""
    import shutil

    import torch
    from safetensors.torch import save_file

    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][0] = float("inf")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(TrainingDiverged, match="at step 1") as info:
        finetune(broken, RECORDS, tmp_path / "out", max_steps=3, save_steps=1, **SETTINGS)
    assert "no step had completed" in str(info.value) and "base model" in str(info.value)
    assert info.value.checkpoint is None and not list((tmp_path / "out").glob("checkpoint-*"))
    assert torch.isinf(weights["model.norm.weight"][0])
