"""The fused LoRA layers compute peft's function: same outputs, same gradients, unbiased dropout."""

import copy

import pytest
import torch

from alpaca_lora import FinetuneConfig
from alpaca_lora.kernels.lora_layer import (
    FusedLoraLinear,
    FusedLoraLinear4bit,
    _LoraUpdate,
    dropout_mask,
    register_fused_layers,
)
from alpaca_lora.model.load import load_model
from alpaca_lora.model.lora import attach_lora


def _randomize_lora_b(*models: torch.nn.Module) -> None:
    """Give lora_B non-zero weights (identical across ``models``) so the update is not zero."""
    gen = torch.Generator().manual_seed(1)
    named = [dict(m.named_parameters()) for m in models]
    for name, p in named[0].items():
        if "lora_B" in name:
            value = torch.randn(p.shape, generator=gen) * 0.5
            for params in named:
                params[name].data.copy_(value)


def _pair(model_dir, quantization, **cfg):
    """The same base wrapped with fused layers and with peft's own layers."""
    fused = attach_lora(load_model(model_dir, quantization, "float32", device="cpu")[0],
                        FinetuneConfig(quantization=quantization, fused_lora=True, **cfg))
    plain = attach_lora(load_model(model_dir, quantization, "float32", device="cpu")[0],
                        FinetuneConfig(quantization=quantization, fused_lora=False, **cfg))
    _randomize_lora_b(fused, plain)
    return fused, plain


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_fused_layers_match_peft_outputs_and_gradients(tiny_model_dir, quantization):
    fused, plain = _pair(tiny_model_dir, quantization, lora_dropout=0.0)
    q = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, FusedLoraLinear4bit if quantization else FusedLoraLinear)
    assert type(plain.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.")
    assert fused.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    fused.train()
    plain.train()
    out_f = fused(input_ids=ids, labels=ids)
    out_p = plain(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_f.logits, out_p.logits, atol=1e-5, rtol=1e-5)
    out_f.loss.backward()
    out_p.loss.backward()
    grads_f, grads_p = _lora_grads(fused), _lora_grads(plain)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == 2 * 4 * 2  # A and B, 4 projections, 2 layers
    for name in grads_f:
        assert grads_f[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-5, rtol=1e-4)


def test_dropout_mask_rate_scale_and_independence():
    torch.manual_seed(0)
    dropped, scale = dropout_mask((2048, 2048), 0.05, torch.device("cpu"))
    assert dropped.dtype == torch.bool and dropped.shape == (2048, 2048)
    rate = dropped.float().mean().item()
    exact = round(0.05 * 65536) / 65536
    assert abs(rate - exact) < 1e-3  # 4.2M draws: the standard error is 1.1e-4
    assert scale == pytest.approx(1 / (1 - exact)) and abs(exact - 0.05) < 1e-5
    # neighbouring elements share a 64-bit draw: their drops must still be independent
    both = (dropped[:, :-1] & dropped[:, 1:]).float().mean().item()
    assert abs(both - rate * rate) < 3e-4
    per_lane = [dropped.view(-1, 4)[:, k].float().mean().item() for k in range(4)]
    assert max(abs(r - exact) for r in per_lane) < 2e-3
    assert not dropout_mask((64, 64), 0.0, torch.device("cpu"))[0].any()
    odd = dropout_mask((3, 5, 7), 0.5, torch.device("cpu"))[0]  # a size that is not a multiple of 4
    assert odd.shape == (3, 5, 7) and 0 < odd.sum() < odd.numel()


def test_dropout_mask_follows_the_torch_seed():
    torch.manual_seed(3)
    a = dropout_mask((100, 64), 0.1, torch.device("cpu"))[0]
    torch.manual_seed(3)
    b = dropout_mask((100, 64), 0.1, torch.device("cpu"))[0]
    c = dropout_mask((100, 64), 0.1, torch.device("cpu"))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lora_update_gradients_are_exact():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    dropped = torch.rand(2, 5, 4, generator=gen) < 0.3
    assert torch.autograd.gradcheck(lambda *t: _LoraUpdate.apply(*t, 1.7, dropped), (base, x, a, b))
    assert torch.autograd.gradcheck(lambda *t: _LoraUpdate.apply(*t, 0.5, None), (base, x, a, b))
    reference = base + 1.7 * (x.masked_fill(dropped, 0) @ a.t()) @ b.t()
    torch.testing.assert_close(_LoraUpdate.apply(base, x, a, b, 1.7, dropped), reference)


def test_training_dropout_is_unbiased_and_applied_per_projection(tiny_model_dir):
    fused, _ = _pair(tiny_model_dir, "nf4", lora_dropout=0.5, lora_r=4)
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 4096, layer.in_features, generator=torch.Generator().manual_seed(2))
    layer.eval()
    expected = layer(x)
    with torch.no_grad():
        clean_delta = expected - layer.base_layer(x)
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    second = layer(x)
    assert not torch.allclose(first, second)  # a new mask per call
    # the mean over many calls approaches the dropout-free update (unbiased)
    mean = torch.stack([layer(x) - layer.base_layer(x) for _ in range(64)]).mean(0).detach()
    rel = ((mean - clean_delta).norm() / clean_delta.norm()).item()
    assert rel < 0.15, rel  # one call alone is off by about 1.0 at p = 0.5


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_dropout_follows_the_dropout_module_not_the_layer(tiny_model_dir, quantization):
    """Evaluation and generation during training switch off only the dropout modules (the 4-bit layers stay
    in training mode): the fused layers must then draw no mask, like peft's, and leave the RNG untouched."""
    from alpaca_lora.kernels.modes import dropout_disabled

    fused, plain = _pair(tiny_model_dir, quantization, lora_dropout=0.3)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(4))
    fused.train()
    plain.train()
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    with torch.no_grad(), dropout_disabled(fused), dropout_disabled(plain):
        out_f, out_p = fused(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(torch.get_rng_state(), rng), "a dropout mask was drawn with dropout switched off"
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(fused(input_ids=ids).logits, out_f)  # dropout back on afterwards


def test_gradient_checkpointing_recomputes_the_same_masks(tiny_model_dir):
    fused_gc, _ = _pair(tiny_model_dir, "nf4", lora_dropout=0.3, gradient_checkpointing=True)
    fused_plain, _ = _pair(tiny_model_dir, "nf4", lora_dropout=0.3, gradient_checkpointing=False)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(5))
    grads = []
    for model in (fused_gc, fused_plain):
        model.train()
        torch.manual_seed(11)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(_lora_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_fallbacks_keep_peft_semantics(tiny_model_dir):
    fused, plain = _pair(tiny_model_dir, "nf4", lora_dropout=0.0)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(4))
    fused.eval()
    plain.eval()
    with torch.no_grad(), fused.disable_adapter():
        base_only = fused(input_ids=ids).logits
    with torch.no_grad():
        with_adapter = fused(input_ids=ids).logits
        torch.testing.assert_close(with_adapter, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base_only, with_adapter)


def test_registration_needs_one_kind_of_target(tiny_model_dir):
    from peft import LoraConfig

    class OtherLinear(torch.nn.Linear):
        pass

    model, _ = load_model(tiny_model_dir, None, "float32", device="cpu")
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"])
    assert register_fused_layers(cfg, model, ["q_proj", "v_proj"])
    mixed = copy.deepcopy(model)
    v = mixed.model.layers[0].self_attn.v_proj
    mixed.model.layers[0].self_attn.v_proj = OtherLinear(v.in_features, v.out_features, bias=False)
    assert not register_fused_layers(LoraConfig(target_modules=["q_proj", "v_proj"]), mixed, ["q_proj", "v_proj"])
    assert register_fused_layers(LoraConfig(target_modules="all-linear"), model, "all-linear")
