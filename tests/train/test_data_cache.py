"""finetune reuses tokenized data across runs and resumes, never a stale table, and trains on the same rows."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from alpaca_lora import finetune
from alpaca_lora.config import FinetuneConfig
from alpaca_lora.data.token_cache import list_cache
from alpaca_lora.train.setup import setup
from conftest import SHORT_RECORDS

FAST = dict(batch_size=4, micro_batch_size=2, learning_rate=2e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
            val_set_size=2, warmup_ratio=0.0, cutoff_len=64, gradient_checkpointing=False, save_steps=1000,
            quantization=None, compute_dtype="float32")


def _rows(ds):
    return [ds[i] for i in range(len(ds))]


def test_a_second_run_reuses_the_table_and_a_changed_setting_does_not(tiny_model_dir, tmp_path, shared_data):
    data = tmp_path / "data.jsonl"
    records = json.loads((shared_data / "gsm8k_train_alpaca.json").read_text(encoding="utf-8"))[:40]
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = FinetuneConfig(**{**FAST, "cutoff_len": 256}, data_cache_dir=str(tmp_path / "cache"))
    first = setup(tiny_model_dir, data, tmp_path / "a", cfg)
    again = setup(tiny_model_dir, data, tmp_path / "b", cfg)
    uncached = setup(tiny_model_dir, data, tmp_path / "c", cfg.replace(data_cache_dir=None))
    assert not first.data_cache_hit and again.data_cache_hit and not uncached.data_cache_hit
    for run in (again, uncached):  # the same training and validation rows, in the same order
        assert _rows(run.train_set) == _rows(first.train_set) and _rows(run.val_set) == _rows(first.val_set)
        assert run.report == first.report and run.fingerprint["data"] == first.fingerprint["data"]
    for change in (dict(cutoff_len=200), dict(template="alpaca_short"), dict(train_on_inputs=True),
                   dict(add_eos_token=False)):
        other = setup(tiny_model_dir, data, tmp_path / "d", cfg.replace(**change))
        assert not other.data_cache_hit, change
        assert _rows(other.train_set) != _rows(first.train_set), change
    assert len(list_cache(tmp_path / "cache" / "tokenized")) == 5
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]), encoding="utf-8")  # the data changed
    assert not setup(tiny_model_dir, data, tmp_path / "e", cfg).data_cache_hit


@pytest.mark.parametrize("records", [SHORT_RECORDS, [{"messages": [{"role": "user", "content": f"Say {w}"},
                                                                   {"role": "assistant", "content": w}]}
                                                     for w in "abcdefgh"]], ids=["alpaca", "chat"])
def test_cached_training_equals_uncached_and_a_resume_reuses_the_table(tiny_model_dir, tmp_path, records):
    settings = {**FAST, "val_set_size": 0, "save_steps": 2, "data_cache_dir": str(tmp_path / "cache")}
    cold = finetune(tiny_model_dir, records, tmp_path / "cold", max_steps=4, **settings)
    warm = finetune(tiny_model_dir, records, tmp_path / "warm", max_steps=4, **settings)
    plain = finetune(tiny_model_dir, records, tmp_path / "plain", max_steps=4, **{**settings, "data_cache_dir": None})
    a, b, c = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (cold, warm, plain))
    assert all(bool((a[k] == b[k]).all()) and bool((a[k] == c[k]).all()) for k in a)
    cfg = FinetuneConfig(**{**settings, "max_steps": 4, "resume_from_checkpoint": str(tmp_path / "cold" /
                                                                                     "checkpoint-2")})
    assert setup(tiny_model_dir, records, tmp_path / "cold", cfg).data_cache_hit
