"""CUDA checks: 4-bit kernels, bf16/fp16 training with the defaults, packed attention, merge, generate.

Every test here needs a CUDA GPU and is skipped without one (all of them, on the CPU-only CI). On a
GPU machine ``python -m pytest tests/test_cuda.py -m cuda`` runs them; ``benchmarks/gpu_check.sh``
does so unattended. They assert the invariants the CPU suite checks in fp32 on the CPU, here on the
GPU's own code paths: bitsandbytes' CUDA NF4 quantization, its 4-bit matmul (training) and gemv
(one-token inference) kernels, bf16/fp16 autocast and fp16 loss scaling, flash/efficient sdpa on
packed rows, and CUDA forwards of merged and unmerged adapters.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import SHORT_RECORDS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
# What the GPU path trains in: "auto" resolves to bf16 on a GPU with bf16, fp16 on older ones.
HALF_DTYPES = ["bfloat16", "float16"]
# finetune() defaults (NF4 + double quant, fused LoRA r16/alpha32/dropout 0.05 on q,k,v,o, packing,
# gradient checkpointing, fp16 loss scaling) with a learning rate that memorises 8 records in 30 steps.
STEPS = 30
TRAIN = dict(max_steps=STEPS, batch_size=8, micro_batch_size=4, learning_rate=2e-2, warmup_ratio=0.0,
             val_set_size=0, cutoff_len=64, save_steps=1000)
INSTRUCTIONS = ["Hi.", "Name the color of the sky.", "Translate to French.",
                "Write a long and careful explanation of why the sky looks blue during the day.", "Give the opposite."]
INPUTS = [None, None, "cat", None, "hot"]


def _losses(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _scale_tolerance(dtype: torch.dtype) -> float:
    """Tolerance relative to the largest magnitude compared: fp32 rounding, or a few half-precision ulps."""
    return {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]


# ---- bitsandbytes 4-bit kernels --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nf4_round_trip_errs_by_at_most_half_a_level_and_equals_the_cpu(dtype):
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    w = (torch.randn(512, 256) * 0.05).to(dtype)  # (out, in)
    q, state = bnbf.quantize_4bit(w.to(DEVICE), blocksize=64, compress_statistics=True, quant_type="nf4")
    dq = bnbf.dequantize_4bit(q, state)
    assert dq.is_cuda and dq.dtype == dtype and dq.shape == w.shape
    blocks, approx = w.float().reshape(-1, 64), dq.float().cpu().reshape(-1, 64)
    rel = (blocks - approx).abs() / blocks.abs().amax(1, keepdim=True)
    print(f"{dtype}: NF4 error / block absmax: max {float(rel.max()):.4f}, mean {float(rel.mean()):.4f}")
    # Neighbouring NF4 levels are at most 0.304 apart (-1 and -0.696): rounding to the nearest errs by
    # <= 0.152 of the block's absmax, plus the 8-bit double quantization of absmax itself.
    assert float(rel.max()) <= 0.17
    assert 0.005 < float(rel.mean()) < 0.05  # 4-bit, not a no-op
    # merge(merge_into="dequantized") rounds on the CPU what training rounded on the GPU: same result.
    q_cpu, state_cpu = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    dq_cpu = bnbf.dequantize_4bit(q_cpu, state_cpu)
    differ = float((dq_cpu.float() != dq.float().cpu()).float().mean())
    print(f"{dtype}: CPU and CUDA round trips differ in {differ:.2e} of the weights")
    assert differ <= 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_4bit_linear_forward_and_input_gradient_equal_the_dequantized_weights(dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 384, bias=False, compute_dtype=dtype, compress_statistics=True,
                              quant_type="nf4").to(DEVICE)  # moving to the GPU quantizes the weight
    assert layer.weight.quant_state is not None and layer.weight.dtype == torch.uint8
    w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)  # (384, 256)
    x = torch.randn(3, 17, 256, device=DEVICE, dtype=dtype, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    y, ref = layer(x), ref_x @ w.t()  # (3, 17, 384)
    assert y.dtype == dtype and y.shape == (3, 17, 384)
    tol = _scale_tolerance(dtype)
    scale = float(ref.detach().abs().max())
    assert float((y - ref).detach().abs().max()) <= tol * scale
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    assert float((x.grad - ref_x.grad).abs().max()) <= tol * float(ref_x.grad.abs().max())
    assert layer.weight.grad is None  # the 4-bit base stays frozen
    # One token without grad takes bitsandbytes' inference kernel (gemv), as each step of generate() does.
    with torch.no_grad():
        row = x[1, 5:6].detach()[None]  # (1, 1, 256)
        one = layer(row)
        batched = layer(x.detach())[1, 5]
    assert float((one[0, 0] - ref[1, 5]).abs().max()) <= 2 * tol * scale
    assert float((one[0, 0] - batched).abs().max()) <= 2 * tol * scale


# ---- fine-tuning with the defaults -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """``trained(dtype)``: a default fine-tune of the tiny Llama on the GPU in ``dtype`` (one per dtype, cached)."""
    from alpaca_lora.train.recipe import finetune

    runs: dict[str, tuple] = {}

    def run(dtype: str):
        if dtype not in runs:
            out = tmp_path_factory.mktemp(f"cuda-{dtype}")
            torch.cuda.reset_peak_memory_stats()
            result = finetune(tiny_model_dir, SHORT_RECORDS, out, compute_dtype=dtype, device=DEVICE, **TRAIN)
            runs[dtype] = (result, out, torch.cuda.max_memory_allocated())
        return runs[dtype]

    return run


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_finetune_learns_and_writes_finite_adapters(trained, dtype):
    from safetensors.torch import load_file

    result, out, peak = trained(dtype)
    rows = _losses(out)
    losses = [r["loss"] for r in rows]
    print(f"{dtype}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, peak {peak / 2**20:.0f} MiB")
    assert result.steps == STEPS and len(losses) == STEPS
    assert peak > 0  # it trained on the GPU
    skipped = [r["step"] for r in rows if r.get("skipped")]
    if dtype == "float16":  # the loss scaler runs in fp16, and at most its first few steps overflow
        assert all("loss_scale" in r for r in rows) and len(skipped) <= 5, skipped
    else:
        assert not skipped and not any("loss_scale" in r for r in rows)
    assert all(math.isfinite(x) for x in losses)  # an overflow in fp16 skips the update, not the loss
    assert sum(losses[-5:]) / 5 < 0.65 * losses[0], losses  # fp32 on the CPU: 13.7 -> 6.9 in 30 steps
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert len(weights) == 2 * 4 * 2  # (A, B) x (q, k, v, o) x 2 layers
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_first_loss_equals_the_fp32_one(trained, dtype):
    """Step 1 scores the untouched base (LoRA B starts at zero) on the same batch: only rounding may differ."""
    half = _losses(trained(dtype)[1])[0]["loss"]
    full = _losses(trained("float32")[1])[0]["loss"]
    print(f"first loss: {dtype} {half:.5f}, float32 {full:.5f}")
    assert abs(half - full) <= 1e-2 * abs(full)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_reloaded_adapter_scores_the_records_as_training_ended(trained, tiny_model_dir, dtype):
    from peft import PeftModel

    from alpaca_lora.data.collator import InstructionCollator
    from alpaca_lora.data.pipeline import prepare_dataset
    from alpaca_lora.data.prepare import load_instructions
    from alpaca_lora.kernels.cross_entropy import token_losses_sum
    from alpaca_lora.model.load import load_model

    _, out, _ = trained(dtype)
    base, tok = load_model(tiny_model_dir, "nf4", dtype, device=DEVICE)
    model = PeftModel.from_pretrained(base, out).eval()
    ds, _ = prepare_dataset(load_instructions(SHORT_RECORDS), tok, cutoff_len=TRAIN["cutoff_len"])
    batch = {k: v.to(DEVICE) for k, v in InstructionCollator(tok)([ds[i] for i in range(len(ds))]).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=getattr(torch, dtype)):
        total, n = token_losses_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        with model.disable_adapter():
            plain, _ = token_losses_sum(base, batch["input_ids"], batch["attention_mask"], batch["labels"])
    losses = [r["loss"] for r in _losses(out)]
    print(f"{dtype}: reloaded {float(total) / n:.3f}, base {float(plain) / n:.3f}, logged {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}")
    assert abs(float(plain) / n - losses[0]) <= 2e-2 * losses[0]  # the base scores as step 1 did
    assert float(total) / n < 0.65 * losses[0]


# ---- packing ----------------------------------------------------------------------------------------


class _Tok:
    pad_token_id = 2
    eos_token_id = 2


def _records(vocab: int) -> list[dict]:
    """Four records of different lengths; a third of each is prompt (no labels)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (37, 128, 5, 90):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        k = n // 3
        out.append({"input_ids": ids, "labels": [-100] * k + ids[k:], "attention_mask": [1] * n})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_give_the_padded_logits_and_loss(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from alpaca_lora.data.collator import InstructionCollator
    from alpaca_lora.data.packing import PackedCollator, attention_kind, body_kwargs
    from alpaca_lora.kernels.cross_entropy import token_losses_sum
    from alpaca_lora.kernels.packed_attention import use_packed_attention

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, initializer_range=0.3,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(DEVICE, dtype)
    assert use_packed_attention(model)
    features = _records(config.vocab_size)
    padded = {k: v.to(DEVICE) for k, v in InstructionCollator(_Tok(), pad_to_multiple_of=8)(features).items()}
    attention_kind(model)
    packed = {k: v.to(DEVICE) for k, v in PackedCollator()(features).items()}  # boundaries, no N x N mask
    with torch.no_grad():
        pad_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.float()
        pack_logits = model(input_ids=packed["input_ids"], **body_kwargs(packed)).logits.float()
        # Without the record boundaries and mask, records attend to the ones packed before them.
        leak_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits.float()
    bounds = packed["cu_seq_lens"].tolist()
    diff = leak = 0.0
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        diff = max(diff, float((pack_logits[0, a:b] - pad_logits[i, : b - a]).abs().max()))
        leak = max(leak, float((leak_logits[0, a:b] - pad_logits[i, : b - a]).abs().max()))
    scale = float(pad_logits.abs().max())
    tol = _scale_tolerance(dtype) * 10 * scale if dtype == torch.float32 else _scale_tolerance(dtype) * scale
    print(f"{dtype}: max |packed - padded| logit {diff:.3g}, leaking {leak:.3g}, largest logit {scale:.3g}")
    assert diff <= tol
    assert leak > 10 * tol  # the comparison can tell a leak from rounding
    with torch.no_grad():
        s_pad, n_pad = token_losses_sum(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
        s_pack, n_pack = token_losses_sum(model, packed["input_ids"], None, packed["labels"], **body_kwargs(packed))
    assert n_pad == n_pack == sum(len(f["input_ids"]) - len(f["input_ids"]) // 3 for f in features)
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(float(s_pack) - float(s_pad)) <= rel * abs(float(s_pad))


@pytest.mark.parametrize("kernel", ["flex", "flash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_kernels_equal_per_record_sdpa_forward_and_backward(kernel, dtype):
    """FlexAttention (compiled) and flash-attn varlen on a packed row: the per-record sdpa output and gradients."""
    import time

    from alpaca_lora.data.packing import PackedRecords
    from alpaca_lora.kernels.packed_kernels import flash_available, flash_records, flex_records, sdpa_records

    if kernel == "flash" and not flash_available():
        pytest.skip("flash-attn is not installed")
    lengths = [37, 128, 5, 90, 300, 1]
    bounds = tuple(int(x) for x in torch.tensor([0, *lengths]).cumsum(0))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, bounds[-1], 64, generator=g).to(DEVICE, dtype).requires_grad_()
               for h in (8, 2, 2))
    outs, grads, times = {}, {}, {}
    for name in ("sdpa", kernel):
        records = PackedRecords(bounds)
        for _ in range(2):  # the second call is timed (the first compiles FlexAttention)
            torch.cuda.synchronize()
            start = time.perf_counter()
            if name == "sdpa":
                out = sdpa_records(q, k, v, records, None, 0.0)
            elif name == "flex":
                out = flex_records(q, k, v, records, None)
            else:
                out = flash_records(q, k, v, records, None, 0.0)
            grad = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            torch.cuda.synchronize()
            times[name] = time.perf_counter() - start
        outs[name], grads[name] = out.float(), [x.float() for x in grad]
    scale = float(outs["sdpa"].abs().max())
    diff = float((outs[kernel] - outs["sdpa"]).abs().max())
    gdiff = max(float((a - b).abs().max()) / float(b.abs().max()) for a, b in zip(grads[kernel], grads["sdpa"],
                                                                                  strict=True))
    print(f"{kernel} vs per-record sdpa [{dtype}]: out {diff:.3g} (scale {scale:.3g}), grads rel {gdiff:.3g}, "
          f"forward+backward {times[kernel] * 1e3:.2f} ms vs {times['sdpa'] * 1e3:.2f} ms")
    assert diff <= 2 * _scale_tolerance(dtype) * scale
    assert gdiff <= 4 * _scale_tolerance(dtype)


# ---- merge ------------------------------------------------------------------------------------------


def _training_forward(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (fp32) through the forward training used: train mode (bitsandbytes' training matmul), no dropout."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _probe(tok) -> torch.Tensor:
    rows = [tok(t).input_ids for t in ("### Instruction:\nCapital of Italy?\n\n### Response:\n",
                                       "Name a fruit that is yellow, and say why it is yellow.")]
    n = min(map(len, rows))
    return torch.tensor([r[:n] for r in rows], device=DEVICE)


def test_merged_model_on_the_gpu_equals_the_unmerged_adapter(trained, tiny_model_dir, tmp_path):
    """An adapter trained on the GPU in bf16, merged (fp32 export), gives the adapter's logits on the GPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alpaca_lora.export.merge import merge
    from alpaca_lora.model.load import load_model

    _, adapter, _ = trained("bfloat16")
    merged = merge(adapter, tmp_path / "merged", dtype="float32")
    assert json.loads((merged / "merge_report.json").read_text())["verification"]["passed"]
    base, tok = load_model(tiny_model_dir, None, "float32", device=DEVICE)
    ids = _probe(tok)
    with torch.no_grad():
        plain = base(input_ids=ids).logits.float()
        unmerged = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits.float()
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, use_safetensors=True).to(DEVICE)
        merged_logits = model.eval()(input_ids=ids).logits.float()
    diff, effect = float((merged_logits - unmerged).abs().max()), float((unmerged - plain).abs().max())
    print(f"max |merged - unmerged| {diff:.3g}, adapter effect {effect:.3g}")
    assert diff <= 1e-4 + 1e-5 * float(unmerged.abs().max())
    assert effect > 1e-3


def test_dequantized_merge_reproduces_the_4bit_training_forward_on_the_gpu(trained, tiny_model_dir, tmp_path):
    """merge_into="dequantized" rounds the base through NF4 on the CPU; the GPU rounded it the same in training."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alpaca_lora.export.merge import merge
    from alpaca_lora.model.load import load_model

    _, adapter, _ = trained("float32")
    merged = merge(adapter, tmp_path / "merged", dtype="float32", merge_into="dequantized")
    base4, tok = load_model(tiny_model_dir, "nf4", "float32", device=DEVICE)
    ids = _probe(tok)
    trained_logits = _training_forward(PeftModel.from_pretrained(base4, adapter), ids)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, use_safetensors=True).to(DEVICE)
    merged_logits = _training_forward(model, ids)
    diff = float((merged_logits - trained_logits).abs().max())
    print(f"max |dequantized merge - 4-bit adapter| {diff:.3g}")
    assert diff <= 1e-3 + 1e-4 * float(trained_logits.abs().max())


# ---- generate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_batched_greedy_generation_equals_one_by_one(tiny_model_dir, quantization):
    """Left-padded batches against single prompts; with NF4, batched decoding against the gemv kernel."""
    from alpaca_lora.inference.generate import generate
    from alpaca_lora.model.load import load_model

    model, tok = load_model(tiny_model_dir, quantization, "float32", device=DEVICE)
    assert next(model.parameters()).is_cuda
    batched = generate(model, INSTRUCTIONS, INPUTS, tokenizer=tok, max_new_tokens=10, batch_size=3)
    single = [generate(model, i, x, tokenizer=tok, max_new_tokens=10) for i, x in zip(INSTRUCTIONS, INPUTS,
                                                                                     strict=True)]
    print(batched)
    assert batched == single
    assert all(isinstance(t, str) and t for t in batched)
    # A folder is loaded onto the GPU by itself (device "auto") and says the same.
    assert generate(tiny_model_dir, INSTRUCTIONS, INPUTS, max_new_tokens=10, quantization=quantization,
                    compute_dtype="float32") == batched
