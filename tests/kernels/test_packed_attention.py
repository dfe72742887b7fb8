"""Packed-row attention kernels: FlexAttention, flash-attn varlen and per-record eager equal per-record sdpa.

FlexAttention runs forward-only on the CPU (torch has no CPU backward for it), unfused: the shapes here
are tiny. flash-attn is not installed here: its call is checked through an injected varlen function
with flash_attn_varlen_func's signature, and the kernel choice is forced both ways by its arguments.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from alpaca_lora import ConfigError
from alpaca_lora.data.packing import PackedCollator, PackedRecords, body_kwargs
from alpaca_lora.kernels.cross_entropy import token_losses_sum
from alpaca_lora.kernels.packed_attention import use_packed_attention
from alpaca_lora.kernels.packed_kernels import (
    choose_kernel,
    cpu_sdpa_dtype,
    document_ids,
    document_mask_mod,
    flash_available,
    flash_records,
    flex_available,
    flex_records,
    sdpa_records,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-3}  # max abs error on unit-scale attention outputs
RECORDS = PackedRecords((0, 3, 4, 11, 11, 17))  # lengths 3, 1, 7, 0 (empty) and 6
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*")


def _qkv(dtype: torch.dtype, n: int = 17) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 8, generator=g) for h in (4, 2, 2))  # GQA: 4 query heads, 2 key/value heads
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_the_kernel_choice_on_each_kind_of_machine():
    assert choose_kernel("auto", CPU, flex=True, flash=True) == "sdpa"  # CPU: FlexAttention is unfused, no backward
    assert choose_kernel("auto", CUDA, flex=True, flash=True) == "flash"
    assert choose_kernel("auto", CUDA, flex=True, flash=False) == "flex"
    assert choose_kernel("auto", CUDA, flex=True, flash=False, dropout=0.1) == "sdpa"  # FlexAttention has no dropout
    assert choose_kernel("auto", CUDA, flex=False, flash=False) == "sdpa"
    assert choose_kernel("auto", CUDA, dtype=torch.float32, flex=True, flash=True) == "flex"  # flash: half only
    assert choose_kernel("auto", CUDA, dtype=torch.float16, flex=True, flash=True) == "flash"
    assert choose_kernel("flex", CPU, flex=True) == "flex"
    assert choose_kernel("sdpa", CUDA, flex=True, flash=True) == "sdpa"
    assert choose_kernel("flash", CUDA, flash=True) == "flash"
    with pytest.raises(ConfigError, match="pip install flash-attn"):
        choose_kernel("flash", CUDA, flash=False)
    with pytest.raises(ConfigError, match="fp16 or bf16 only"):
        choose_kernel("flash", CUDA, dtype=torch.float32, flash=True)
    with pytest.raises(ConfigError, match="upgrade torch or choose 'sdpa'"):
        choose_kernel("flex", CUDA, flex=False)
    with pytest.raises(ConfigError, match="no attention dropout"):
        choose_kernel("flex", CUDA, flex=True, dropout=0.1)
    with pytest.raises(ConfigError, match="choose one of"):
        choose_kernel("xformers", CPU)


def test_cpu_half_attention_computes_in_fp32_unless_the_cpu_has_tiles_for_it():
    amx = frozenset({"avx512f", "amx_bf16", "amx_tile"})
    plain = frozenset({"avx512f", "avx512_bf16"})  # native bf16 dot products, no tiles
    assert cpu_sdpa_dtype(CPU, torch.bfloat16, plain) == torch.float32
    assert cpu_sdpa_dtype(CPU, torch.float16, plain) == torch.float32
    assert cpu_sdpa_dtype(CPU, torch.bfloat16, amx) == torch.bfloat16
    assert cpu_sdpa_dtype(CPU, torch.float16, amx) == torch.float32  # bf16 tiles are not fp16 tiles
    assert cpu_sdpa_dtype(CPU, torch.float16, amx | {"amx_fp16"}) == torch.float16
    assert cpu_sdpa_dtype(CPU, torch.float32, plain) == torch.float32
    assert cpu_sdpa_dtype(CUDA, torch.bfloat16, plain) == torch.bfloat16  # GPUs keep their half kernels


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("autocast", [False, True])
def test_half_attention_upcast_on_the_cpu_keeps_dtype_and_gradients(dtype, autocast):
    """Both ways of the choice: half products or fp32 products, each close to an fp64 reference, gradients too."""
    half = DTYPES[dtype]
    records = PackedRecords(RECORDS.bounds)
    exact = [t.double().requires_grad_() for t in _qkv(half)]
    reference = sdpa_records(*exact, records, scaling=0.3, dropout=0.0)
    grad = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference.backward(grad)
    for work in (half, torch.float32):
        if autocast:
            qkv = [t.detach().float().requires_grad_() for t in exact]  # autocast decides the dtype
            with torch.autocast("cpu", dtype=half):
                out = sdpa_records(*qkv, records, scaling=0.3, dropout=0.0, work_dtype=work)
        else:
            qkv = [t.detach().to(half).requires_grad_() for t in exact]
            out = sdpa_records(*qkv, records, scaling=0.3, dropout=0.0, work_dtype=work)
        assert out.dtype == half, work
        torch.testing.assert_close(out.double(), reference, atol=TOL[dtype], rtol=0)
        out.backward(grad.to(half))
        for mine, ref in zip(qkv, exact, strict=True):
            assert mine.grad.dtype == mine.dtype
            torch.testing.assert_close(mine.grad.double(), ref.grad, atol=4 * TOL[dtype], rtol=0)


def test_what_is_installed_here_is_detected():
    import importlib.util

    assert flex_available()  # torch >= 2.5
    assert flash_available() == (importlib.util.find_spec("flash_attn") is not None)
    expected = "flash" if flash_available() else "flex"
    assert choose_kernel("auto", CUDA) == expected  # bf16
    assert choose_kernel("auto", CPU) == "sdpa"


def test_the_document_mask_is_block_diagonal_and_causal():
    doc = document_ids(RECORDS, CPU)
    assert doc.tolist() == [0] * 3 + [1] + [2] * 7 + [4] * 6
    idx = torch.arange(17)
    allowed = document_mask_mod(doc)(0, 0, idx[:, None], idx[None, :])  # (N, N)
    expected = torch.zeros(17, 17, dtype=torch.bool)
    for a, b in RECORDS.spans:
        expected[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flex_attention_equals_per_record_sdpa(dtype):
    q, k, v = _qkv(DTYPES[dtype])
    records = PackedRecords(RECORDS.bounds)
    with torch.no_grad():
        ours = flex_records(q, k, v, records, scaling=0.3, compiled=False)
        reference = sdpa_records(q, k, v, records, scaling=0.3, dropout=0.0)
        again = flex_records(q, k, v, records, scaling=0.3, compiled=False)
    assert ours.dtype == reference.dtype == DTYPES[dtype] and ours.shape == (1, 4, 17, 8)
    torch.testing.assert_close(ours.float(), reference.float(), atol=TOL[dtype], rtol=0)
    assert torch.equal(again, ours) and len(records.cache) == 1  # one block mask per micro-batch, reused


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_flex_attention_under_autocast_takes_the_autocast_dtype(dtype):
    """Rotary embeddings leave q and k in fp32 beside a low-precision v; FlexAttention is not an autocast op."""
    q, k, v = _qkv(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=DTYPES[dtype]):
        ours = flex_records(q, k, v.to(DTYPES[dtype]), RECORDS, scaling=None, compiled=False)
        reference = sdpa_records(q, k, v.to(DTYPES[dtype]), RECORDS, scaling=None, dropout=0.0)
    assert ours.dtype == reference.dtype == DTYPES[dtype]
    torch.testing.assert_close(ours.float(), reference.float(), atol=TOL[dtype], rtol=0)


def _varlen_reference(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                      softmax_scale, causal):
    """flash_attn_varlen_func's contract, by per-record sdpa: (N, H, D) in and out, int32 boundaries on the device."""
    assert cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32 and causal
    bounds = cu_seqlens_q.tolist()
    assert max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    out = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                          dropout_p=dropout_p, is_causal=True, scale=softmax_scale, enable_gqa=True)
           for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    return torch.cat(out, dim=1).transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_flash_varlen_call_equals_per_record_sdpa(dtype):
    q, k, v = _qkv(DTYPES[dtype])
    records = PackedRecords(RECORDS.bounds)
    ours = flash_records(q, k, v, records, 0.3, 0.0, varlen=_varlen_reference)
    torch.testing.assert_close(ours, sdpa_records(q, k, v, records, 0.3, 0.0), atol=TOL[dtype], rtol=0)
    assert records.cache[("cu_seqlens", "cpu")].tolist() == list(RECORDS.bounds)


def _llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config)


FEATURES = [{"input_ids": [5, 6, 7, 2], "labels": [-100, -100, 7, 2]}, {"input_ids": [9, 2], "labels": [9, 2]},
            {"input_ids": [3, 4, 8, 8, 1, 2, 11], "labels": [-100, 4, 8, 8, 1, 2, 11]}, {"input_ids": [7]}]


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_model_forward_gives_the_same_loss_with_each_kernel(dtype):
    """The whole packed forward under autocast (as training runs it): flex and per-record eager equal sdpa."""
    batch = PackedCollator()(FEATURES)
    losses = {}
    for attn, kernel in (("sdpa", "sdpa"), ("sdpa", "flex"), ("eager", "auto")):
        model = _llama(attn)
        assert use_packed_attention(model)
        enabled = dtype != "fp32"
        with torch.no_grad(), torch.autocast("cpu", dtype=DTYPES[dtype], enabled=enabled), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total, n = token_losses_sum(model, batch["input_ids"], None, batch["labels"], **body_kwargs(batch, kernel))
        losses[f"{attn}/{kernel}"] = float(total) / n
    print(f"{dtype}: per-token loss by kernel {losses}")
    reference = losses["sdpa/sdpa"]
    for name, loss in losses.items():
        assert abs(loss - reference) <= TOL[dtype] * abs(reference), name


def test_the_tensor_boundaries_of_the_older_interface_still_work():
    """cu_seq_lens_q alone (no packed_records): the same result, at one host read per layer."""
    batch = PackedCollator()(FEATURES)
    model = _llama("sdpa")
    use_packed_attention(model)
    kwargs = body_kwargs(batch)
    with torch.no_grad():
        a, _ = token_losses_sum(model, batch["input_ids"], None, batch["labels"], **kwargs)
        kwargs.pop("packed_records")
        b, _ = token_losses_sum(model, batch["input_ids"], None, batch["labels"], **kwargs)
    assert float(a) == float(b)


def test_an_unknown_kernel_fails_at_the_first_layer_with_the_choices():
    batch = PackedCollator()(FEATURES)
    model = _llama("sdpa")
    use_packed_attention(model)
    with pytest.raises(ConfigError, match="choose one of"):
        token_losses_sum(model, batch["input_ids"], None, batch["labels"], **body_kwargs(batch, "xformers"))


def test_padded_batches_still_take_the_padding_mask_after_switching():
    """A switched model given a padded batch (evaluation, generation) attends as transformers' sdpa and eager do."""
    ids = torch.tensor([[5, 6, 7, 2], [9, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    for attn in ("sdpa", "eager"):
        model = _llama(attn)
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).logits
            assert use_packed_attention(model)
            after = model(input_ids=ids, attention_mask=mask).logits
            unpadded = model(input_ids=ids[:1]).logits
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unpadded, before[:1], atol=1e-5, rtol=1e-5)
