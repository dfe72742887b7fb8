"""End to end: a real 4-bit fine-tune of a tiny Llama on a memorizable set."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from alpaca_lora import ConfigError, DataError, FinetuneConfig
from alpaca_lora.export.layout import pickle_files
from alpaca_lora.kernels.cross_entropy import token_losses_sum
from alpaca_lora.train.recipe import finetune
from conftest import SHORT_RECORDS

RECORDS = SHORT_RECORDS
FAST = dict(batch_size=8, micro_batch_size=4, learning_rate=2e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
            val_set_size=0, warmup_ratio=0.0, cutoff_len=64, gradient_checkpointing=False, save_steps=1000)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = finetune(tiny_model_dir, RECORDS, out, max_steps=40, **FAST)
    return result, out


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_loss_falls_below_half_its_start(trained):
    result, out = trained
    losses = _losses(out)
    print(f"loss start {losses[0]:.3f} end {losses[-1]:.3f}")
    assert len(losses) == 40 and result.steps == 40
    assert losses[-1] < 0.5 * losses[0]
    assert result.train_loss < 0.5 * losses[0]


def test_output_folder_is_self_describing_and_pickle_free(trained):
    result, out = trained
    names = {p.name for p in out.iterdir()}
    for required in ("adapter_model.safetensors", "adapter_config.json", "prompt_template.json",
                     "finetune_config.json", "fingerprint.json", "train_results.json", "metrics.jsonl",
                     "loss.png", "tokenizer.json"):
        assert required in names, required
    assert pickle_files(out) == []
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["data"]["num_records"] == len(RECORDS) and len(fp["data"]["sha256"]) == 64
    assert fp["base_model"]["architecture"]["hidden_size"] == 64 and fp["base_model"]["shapes_sha256"]
    saved = FinetuneConfig.from_file(out / "finetune_config.json")
    assert saved.max_steps == 40 and saved.lora_r == 8
    assert result.adapter_dir == out and result.runtime_s > 0 and result.eval_loss is None


def test_tokens_seen_counts_non_padding_tokens(trained):
    result, _ = trained
    # 40 steps x 8 records: every record is seen 40 times, so tokens_seen is 40 x their total length.
    from alpaca_lora.data.pipeline import prepare_dataset
    from alpaca_lora.data.prepare import load_instructions
    from alpaca_lora.model.load import load_tokenizer

    ds, _ = prepare_dataset(load_instructions(RECORDS), load_tokenizer(result.adapter_dir), cutoff_len=64)
    assert result.tokens_seen == 40 * sum(ds["length"])


def test_saved_adapter_is_nonempty_and_reproduces_trained_logits(trained, tiny_model_dir):
    result, out = trained
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert len(weights) == 2 * 4 * 2  # (A, B) x (q, k, v, o) x 2 layers
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)
    from alpaca_lora.model.load import load_model

    base, tok = load_model(tiny_model_dir, "nf4", "float32", device="cpu")
    model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([tok("### Instruction:\nCapital of Italy?").input_ids])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-2  # the adapter changes the model
    # A second load gives the same logits (the adapter file fully determines the model).
    base2, _ = load_model(tiny_model_dir, "nf4", "float32", device="cpu")
    again = PeftModel.from_pretrained(base2, out).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, adapted, atol=1e-5)


def test_trained_model_loss_matches_logged_loss(trained, tiny_model_dir):
    """The reloaded adapter scores the training set as well as training ended (same weights)."""
    result, out = trained
    from alpaca_lora.data.collator import InstructionCollator
    from alpaca_lora.data.pipeline import prepare_dataset
    from alpaca_lora.data.prepare import load_instructions
    from alpaca_lora.model.load import load_model

    base, tok = load_model(tiny_model_dir, "nf4", "float32", device="cpu")
    model = PeftModel.from_pretrained(base, out).eval()
    ds, _ = prepare_dataset(load_instructions(RECORDS), tok, cutoff_len=64)
    batch = InstructionCollator(tok)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        total, n = token_losses_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert float(total / n) < 0.5 * _losses(out)[0]


def test_eval_split_is_evaluated(tiny_model_dir, tmp_path):
    records = RECORDS * 3
    result = finetune(tiny_model_dir, records, tmp_path, max_steps=3, **{**FAST, "val_set_size": 4}, eval_steps=1)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]
    assert result.eval_loss == pytest.approx(evals[-1]["eval_loss"])


def test_unknown_override_lists_close_matches(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="lora_r") as info:
        finetune(tiny_model_dir, RECORDS, tmp_path, lora_rank=8)
    assert isinstance(info.value, TypeError)


def test_all_records_dropped_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    from alpaca_lora.train import setup as train

    def boom(*args, **kwargs):
        raise AssertionError("the model must not load when no record is trainable")

    monkeypatch.setattr(train, "load_base", boom)
    with pytest.raises(DataError, match="cutoff_len"):
        finetune(tiny_model_dir, RECORDS, tmp_path, cutoff_len=8, val_set_size=0)


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    """Stop at step 3, resume to 6: same adapter as 6 straight steps (dropout on)."""
    settings = {**FAST, "lora_dropout": 0.1, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 5e-3,
                "save_steps": 3}
    full = finetune(tiny_model_dir, RECORDS, tmp_path / "full", max_steps=6, **settings)
    finetune(tiny_model_dir, RECORDS, tmp_path / "split", max_steps=6, **settings)
    # Simulate an interrupted run: keep only the step-3 checkpoint and resume from it.
    split = tmp_path / "split"
    assert (split / "checkpoint-3").is_dir()
    resumed = finetune(tiny_model_dir, RECORDS, split, max_steps=6, resume_from_checkpoint=True, **settings)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resume max abs diff {diff:.2e}")
    assert diff <= 1e-6
    assert _losses(tmp_path / "full") == pytest.approx(_losses(split), abs=1e-6)


def test_evaluation_does_not_change_training(tiny_model_dir, tmp_path):
    """Evaluating every step must leave the trained adapter exactly as without evaluation.

    (bitsandbytes repacks 4-bit weights in place on an eval-mode forward on the CPU; the trainer
    must never put the quantized layers in eval mode.)
    """
    records = RECORDS * 2
    settings = {**FAST, "val_set_size": 4, "max_steps": 4}
    a = finetune(tiny_model_dir, records, tmp_path / "eval-each-step", eval_steps=1, **settings)
    b = finetune(tiny_model_dir, records, tmp_path / "eval-at-end", eval_steps=1000, **settings)
    wa = load_file(str(a.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(b.adapter_dir / "adapter_model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) == 0.0
    assert _losses(tmp_path / "eval-each-step") == _losses(tmp_path / "eval-at-end")


def test_reloaded_adapter_reproduces_the_trained_model(tiny_model_dir, tmp_path):
    """The final eval loss is computed by the in-memory trained model; a reload must give the same number."""
    from alpaca_lora.data.collator import InstructionCollator
    from alpaca_lora.data.pipeline import prepare_dataset
    from alpaca_lora.data.prepare import load_instructions, split_dataset
    from alpaca_lora.model.load import load_model

    records = RECORDS * 2
    result = finetune(tiny_model_dir, records, tmp_path, max_steps=6,
                      **{**FAST, "val_set_size": 4, "compute_dtype": "float32"})  # reloaded in fp32 below
    base, tok = load_model(tiny_model_dir, "nf4", "float32", device="cpu")
    model = PeftModel.from_pretrained(base, tmp_path)
    model.train()  # same 4-bit code path as training (no dropout: lora_dropout=0)
    _, val = split_dataset(load_instructions(records), 4, FAST.get("seed", 42))
    ds, _ = prepare_dataset(val, tok, cutoff_len=64)
    batch = InstructionCollator(tok)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        total, n = token_losses_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert float(total / n) == pytest.approx(result.eval_loss, abs=1e-5)


def test_tensorboard_reporter_writes_events(tiny_model_dir, tmp_path):
    finetune(tiny_model_dir, RECORDS, tmp_path, max_steps=2, report_to="tensorboard", **FAST)
    events = list((tmp_path / "runs").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_a_run_reads_the_tokenizer_once(tiny_model_dir, tmp_path, monkeypatch):
    """The data needs the tokenizer before the model loads; the model load reuses it rather than reading it again."""
    from alpaca_lora.model import load as load_module
    from alpaca_lora.train import setup as setup_module

    calls = []

    def counted(real):
        def wrapper(*args, **kwargs):
            calls.append(args[0])
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(setup_module, "load_tokenizer", counted(setup_module.load_tokenizer))
    monkeypatch.setattr(load_module, "load_tokenizer", counted(load_module.load_tokenizer))
    result = finetune(tiny_model_dir, RECORDS, tmp_path / "out", max_steps=1, **FAST)
    # The base's tokenizer is read once; the saved one is read back once to check its chat template.
    base_reads = [c for c in calls if Path(c) == Path(tiny_model_dir)]
    assert result.steps == 1 and len(base_reads) == 1 and len(calls) == 2, calls
