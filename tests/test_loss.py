import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alpaca_lora.loss import token_losses_sum


@pytest.fixture()
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_label_only_chunked_loss_equals_full_logits_loss(model, chunk_size):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.clone()
    labels[0, :8] = -100
    labels[1, :3] = -100
    labels[2, 15:] = -100  # padding at the end
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    total, n = token_losses_sum(model, ids, mask, labels, chunk_size=chunk_size)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(total / n, reference, atol=1e-5)


def test_chunked_loss_gradients_match(model):
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    total, n = token_losses_sum(model, ids, mask, labels, chunk_size=3)
    (total / n).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for a, p in zip(ours, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_no_label_tokens_gives_zero_count_and_finite_zero(model):
    ids = torch.randint(0, 300, (1, 8))
    total, n = token_losses_sum(model, ids, torch.ones_like(ids), torch.full_like(ids, -100))
    assert n == 0 and float(total) == 0.0
