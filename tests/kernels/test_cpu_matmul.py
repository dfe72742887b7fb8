"""oneDNN fp32 products: the same numbers as torch's default BLAS, forward and backward, 4-bit and lm_head."""

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F

from alpaca_lora import FinetuneConfig
from alpaca_lora.errors import ConfigError
from alpaca_lora.kernels import cpu_linear4bit, cpu_matmul
from alpaca_lora.kernels.cpu_linear4bit import CpuLinear4bit, restore_4bit_layers, use_onednn_4bit_layers
from alpaca_lora.kernels.cpu_matmul import linear, resolve_backend
from alpaca_lora.train.recipe import micro_batch_loss
from alpaca_lora.train.setup import setup

needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="this torch build has no oneDNN linear")
RECORDS = [{"instruction": f"Add {i} and {i + 1}", "input": "", "output": f"The sum is {2 * i + 1}."}
           for i in range(8)]


@needs_onednn
@pytest.mark.parametrize("transposed", [False, True])
def test_linear_matches_the_default_backend(transposed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 48, generator=gen)[:, :, :40]  # 3D and not contiguous
    w = torch.randn(40, 24, generator=gen).t() if transposed else torch.randn(24, 40, generator=gen)
    got = linear(x, w, onednn=True)
    assert got.shape == (2, 7, 24)
    assert torch.allclose(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def _quantized_pair():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 96, bias=True)
    layers = []
    for _ in range(2):
        q = bnb.nn.Linear4bit(64, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        q.load_state_dict(dense.state_dict())
        layers.append(q.to("cpu"))  # quantizes on the move to a device
    return layers


@needs_onednn
def test_cpu_linear4bit_has_bitsandbytes_outputs_and_input_gradients():
    ref, fast = _quantized_pair()
    module = torch.nn.Sequential(fast)
    assert use_onednn_4bit_layers(module) == 1 and type(module[0]) is CpuLinear4bit and module[0] is fast
    assert set(fast.state_dict()) == set(ref.state_dict())
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out_ref, out_fast = ref(x), fast(x2)
    assert torch.allclose(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    out_fast.backward(g)
    assert torch.allclose(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation takes the same path (no CPU inference repack of the weight)
        assert torch.allclose(fast(x2), out_ref, rtol=1e-5, atol=1e-5)
    assert not getattr(fast.weight.quant_state, "packing_format_for_cpu", False)


@needs_onednn
def test_restoring_gives_back_the_bitsandbytes_layers_and_outputs():
    ref, fast = _quantized_pair()
    model = torch.nn.Sequential(torch.nn.Sequential(fast), torch.nn.ReLU())
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        before = model(x)
        assert use_onednn_4bit_layers(model) == 1 and type(fast) is CpuLinear4bit
        assert restore_4bit_layers(model) == 1 and type(fast) is bnb.nn.Linear4bit
        assert [type(m) for m in model.modules()] == [torch.nn.Sequential, torch.nn.Sequential,
                                                       bnb.nn.Linear4bit, torch.nn.ReLU]
        assert torch.equal(model(x), before)
        assert torch.equal(before, torch.relu(ref(x)))
    assert restore_4bit_layers(model) == 0


def test_other_dtypes_take_the_bitsandbytes_forward(monkeypatch):
    _, fast = _quantized_pair()
    use_onednn_4bit_layers(torch.nn.Sequential(fast))
    called = []
    monkeypatch.setattr(cpu_linear4bit._FrozenLinear4bit, "apply", lambda *a: called.append(a))
    fast.compute_dtype = torch.bfloat16
    out = fast(torch.randn(2, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and called == []


def test_resolve_backend(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("blas", cpu, torch.float32) == "blas"
    assert resolve_backend("onednn", torch.device("cuda"), torch.float32) == "blas"
    assert resolve_backend("auto", cpu, torch.bfloat16) == "blas"
    assert resolve_backend("auto", cpu, torch.float32) in ("onednn", "blas")
    with pytest.raises(ConfigError, match="cpu_matmul='fast'"):
        resolve_backend("fast", cpu, torch.float32)
    with pytest.raises(ConfigError, match="cpu_matmul='mkl'"):
        FinetuneConfig(cpu_matmul="mkl")
    monkeypatch.setattr(cpu_matmul, "onednn_available", lambda: False)
    cpu_matmul._measured_choice.cache_clear()
    try:
        assert resolve_backend("auto", cpu, torch.float32) == "blas"
        with pytest.raises(ConfigError, match="no oneDNN"):
            resolve_backend("onednn", cpu, torch.float32)
    finally:
        cpu_matmul._measured_choice.cache_clear()


@needs_onednn
def test_training_loss_and_gradients_do_not_depend_on_the_backend(tiny_model_dir, tmp_path):
    """The same 4-bit model and batch: equal loss and LoRA gradients through oneDNN and through BLAS."""
    results = {}
    for backend in ("onednn", "blas"):
        cfg = FinetuneConfig(val_set_size=0, max_steps=1, micro_batch_size=4, batch_size=4, cutoff_len=64,
                             lora_dropout=0.0, cpu_matmul=backend, device="cpu", compute_dtype="float32")
        run = setup(tiny_model_dir, RECORDS, tmp_path / backend, cfg)
        run.metrics.close()
        assert run.matmul == backend
        kinds = {type(m) for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert kinds == ({CpuLinear4bit} if backend == "onednn" else {bnb.nn.Linear4bit})
        for name, p in run.model.named_parameters():  # lora_B starts at zero; make the update count
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        total, n = micro_batch_loss(run, run.collator([run.train_set[i] for i in range(4)]))
        total.backward()
        grads = {k: p.grad.clone() for k, p in run.model.named_parameters() if p.grad is not None}
        results[backend] = (total.item(), n, grads)
    (l1, n1, g1), (l2, n2, g2) = results["onednn"], results["blas"]
    assert n1 == n2 and abs(l1 - l2) <= 1e-4 * abs(l2)
    assert g1.keys() == g2.keys() and any("lora_A" in k for k in g1)
    for k in g1:
        assert (g1[k] - g2[k]).norm() <= 1e-4 * g2[k].norm(), k
