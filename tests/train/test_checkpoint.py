"""Checkpoints: atomic writes, rotation, leftovers of killed saves, a full disk, damaged folders."""

import errno
import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from alpaca_lora import FinetuneConfig
from alpaca_lora.errors import CheckpointError
from alpaca_lora.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_incomplete,
    save_checkpoint,
)
from conftest import lora_training_parts


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    """A full-precision tiny Llama with LoRA, AdamW after two steps and a scheduler."""
    return lora_training_parts(tiny_model_dir)


def _save(folder, step, parts, keep=3, model=None):
    model_, optimizer, scheduler = parts
    return save_checkpoint(folder, step, model or model_, optimizer, scheduler, {"step": step}, keep=keep)


def _adapter(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_round_trip_restores_adapter_optimizer_scheduler_and_rng(parts, tmp_path):
    model, optimizer, scheduler = parts
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    folder = _save(tmp_path, 2, parts)
    params = optimizer.param_groups[0]["params"]
    weights, moments = _adapter(model), [optimizer.state[p]["exp_avg"].clone() for p in params]
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    with torch.no_grad():  # disturb everything the checkpoint holds
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    for s in optimizer.state.values():
        s["exp_avg"].zero_()
    scheduler.step()
    assert load_checkpoint(folder, model, optimizer, scheduler) == {"step": 2}
    assert all(torch.equal(v, _adapter(model)[k]) for k, v in weights.items())
    assert all(torch.equal(a, optimizer.state[p]["exp_avg"]) for a, p in zip(moments, params, strict=True))
    assert all(float(m.abs().max()) > 0 for m in moments)
    assert scheduler.last_epoch == 2
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


def test_rotation_keeps_the_newest_and_resaving_a_step_replaces_it(parts, tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, parts, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    before = _digest(tmp_path / "checkpoint-4")
    _save(tmp_path, 4, parts, keep=2)
    assert _digest(tmp_path / "checkpoint-4") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]  # no leftovers


def test_leftovers_of_killed_saves_are_ignored_then_removed(parts, tmp_path):
    good = _save(tmp_path, 2, parts)
    # What a kill can leave: a half-written temp folder (even holding a state file), a folder
    # renamed for removal, a checkpoint without its state file, and names that are no checkpoint.
    (tmp_path / ".checkpoint-5.tmp-abc123").mkdir()
    (tmp_path / ".checkpoint-5.tmp-abc123" / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    shutil.copytree(good, tmp_path / ".checkpoint-6.tmp-zz")
    shutil.copytree(good, tmp_path / ".checkpoint-1.old-42")
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "adapter_model.safetensors").write_bytes(b"truncated")
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-12").write_text("a file, not a folder")
    assert latest_checkpoint(tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]
    removed = sorted(p.name for p in remove_incomplete(tmp_path))
    assert removed == [".checkpoint-1.old-42", ".checkpoint-5.tmp-abc123", ".checkpoint-6.tmp-zz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-2", "checkpoint-9",
                                                          "checkpoint-final"]


# How a full disk surfaces: Python's own writes raise OSError(ENOSPC); safetensors' writer raises
# SafetensorError with this text (seen on a real 400 KiB tmpfs).
DISK_FULL = [OSError(errno.ENOSPC, "No space left on device"),
             SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")]


class DiskFullModel:
    """A model whose adapter write fills the disk: it writes part of the file, then fails."""

    def __init__(self, error):
        self.error = error

    def named_parameters(self):
        return iter(())

    def save_pretrained(self, folder, **kwargs):
        (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 4096)
        raise self.error


@pytest.mark.parametrize("error", DISK_FULL, ids=["OSError", "SafetensorError"])
def test_full_disk_is_a_clear_error_and_keeps_the_last_good_checkpoint(parts, tmp_path, error):
    good = _save(tmp_path, 1, parts, keep=1)
    before = _digest(good)
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path, 2, parts, keep=1, model=DiskFullModel(error))
    message = str(info.value)
    assert str(tmp_path / "checkpoint-2") in message and "disk is full" in message
    assert "Free space" in message and "output_dir" in message and "resume_from_checkpoint=True" in message
    assert f"the last good checkpoint, {good}, is kept" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no partial temp folder left
    assert _digest(good) == before and latest_checkpoint(tmp_path) == good
    model, optimizer, scheduler = parts
    assert load_checkpoint(good, model, optimizer, scheduler) == {"step": 1}


def test_full_disk_on_the_first_checkpoint_says_none_is_kept(parts, tmp_path):
    with pytest.raises(CheckpointError, match="no earlier checkpoint exists"):
        _save(tmp_path, 1, parts, model=DiskFullModel(DISK_FULL[0]))
    assert list(tmp_path.iterdir()) == []


def test_damaged_or_incomplete_checkpoints_are_refused_by_name(parts, tmp_path):
    model, optimizer, scheduler = parts
    folder = _save(tmp_path, 3, parts)
    data = (folder / "optimizer.safetensors").read_bytes()
    (folder / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint-3/optimizer\.safetensors.*damaged"):
        load_checkpoint(folder, model, optimizer, scheduler)
    (folder / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(folder, model, optimizer, scheduler)
    assert json.loads((_save(tmp_path, 4, parts) / "trainer_state.json").read_text()) == {"step": 4}


def test_resume_accepts_a_changed_backend_but_not_a_changed_recipe(tmp_path):
    from alpaca_lora.train.checkpoint import check_compatible

    fingerprint = {"base_model": {"config_sha256": "a"}, "data": {"sha256": "d"}}
    saved = {"config": FinetuneConfig(cpu_matmul="auto").to_dict(), "fingerprint": fingerprint}
    # the matmul backend, the device and the step budget change how fast, not what is trained
    cfg = FinetuneConfig(cpu_matmul="blas", max_steps=99)
    check_compatible(saved, cfg, fingerprint, tmp_path)
    with pytest.raises(CheckpointError, match="lora_r: 16 -> 8"):
        check_compatible(saved, FinetuneConfig(lora_r=8), fingerprint, tmp_path)
    other_data = {**fingerprint, "data": {"sha256": "e"}}
    with pytest.raises(CheckpointError, match="training data differs"):
        check_compatible(saved, cfg, other_data, tmp_path)
