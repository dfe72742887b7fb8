"""Hostile runs and checkpoints: updates that break the weights, damaged or tampered checkpoints, bad output folders.

No state that is not good may be written or called good: a run whose update makes a LoRA weight NaN or
infinite stops at that step, writes nothing of it and names the newest checkpoint on disk (which is
finite); a checkpoint with non-finite values, tampered optimizer / scheduler / RNG state or damaged
files is refused by name before anything is restored. A fuzzer damages real checkpoints file by file.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from alpaca_lora import CheckpointError, ConfigError, FinetuneConfig, TrainingDiverged
from alpaca_lora.files import non_finite
from alpaca_lora.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from alpaca_lora.train.recipe import finetune, fit
from alpaca_lora.train.setup import setup
from conftest import SHORT_RECORDS, InputTally, lora_training_parts

RECORDS = SHORT_RECORDS[:6]
SETTINGS = dict(batch_size=2, micro_batch_size=2, learning_rate=5e-3, lora_r=4, lora_alpha=8, val_set_size=0,
                warmup_ratio=0.0, cutoff_len=48, gradient_checkpointing=False, compute_dtype="float32")
_count = InputTally("hostile run/checkpoint inputs tried")


def _finite_folder(folder) -> bool:
    return not non_finite(load_file(str(folder / "adapter_model.safetensors")))


# ---- updates that break the weights ------------------------------------------------------------------


@pytest.mark.parametrize("setting", [{"learning_rate": 1e10, "weight_decay": 1e30},
                                     {"weight_decay": 1e38, "learning_rate": 10.0}],
                         ids=["learning_rate", "weight_decay"])
def test_an_update_that_makes_weights_non_finite_stops_at_once_and_keeps_nothing(tiny_model_dir, tmp_path,
                                                                                   setting):
    _count("absurd optimizer setting")
    out = tmp_path / "run"
    settings = {**SETTINGS, **setting}
    with pytest.raises(TrainingDiverged) as info:
        finetune(tiny_model_dir, RECORDS, out, max_steps=4, save_steps=1, **settings)
    assert info.value.step == 1 and info.value.checkpoint is None
    message = str(info.value)
    assert "NaN or infinite" in message and "lora_" in message and "nothing of this run is kept" in message
    assert not (out / "adapter_model.safetensors").exists() and list_checkpoints(out) == []
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["diverged"] is True and last["non_finite_weights"] > 0 and math.isfinite(last["loss"])


def test_a_broken_update_after_checkpoints_names_the_last_finite_one(tiny_model_dir, tmp_path):
    _count("absurd optimizer setting")
    out = tmp_path / "run"
    cfg = FinetuneConfig(max_steps=4, save_steps=1, **SETTINGS)
    run = setup(tiny_model_dir, RECORDS, out, cfg)
    run.total_steps = 2
    fit(run)  # two good steps, checkpoint-1 (checkpoint-2 is the end: fit saves none there)
    run.total_steps = 4
    for group in run.optimizer.param_groups:  # from step 3 on, an update no float32 weight survives
        group.update(lr=1e10, weight_decay=1e30)
    run.scheduler.base_lrs = [1e10] * len(run.scheduler.base_lrs)
    with pytest.raises(TrainingDiverged) as info:
        fit(run)
    run.metrics.close()
    assert info.value.step == 3
    assert info.value.checkpoint == out / "checkpoint-1" and _finite_folder(out / "checkpoint-1")
    assert all(_finite_folder(c) for c in list_checkpoints(out))  # nothing non-finite was written
    assert str(out / "checkpoint-1") in str(info.value)


def test_save_checkpoint_refuses_non_finite_weights(tiny_model_dir, tmp_path):
    _count("non-finite state at save")
    model, optimizer, scheduler = lora_training_parts(tiny_model_dir)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="refusing to write .*NaN or infinite"):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 1}, keep=2)
    assert list(tmp_path.iterdir()) == []


# ---- output folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "inside_file"])
def test_an_output_dir_that_is_a_file_fails_before_the_model_loads(tiny_model_dir, tmp_path, where, monkeypatch):
    _count("output_dir")
    (tmp_path / "taken").write_text("not a folder")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before output_dir was checked")

    monkeypatch.setattr("alpaca_lora.train.setup.load_base", must_not_load)
    monkeypatch.setattr("alpaca_lora.train.setup.load_tokenizer", must_not_load)
    with pytest.raises(ConfigError, match="a file, not a folder"):
        finetune(tiny_model_dir, RECORDS, out, max_steps=1, **SETTINGS)


# ---- checkpoints -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A checkpoint of a tiny LoRA model after two AdamW steps, and the parts that wrote it."""
    parts = lora_training_parts(tiny_model_dir)
    folder = save_checkpoint(tmp_path_factory.mktemp("ckpt"), 2, *parts, {"step": 2}, keep=2)
    return folder, parts


def _snapshot(parts):
    model, optimizer, scheduler = parts
    adapter = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    moments = {(i, k): v.clone() for i, s in optimizer.state_dict()["state"].items()
               for k, v in s.items() if isinstance(v, torch.Tensor)}
    return adapter, moments, json.dumps(scheduler.state_dict(), default=str), torch.get_rng_state().clone()


def _same(a, b) -> bool:
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
            and a[2] == b[2] and torch.equal(a[3], b[3]))


def _refused_untouched(folder, parts, match=None):
    before = _snapshot(parts)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(folder, *parts)
    assert _same(before, _snapshot(parts)), "a refused checkpoint changed the model, optimizer or scheduler"


def _copy(saved, tmp_path):
    folder, parts = saved
    return shutil.copytree(folder, tmp_path / folder.name), parts


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_values_is_refused(saved, tmp_path, file, value):
    _count("non-finite checkpoint")
    folder, parts = _copy(saved, tmp_path)
    tensors = load_file(str(folder / file))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().reshape(-1)
    tensors[name][0] = value
    tensors[name] = tensors[name].reshape(load_file(str(folder / file))[name].shape)
    save_file(tensors, str(folder / file))
    _refused_untouched(folder, parts, "NaN or infinite values")


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


TAMPERED = {
    "optimizer lr is text": ("optimizer.json", lambda d: d["param_groups"][0].update(lr="fast")),
    "optimizer lr is NaN": ("optimizer.json", lambda d: d["param_groups"][0].update(lr=float("nan"))),
    "optimizer betas shortened": ("optimizer.json", lambda d: d["param_groups"][0].update(betas=[0.9])),
    "optimizer group dropped": ("optimizer.json", lambda d: d.update(param_groups=[])),
    "optimizer params renumbered": ("optimizer.json", lambda d: d["param_groups"][0].update(params=[0])),
    "optimizer scalars a list": ("optimizer.json", lambda d: d.update(scalars=[1, 2])),
    "scheduler last_epoch text": ("scheduler.json", lambda d: d.update(last_epoch="x")),
    "scheduler base_lrs lengthened": ("scheduler.json", lambda d: d.update(base_lrs=d["base_lrs"] * 3)),
    "scheduler base_lrs inf": ("scheduler.json", lambda d: d.update(base_lrs=[float("inf")] * len(d["base_lrs"]))),
    "rng python state cut": ("rng_state.json", lambda d: d["python"][1].__delitem__(slice(10, None))),
    "rng python word too big": ("rng_state.json", lambda d: d["python"][1].__setitem__(0, 2**40)),
    "rng numpy name": ("rng_state.json", lambda d: d["numpy"].__setitem__(0, "PCG64")),
    "rng numpy position": ("rng_state.json", lambda d: d["numpy"].__setitem__(1, 10**6)),
    "trainer step text": ("trainer_state.json", lambda d: d.update(step="two")),
    "trainer step negative": ("trainer_state.json", lambda d: d.update(step=-1)),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_optimizer_scheduler_rng_or_trainer_state_is_refused_by_name(saved, tmp_path, case):
    _count("tampered state")
    folder, parts = _copy(saved, tmp_path)
    file, change = TAMPERED[case]
    _edit_json(folder / file, change)
    _refused_untouched(folder, parts, "checkpoint")


@pytest.mark.parametrize("case", ["moment reshaped", "moment for a parameter that does not exist", "rng cpu cut",
                                  "numpy keys cut", "adapter tensor reshaped"])
def test_tampered_checkpoint_tensors_are_refused_by_name(saved, tmp_path, case):
    _count("tampered state")
    folder, parts = _copy(saved, tmp_path)
    file = {"rng cpu cut": "rng_state.safetensors", "numpy keys cut": "rng_state.safetensors",
            "adapter tensor reshaped": "adapter_model.safetensors"}.get(case, "optimizer.safetensors")
    tensors = load_file(str(folder / file))
    if case == "moment reshaped":
        name = next(k for k in sorted(tensors) if k.endswith("exp_avg"))
        tensors[name] = torch.zeros(3, 5)
    elif case == "moment for a parameter that does not exist":
        tensors["999.exp_avg"] = torch.zeros(2)
    elif case == "rng cpu cut":
        tensors["torch_cpu"] = tensors["torch_cpu"][:100].clone()
    elif case == "numpy keys cut":
        tensors["numpy_keys"] = tensors["numpy_keys"][:5].clone()
    else:
        name = sorted(tensors)[0]
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[-1])
    save_file(tensors, str(folder / file))
    _refused_untouched(folder, parts)


def test_a_checkpoint_state_file_of_the_wrong_json_type_is_refused(saved, tmp_path):
    _count("tampered state")
    folder, parts = _copy(saved, tmp_path)
    (folder / "trainer_state.json").write_text("[1, 2, 3]")
    _refused_untouched(folder, parts, "trainer_state.json holds .* where a JSON object was expected")


def _damage(path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["truncate", "flip", "header length", "empty", "json junk"])
    if kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(data), 200) if path.suffix == ".safetensors" else len(data))
            data[i] = rng.randrange(256)
    elif kind == "header length" and path.suffix == ".safetensors":
        data[:8] = struct.pack("<Q", rng.choice([0, 1, len(data), 2**63, rng.randrange(2**32)]))
    elif kind == "empty":
        data = bytearray()
    else:
        junk = rng.choice(["null", "1", '"x"', "[]", "{}", '{"step": 2}', "{" * 5000, "\xff\xfe"])
        data = bytearray(junk.encode("utf-8", "surrogateescape"))
    path.write_bytes(bytes(data))
    return kind


@pytest.mark.parametrize("seed", range(40))
def test_fuzzed_checkpoints_load_or_are_refused_without_changing_anything(saved, tmp_path, seed):
    rng = random.Random(seed)
    folder, parts = _copy(saved, tmp_path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "README.md")
    target = rng.choice(files)
    kind = _damage(target, rng)
    _count(f"fuzzed checkpoint file ({kind})")
    before = _snapshot(parts)
    try:
        state = load_checkpoint(folder, *parts)
    except CheckpointError as exc:
        assert len(str(exc)) < 2000 and str(folder) in str(exc)
        assert _same(before, _snapshot(parts))
        return
    assert isinstance(state, dict) and isinstance(state["step"], int)  # a harmless change (e.g. a JSON space)
    # Restore the parts for the next case: load the pristine checkpoint back.
    load_checkpoint(saved[0], *parts)
