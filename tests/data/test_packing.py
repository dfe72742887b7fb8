"""Padding-free packing: a packed micro-batch gives the same loss and gradients as the padded one."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from alpaca_lora import ConfigError
from alpaca_lora.data.collator import InstructionCollator
from alpaca_lora.data.packing import (
    PACKED_ATTENTION,
    PackedCollator,
    attention_kind,
    batch_tokens,
    body_kwargs,
)
from alpaca_lora.kernels.cross_entropy import token_losses_sum
from alpaca_lora.kernels.packed_attention import use_packed_attention
from alpaca_lora.train.recipe import finetune

FEATURES = [
    {"input_ids": [5, 6, 7, 2], "labels": [-100, -100, 7, 2], "attention_mask": [1, 1, 1, 1]},
    {"input_ids": [9, 2], "labels": [9, 2], "attention_mask": [1, 1]},  # train_on_inputs: first label set
    {"input_ids": [3, 4, 8, 8, 1, 2], "labels": [-100, 4, 8, 8, 1, 2], "attention_mask": [1] * 6},
]


class _Tok:
    pad_token_id = 2
    eos_token_id = 2


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config)


def test_packed_batch_layout_matches_the_docstring_example():
    features = [{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]}, {"input_ids": [7, 2], "labels": [7, 2]}]
    batch = PackedCollator()(features)
    assert batch["input_ids"].tolist() == [[5, 6, 2, 7, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 2, -100, 2]]
    assert batch["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5]
    assert batch_tokens(batch) == 5


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_ATTENTION])
def test_packed_loss_and_gradients_equal_padded(attn):
    model = _model("sdpa" if attn == PACKED_ATTENTION else attn)
    if attn == PACKED_ATTENTION:
        assert use_packed_attention(model) and model.config._attn_implementation == PACKED_ATTENTION
    padded = InstructionCollator(_Tok(), pad_to_multiple_of=8)(FEATURES)
    packed = PackedCollator(attention_kind(model))(FEATURES)
    assert batch_tokens(padded) == batch_tokens(packed) == 12
    s_pad, n_pad = token_losses_sum(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    s_pad.backward()
    g_pad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    s_pack, n_pack = token_losses_sum(model, packed["input_ids"], packed["attention_mask"], packed["labels"],
                                      **body_kwargs(packed))
    s_pack.backward()
    assert n_pack == n_pad == 8
    assert abs(float(s_pack.detach()) - float(s_pad.detach())) < 1e-5 * n_pad
    for a, p in zip(g_pad, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)


def test_packing_without_the_block_mask_would_leak_across_records():
    """The invariant above is not vacuous: position_ids alone let records see each other."""
    model = _model("sdpa")
    packed = PackedCollator()(FEATURES)
    padded = InstructionCollator(_Tok())(FEATURES)
    s_pad, _ = token_losses_sum(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    ones = torch.ones_like(packed["input_ids"])
    s_leak, _ = token_losses_sum(model, packed["input_ids"], ones, packed["labels"],
                                 position_ids=packed["position_ids"])
    assert abs(float(s_leak) - float(s_pad)) > 1e-3


def test_record_wise_attention_ignores_the_dense_mask_when_given_boundaries():
    """With boundaries, the packed attention never looks at the N x N mask: an all-ones mask gives the same loss."""
    model = _model("sdpa")
    use_packed_attention(model)
    packed = PackedCollator()(FEATURES)
    ones = torch.ones_like(packed["attention_mask"])
    with torch.no_grad():
        a, _ = token_losses_sum(model, packed["input_ids"], packed["attention_mask"], packed["labels"],
                                **body_kwargs(packed))
        b, _ = token_losses_sum(model, packed["input_ids"], ones, packed["labels"], **body_kwargs(packed))
    assert abs(float(a) - float(b)) < 1e-6


def test_unsupported_attention_is_refused_with_the_fix():
    model = _model("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="packing=False"):
        attention_kind(model)


def test_packed_and_padded_training_give_the_same_adapter(tiny_model_dir, tmp_path):
    records = [{"instruction": f"Say {w} {'twice ' * i}", "input": "", "output": f"{w} " * (i + 1)}
               for i, w in enumerate(["red", "green", "blue", "cyan", "pink", "gray", "teal", "gold"])]
    # Adam moves every weight by up to ~lr whatever its gradient's size, so float-level differences
    # in a near-zero gradient show up at the scale of lr: compare at a small lr.
    # fp32: bf16 and fp16 are covered micro-batch by micro-batch in test_precision.py
    common = dict(max_steps=3, batch_size=8, micro_batch_size=4, learning_rate=1e-3, lora_dropout=0.0,
                  compute_dtype="float32",
                  val_set_size=0, cutoff_len=64, gradient_checkpointing=True, save_steps=1000)
    a = finetune(tiny_model_dir, records, tmp_path / "packed", packing=True, **common)
    b = finetune(tiny_model_dir, records, tmp_path / "padded", packing=False, **common)
    assert a.tokens_seen == b.tokens_seen
    wa = load_file(str(tmp_path / "packed" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "padded" / "adapter_model.safetensors"))
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"packed vs padded adapter max abs diff after 3 steps: {diff:.2e}")
    assert diff < 1e-5
    assert abs(a.train_loss - b.train_loss) < 1e-4


def test_record_label_counts_add_up_to_the_collated_batch_count_padded_and_packed():
    """The loop counts a step's label tokens from its records before collating: the sum must be the batch's count."""
    from alpaca_lora.data.labels import count_label_tokens, record_label_tokens

    expected = sum(record_label_tokens(f["labels"]) for f in FEATURES)
    assert expected > 0
    assert count_label_tokens(InstructionCollator(_Tok(), pad_to_multiple_of=8)(FEATURES)["labels"]) == expected
    assert count_label_tokens(PackedCollator()(FEATURES)["labels"]) == expected
