import pytest
import torch

from alpaca_lora import ConfigError, FinetuneConfig, ModelError
from alpaca_lora.model import (
    attach_lora,
    load_model,
    load_tokenizer,
    resolve_compute_dtype,
    resolve_target_modules,
)


def test_nf4_double_quant_base_has_real_4bit_layers(tiny_model_dir):
    import bitsandbytes as bnb

    model, tok = load_model(tiny_model_dir, "nf4", "float32", device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantization
    assert tok.padding_side == "right" and tok.pad_token_id is not None


def test_full_precision_and_attention_targets(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, None, "float32", device="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert resolve_target_modules(model, "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft_model = attach_lora(model, FinetuneConfig(lora_r=4, lora_target_modules="all-linear"))
    names = {n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {"q_proj", "gate_proj", "down_proj"} <= names
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_lora_attaches_only_to_attention_by_default(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, "nf4", "float32", device="cpu")
    peft_model = attach_lora(model, FinetuneConfig(lora_r=4))
    targets = {n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_unknown_target_lists_existing_modules(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, "nf4", "float32", device="cpu")
    with pytest.raises(ModelError, match="q_proj") as info:
        attach_lora(model, FinetuneConfig(lora_target_modules=["query_key_value"]))
    assert "query_key_value" in str(info.value)


def test_cpu_auto_dtype_is_fp32_without_native_bf16(monkeypatch):
    from alpaca_lora import model as model_module

    model_module.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError):
        resolve_compute_dtype("float8", torch.device("cpu"))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(tmp_path / "nope")


def test_tokenizer_pad_falls_back_without_breaking_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_setup_leaves_the_4bit_model_trainable_after_a_no_grad_probe(tiny_model_dir, tmp_path):
    """A no-grad forward right after setup() must not repack 4-bit weights for inference-only kernels."""
    from alpaca_lora import FinetuneConfig
    from alpaca_lora.train import batch_loss, setup

    records = [{"instruction": "Say hi", "input": "", "output": "hi"}] * 4
    run = setup(tiny_model_dir, records, tmp_path, FinetuneConfig(val_set_size=0, max_steps=1, cutoff_len=96))
    with torch.no_grad():
        batch_loss(run, run.collator([run.train_set[i] for i in range(2)]))
    layers = [m for m in run.model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and all(m.training for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    run.metrics.close()
