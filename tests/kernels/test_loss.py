import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alpaca_lora.kernels.cross_entropy import token_losses_sum


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


@pytest.mark.parametrize(("bias", "softcap"), [(False, None), (True, None), (False, 30.0)])
def test_fused_linear_cross_entropy_matches_autograd_loss_and_gradients(bias, softcap):
    """The gradient made in the forward pass equals autograd's through full logits, for every input."""
    import torch.nn.functional as F

    from alpaca_lora.kernels.cross_entropy import linear_cross_entropy_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(37, 16, requires_grad=True)
    target = torch.randint(0, 50, (37,))

    def reference() -> torch.Tensor:
        logits = head(hidden).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, target, reduction="sum")

    params = [hidden, *head.parameters()]
    (reference() * 0.3).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss = linear_cross_entropy_sum(head, hidden, target, softcap, chunk_size=8)  # 5 chunks, the last partial
    (loss * 0.3).backward()
    assert torch.allclose(loss, reference(), atol=1e-4)
    for got, want in zip((p.grad for p in params), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_fused_loss_stores_no_logits_for_the_backward_pass():
    """What the loss keeps for backward is (N, H) gradients, never (N, V) logits."""
    from alpaca_lora.kernels.cross_entropy import linear_cross_entropy_sum

    head = torch.nn.Linear(8, 1000, bias=False).requires_grad_(False)
    hidden = torch.randn(64, 8, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        linear_cross_entropy_sum(head, hidden, torch.randint(0, 1000, (64,)), chunk_size=16)
    assert saved and all(s.numel() <= 64 * 8 for s in saved)


def test_cpu_chunks_hold_at_most_the_byte_cap_of_logits(monkeypatch):
    """On the CPU the chunk shrinks so its fp32 logits stay under CPU_CHUNK_BYTES; the sum does not change."""
    from alpaca_lora.kernels import cross_entropy as loss_mod

    head = torch.nn.Linear(8, 1000, bias=False).requires_grad_(False)
    hidden = torch.randn(64, 8)
    target = torch.randint(0, 1000, (64,))
    uncapped = loss_mod.linear_cross_entropy_sum(head, hidden, target, chunk_size=64)
    rows: list[int] = []
    inner = loss_mod._chunk_loss_and_grads
    monkeypatch.setattr(loss_mod, "_chunk_loss_and_grads", lambda h, *a: rows.append(len(h)) or inner(h, *a))
    monkeypatch.setattr(loss_mod, "CPU_CHUNK_BYTES", 10 * 4 * 1000)  # room for 10 rows of 1000 logits
    capped = loss_mod.linear_cross_entropy_sum(head, hidden, target, chunk_size=64)
    assert rows == [10] * 6 + [4]
    assert torch.allclose(capped, uncapped, atol=1e-4)


def test_other_heads_take_the_autograd_path_with_the_same_result():
    from alpaca_lora.kernels.cross_entropy import linear_cross_entropy_sum

    class Head(torch.nn.Module):  # not an nn.Linear, like a LoRA-wrapped lm_head
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(8, 40)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    torch.manual_seed(0)
    wrapped = Head()
    hidden, target = torch.randn(10, 8), torch.randint(0, 40, (10,))
    fused = linear_cross_entropy_sum(wrapped.inner, hidden, target, chunk_size=3)
    generic = linear_cross_entropy_sum(wrapped, hidden, target, chunk_size=3)
    assert torch.allclose(fused, generic, atol=1e-5)
