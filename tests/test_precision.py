"""The precision matrix: every compute invariant in fp32, bf16 and fp16.

GPUs train in bf16 (fp16 on T4/V100/RTX 20xx). On the CPU, ``torch.autocast`` runs the same dtype
logic (which ops cast, which autograd functions see which dtypes), so each invariant here runs in
all three dtypes with a tolerance stated per dtype. The figures each test measured are printed
(``pytest -s``) and gathered in docs/precision.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.data.collator import InstructionCollator
from alpaca_lora.data.packing import PackedCollator, attention_kind, body_kwargs
from alpaca_lora.export.merge import merge
from alpaca_lora.inference.generate import clear_cache, generate
from alpaca_lora.kernels.cross_entropy import token_losses_sum
from alpaca_lora.kernels.packed_attention import use_packed_attention
from alpaca_lora.model.load import load_model
from alpaca_lora.model.lora import attach_lora
from alpaca_lora.train.recipe import finetune
from conftest import SHORT_RECORDS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tolerances per compute dtype, about 4x the largest difference measured on the tiny models here.
# (bf16 keeps 8 bits of mantissa, fp16 11, fp32 24: a rounding step of 2^-8, 2^-11 and 2^-24.)
GRAD_RTOL = {"float32": 1e-4, "bfloat16": 6e-2, "float16": 1e-2}  # max |a - b| / max |b| of a gradient
EXPORT_RTOL = {"bfloat16": 5e-2, "float16": 1e-2}  # logits of a merged export cast to bf16 / fp16
LOSS_RTOL = {"float32": 1e-6, "bfloat16": 1e-2, "float16": 2e-3}  # a summed token loss
UNDERFLOW_INIT = 1e-5  # init std of the base whose fp16 gradients underflow (see the test)
FAST = dict(batch_size=4, micro_batch_size=4, learning_rate=2e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
            val_set_size=0, warmup_ratio=0.0, cutoff_len=64, gradient_checkpointing=False, save_steps=1000)


@pytest.fixture(params=list(DTYPES))
def dtype(request) -> str:
    """The compute dtype of one row of the matrix."""
    return request.param


def autocast(name: str):
    """Autocast to ``name`` on the CPU (off for fp32), as the trainer does."""
    return torch.autocast("cpu", dtype=DTYPES[name], enabled=name != "float32")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---- kernels -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calm_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny Llama with a trained model's weight scale (init std 0.02), so rounding is not amplified.

    (The suite's usual tiny model, std 0.3, is chaotic: one bf16 rounding moves its logits by whole units.)
    """
    from conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("calm-llama"), smol_tokenizer, initializer_range=0.02)


def _lora_model(model_dir: Path, quantization: str | None, dtype: str, fused: bool):
    """The base in ``dtype`` with LoRA (fused or peft's layers), lora_B set to the same non-zero values."""
    cfg = FinetuneConfig(quantization=quantization, fused_lora=fused, lora_dropout=0.0, compute_dtype=dtype)
    model = attach_lora(load_model(model_dir, quantization, dtype, device="cpu")[0], cfg).train()
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _logits_and_grads(model, ids: torch.Tensor, dtype: str):
    with autocast(dtype):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.float().detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_fused_lora_is_as_accurate_as_peft_lora(calm_model_dir, dtype, quantization):
    """Whole model: against the fp32 run, the fused layers err no more than peft's layers in the same dtype."""
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_grads = _logits_and_grads(_lora_model(calm_model_dir, quantization, "float32", False), ids,
                                              "float32")
    fused = _lora_model(calm_model_dir, quantization, dtype, True)
    assert type(fused.base_model.model.model.layers[0].self_attn.q_proj).__name__.startswith("FusedLora")
    errors = {}
    for name, model in (("fused", fused), ("peft", _lora_model(calm_model_dir, quantization, dtype, False))):
        logits, grads = _logits_and_grads(model, ids, dtype)
        assert all(g.dtype == torch.float32 and bool(g.abs().sum() > 0) for g in grads.values())
        errors[name] = (float((logits - ref_logits).abs().max()), max(rel_err(grads[n], ref_grads[n]) for n in grads))
    print(f"vs fp32 [{dtype}, {quantization}]: fused logits {errors['fused'][0]:.2e} grads {errors['fused'][1]:.2e}; "
          f"peft logits {errors['peft'][0]:.2e} grads {errors['peft'][1]:.2e}")
    if dtype == "float32":
        assert errors["fused"] == (0.0, 0.0)
    for k in (0, 1):
        assert errors["fused"][k] <= 1.5 * errors["peft"][k] + 1e-6


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_one_fused_layer_equals_peft_layer(calm_model_dir, dtype, quantization):
    """One layer, one input: the fused update rounds like peft's (outputs and gradients within a few ulps)."""
    layers = [_lora_model(calm_model_dir, quantization, dtype, fused).base_model.model.model.layers[0].self_attn.q_proj
              for fused in (True, False)]
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 16, layers[0].in_features, generator=gen)
    dy = torch.randn(2, 16, layers[0].out_features, generator=gen)
    results = []
    for layer in layers:
        x = x0.clone().requires_grad_(True)
        with autocast(dtype):
            y = layer(x)
        y.backward(dy.to(y.dtype))
        results.append([y.detach(), x.grad] + [p.grad for n, p in layer.named_parameters() if p.requires_grad])
    errs = [rel_err(a, b) for a, b in zip(*results, strict=True)]
    print(f"one layer [{dtype}, {quantization}]: output, dx, dA, dB max rel {', '.join(f'{e:.1e}' for e in errs)}")
    assert results[0][0].dtype == results[1][0].dtype and results[0][1].dtype == torch.float32
    ulp = {"float32": 1e-6, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    assert max(errs) <= 4 * ulp


def _small_llama(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config)


def test_label_only_chunked_loss_equals_transformers_loss(dtype):
    model = _small_llama()
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :8] = -100
    labels[2, 15:] = -100
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    with autocast(dtype):
        total, n = token_losses_sum(model, ids, mask, labels, chunk_size=7)
    (total / n).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with autocast(dtype):
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference.backward()
    loss_err = abs(float(total / n) - float(reference)) / float(reference)
    grad_err = max(rel_err(a, p.grad) for a, p in zip(ours, model.parameters(), strict=True))
    print(f"chunked loss vs transformers [{dtype}]: loss rel {loss_err:.2e}, grads max rel {grad_err:.2e}")
    assert total.dtype == torch.float32 and all(a.dtype == torch.float32 for a in ours)
    assert loss_err <= LOSS_RTOL[dtype]
    assert grad_err <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded(dtype, attn):
    """Packed rows (boundaries only; per-record sdpa or per-record eager) give the padded loss and gradients."""
    features = [
        {"input_ids": [5, 6, 7, 2], "labels": [-100, -100, 7, 2], "attention_mask": [1, 1, 1, 1]},
        {"input_ids": [9, 2], "labels": [9, 2], "attention_mask": [1, 1]},
        {"input_ids": [3, 4, 8, 8, 1, 2], "labels": [-100, 4, 8, 8, 1, 2], "attention_mask": [1] * 6},
    ]

    class Tok:
        pad_token_id = eos_token_id = 2

    model = _small_llama(attn)
    assert use_packed_attention(model)
    attention_kind(model)  # the switched model is one packing accepts
    results = []
    for batch in (InstructionCollator(Tok(), pad_to_multiple_of=8)(features), PackedCollator()(features)):
        assert "attention_mask" not in batch or batch["attention_mask"].ndim == 2  # no N x N mask
        model.zero_grad()
        with autocast(dtype):
            total, n = token_losses_sum(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                        **body_kwargs(batch))
        total.backward()
        results.append((float(total), n, [p.grad.clone() for p in model.parameters()]))
    (pad_loss, pad_n, pad_grads), (pack_loss, pack_n, pack_grads) = results
    loss_err = abs(pack_loss - pad_loss) / pad_loss
    grad_err = max(rel_err(a, b) for a, b in zip(pack_grads, pad_grads, strict=True))
    print(f"packed vs padded [{dtype}, {attn}]: loss rel {loss_err:.2e}, grads max rel {grad_err:.2e}")
    assert pack_n == pad_n == 8
    assert loss_err <= LOSS_RTOL[dtype]
    assert grad_err <= GRAD_RTOL[dtype]


# ---- training ------------------------------------------------------------------------------------


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path, dtype):
    """Stop at step 3, resume to 6 (dropout on, fp16 with its loss scale): the adapter of 6 straight steps."""
    settings = {**FAST, "lora_dropout": 0.1, "micro_batch_size": 2, "learning_rate": 5e-3, "save_steps": 3,
                "compute_dtype": dtype}
    full = finetune(tiny_model_dir, SHORT_RECORDS, tmp_path / "full", max_steps=6, **settings)
    split = tmp_path / "split"
    finetune(tiny_model_dir, SHORT_RECORDS, split, max_steps=6, **settings)  # keeps checkpoint-3: resume from it
    state = json.loads((split / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["loss_scale"]["enabled"] is (dtype == "float16")
    resumed = finetune(tiny_model_dir, SHORT_RECORDS, split, max_steps=6, resume_from_checkpoint=True, **settings)
    diff = _max_diff(_adapter(full.adapter_dir), _adapter(resumed.adapter_dir))
    print(f"resume vs uninterrupted [{dtype}]: adapter max abs {diff:.2e}")
    assert diff == 0.0
    assert _losses(tmp_path / "full") == _losses(split)


def test_evaluation_does_not_change_training(tiny_model_dir, tmp_path, dtype):
    settings = {**FAST, "val_set_size": 2, "max_steps": 3, "compute_dtype": dtype}
    a = finetune(tiny_model_dir, SHORT_RECORDS, tmp_path / "each", eval_steps=1, **settings)
    b = finetune(tiny_model_dir, SHORT_RECORDS, tmp_path / "end", eval_steps=1000, **settings)
    assert _max_diff(_adapter(a.adapter_dir), _adapter(b.adapter_dir)) == 0.0
    assert _losses(tmp_path / "each") == _losses(tmp_path / "end")
    assert a.eval_loss is not None and torch.isfinite(torch.tensor(a.eval_loss))


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8", None])
def test_tiny_finetune_learns_with_the_defaults(tiny_model_dir, tmp_path, dtype, quantization):
    """Each dtype x quantization: the defaults (fused LoRA, packing, checkpointing) learn a memorizable set."""
    result = finetune(tiny_model_dir, SHORT_RECORDS, tmp_path, max_steps=25, batch_size=8, micro_batch_size=4,
                      learning_rate=2e-2, val_set_size=0, quantization=quantization, compute_dtype=dtype)
    losses = _losses(tmp_path)
    weights = _adapter(tmp_path)
    print(f"learns [{dtype}, {quantization}]: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 25 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0]  # measured 0.49-0.53 in every row
    assert all(bool(t.isfinite().all()) for t in weights.values())
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)
    assert result.steps == 25


# ---- export and generation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One 4-bit adapter per compute dtype, for the merge and generation rows."""
    out = {}
    for name in DTYPES:
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        finetune(tiny_model_dir, SHORT_RECORDS[:4], folder, max_steps=5, **{**FAST, "compute_dtype": name})
        out[name] = folder
    return out


def test_merged_equals_unmerged(trained, tmp_path, dtype):
    """The merge's own check (merged fp32 logits vs the adapter on the 4-bit base) passes for every training dtype."""
    merged = merge(trained[dtype], tmp_path / "merged", dtype="float32")
    report = json.loads((merged / "merge_report.json").read_text())["verification"]
    print(f"merged vs unmerged [{dtype}]: {report}")
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    assert report["adapter_effect_max_abs_logit_diff"] > 10 * report["tolerance"]  # the adapter matters
    if dtype != "float32":  # exported in the training dtype: logits of the cast weights stay close
        cast = json.loads((merge(trained[dtype], tmp_path / "cast", dtype=dtype) / "merge_report.json").read_text())
        cast_err = cast["verification"]["export_dtype_max_abs_logit_diff"] / cast["verification"]["max_abs_logit"]
        print(f"merged {dtype} export vs unmerged: max abs logit diff / max logit {cast_err:.2e}")
        assert cast_err <= EXPORT_RTOL[dtype]


def test_dequantized_merge_rounds_in_the_dtype_training_ran_in(tiny_model_dir, tmp_path, monkeypatch):
    """"auto" trained in bf16 on one CPU; a merge on a CPU where "auto" is fp32 still quantizes from bf16."""
    from alpaca_lora.export.plan import plan_dequantized, plan_merge
    from alpaca_lora.model import load as model_module

    monkeypatch.setattr(model_module, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    result = finetune(tiny_model_dir, SHORT_RECORDS[:4], tmp_path / "adapter", max_steps=2, **FAST)
    assert result.compute_dtype == "bfloat16"
    assert json.loads((tmp_path / "adapter" / "train_results.json").read_text())["compute_dtype"] == "bfloat16"
    monkeypatch.setattr(model_module, "cpu_flags", lambda: frozenset({"avx2"}))  # another machine
    plan = plan_merge(tmp_path / "adapter", None, False)
    plan_dequantized(plan)
    assert plan.quant_dtype == torch.bfloat16
    merged = merge(tmp_path / "adapter", tmp_path / "merged", dtype="float32", merge_into="dequantized")
    assert json.loads((merged / "merge_report.json").read_text())["verification"]["passed"]


def test_batched_generation_equals_one_by_one(trained, dtype):
    instructions = ["Hi.", "Name the color of the sky.", "Write a long explanation of why the sky looks blue.",
                    "Give the opposite."]
    inputs = [None, None, None, "hot"]
    clear_cache()
    batched = generate(trained[dtype], instructions, inputs, max_new_tokens=8, batch_size=4, compute_dtype=dtype)
    single = [generate(trained[dtype], i, x, max_new_tokens=8, compute_dtype=dtype)
              for i, x in zip(instructions, inputs, strict=True)]
    print(f"generation [{dtype}]: {batched}")
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


# ---- hardware branches ------------------------------------------------------------------------------


@pytest.mark.parametrize("amx", [True, False])
def test_auto_dtype_on_a_cpu_with_and_without_native_bf16_trains(tiny_model_dir, tmp_path, monkeypatch, amx):
    """compute_dtype="auto" with the CPU check forced each way: bf16 with AMX, fp32 on AVX2 alone; both learn."""
    from alpaca_lora.model import load as model_module
    from alpaca_lora.train.recipe import fit
    from alpaca_lora.train.setup import setup

    flags = frozenset({"avx2", "fma"} | ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} if amx else set()))
    monkeypatch.setattr(model_module, "cpu_flags", lambda: flags)
    cfg = FinetuneConfig(**{**FAST, "batch_size": 8}, max_steps=20, compute_dtype="auto")
    run = setup(tiny_model_dir, SHORT_RECORDS, tmp_path, cfg)
    try:
        assert run.dtype == (torch.bfloat16 if amx else torch.float32)
        assert not run.scaler.enabled
        fit(run)
    finally:
        run.metrics.close()
    losses = _losses(tmp_path)
    print(f"auto dtype, amx={amx}: {run.dtype}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.6 * losses[0]


# ---- fp16 loss scaling ------------------------------------------------------------------------------


def test_fp16_gradients_underflow_without_loss_scaling_and_train_with_it(smol_tokenizer, tmp_path):
    """A base with small weights: its fp16 LoRA gradients flush to zero unless the loss is scaled."""
    from conftest import save_tiny_llama

    base = save_tiny_llama(tmp_path / "small-weights", smol_tokenizer, initializer_range=UNDERFLOW_INIT)
    results = {}
    for scaling in (False, True):
        out = tmp_path / f"scaling-{scaling}"
        finetune(base, SHORT_RECORDS, out, max_steps=4, batch_size=8, micro_batch_size=8, learning_rate=1e-2,
                 val_set_size=0, lora_dropout=0.0, warmup_ratio=0.0, compute_dtype="float16", loss_scaling=scaling)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        lora_b = [t for k, t in _adapter(out).items() if "lora_B" in k]
        results[scaling] = (rows, sum(int((t != 0).sum()) for t in lora_b), sum(t.numel() for t in lora_b))
    print(f"fp16 underflow: lora_B non-zero without scaling {results[False][1]}/{results[False][2]}, "
          f"with scaling {results[True][1]}/{results[True][2]}; grad norms "
          f"{[r['grad_norm'] for r in results[False][0]]} vs {[r['grad_norm'] for r in results[True][0]]}")
    unscaled, scaled = results[False][0], results[True][0]
    assert results[False][1] == 0 and all(r["grad_norm"] == 0 for r in unscaled)  # all flushed: nothing trains
    assert len({r["loss"] for r in unscaled}) == 1
    assert results[True][1] > 0.4 * results[True][2] and all(r["grad_norm"] > 0 for r in scaled)
    assert scaled[-1]["loss"] < scaled[0]["loss"]
    assert all(r["loss_scale"] == 2.0**16 and r["skipped"] is False for r in scaled)
    assert all("loss_scale" not in r for r in unscaled)


def test_fp16_overflowing_scale_skips_steps_then_trains(tiny_model_dir, tmp_path):
    """A scale far too high: overflowing steps are skipped (not a divergence), the scale halves, training goes on."""
    from alpaca_lora.train.recipe import fit, save
    from alpaca_lora.train.setup import setup

    cfg = FinetuneConfig(**{**FAST, "batch_size": 8}, max_steps=32, compute_dtype="float16")
    run = setup(tiny_model_dir, SHORT_RECORDS, tmp_path, cfg)
    run.scaler.scale = 2.0**28  # the scaled fp16 gradients overflow at first
    try:
        fit(run)
        save(run)
    finally:
        run.metrics.close()
    rows = [r for r in (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]
    skipped = [r for r in rows if r["skipped"]]
    print(f"fp16 overflow: {len(skipped)} skipped steps, scales {[r['loss_scale'] for r in rows[:12]]}")
    leading = next(i for i, r in enumerate(rows) if not r["skipped"])
    # Halving from 2^28, the scale fits from 2^16 on; later overflows are the ordinary fp16 back-off.
    assert [r["loss_scale"] for r in rows[:leading]] == [2.0 ** (27 - i) for i in range(leading)] and leading == 12
    # nothing was updated while skipping (the same 8 records each step, only packed in another order)
    assert all(r["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5) for r in rows[:leading])
    assert len(skipped) < 16 and not rows[-1]["skipped"] and rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert all(bool(t.isfinite().all()) for t in _adapter(tmp_path).values())


def test_loss_scaler_rule_and_state():
    from alpaca_lora.errors import CheckpointError
    from alpaca_lora.train.loss_scale import LossScaler

    off = LossScaler(enabled=False)
    off.update(overflow=True)
    assert off.scale == 1.0 and not off.exhausted()
    s = LossScaler(enabled=True, scale=8.0, growth_interval=2)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([8.0, -16.0, 4.0])
    s.unscale([p])
    assert p.grad.tolist() == [1.0, -2.0, 0.5]
    s.update(overflow=True)
    assert s.scale == 4.0 and s.good_steps == 0
    s.update(overflow=False)
    s.update(overflow=False)
    assert s.scale == 8.0 and s.good_steps == 0
    restored = LossScaler(enabled=True, growth_interval=2)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored == s
    for bad in ({"scale": "nan", "good_steps": 0, "enabled": True}, {"scale": 2.0}, [1, 2],
                {"scale": 2.0, "good_steps": 0, "enabled": False}):
        with pytest.raises(CheckpointError):
            LossScaler(enabled=True).load_state_dict(bad)
    s.scale = 0.5
    assert s.exhausted()


# ---- first run output -----------------------------------------------------------------------------------


def test_a_first_run_prints_no_bitsandbytes_notice_but_real_warnings_pass():
    import logging
    import subprocess
    import sys

    from alpaca_lora.kernels.bnb_import import _NOTICE_LOGGER, _NOTICE_PREFIX, _OptionalKernelNotice

    code = ("import alpaca_lora.kernels.lora_layer, alpaca_lora.kernels.cpu_linear4bit; "
            "from alpaca_lora.cli.main import main")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "kernels" not in proc.stderr, proc.stderr
    quiet = _OptionalKernelNotice()

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord(_NOTICE_LOGGER, logging.WARNING, __file__, 1, msg, (), None)

    assert not quiet.filter(record(_NOTICE_PREFIX + ": %s"))
    assert quiet.filter(record("Some real problem with 4-bit weights"))
    assert not logging.getLogger(_NOTICE_LOGGER).filters  # the filter lived only during the import
