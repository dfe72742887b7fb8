"""LoRA variants: DoRA, rsLoRA, LoRA+, and the PiSSA / OLoRA / LoftQ / gaussian initialisations.

Each variant trains the tiny model, merges with the usual check (merged == unmerged logits) and resumes
exactly; the fused layers compute what peft's do; the saved forms load anywhere a LoRA adapter does.
"""

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from alpaca_lora import ConfigError, FinetuneConfig, ModelError, finetune, merge
from alpaca_lora.config_lora import lora_variants
from alpaca_lora.model.load import load_model
from alpaca_lora.model.lora import attach_lora
from alpaca_lora.model.lora_init import initial_factors, to_plain_lora
from conftest import SHORT_RECORDS

VARIANTS = {
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "loraplus": {"loraplus_lr_ratio": 16},
    "gaussian": {"init_lora_weights": "gaussian"},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa_niter": {"init_lora_weights": "pissa_niter_4"},
    "olora": {"init_lora_weights": "olora"},
    "loftq": {"init_lora_weights": "loftq"},
}
RUN = dict(batch_size=4, micro_batch_size=2, learning_rate=3e-3, lora_r=4, lora_alpha=8, lora_dropout=0.1,
           val_set_size=0, warmup_ratio=0.0, cutoff_len=64, save_steps=3, seed=5)


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


# ---- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"init_lora_weights": "pisa"}, r"did you mean 'pissa'\?"),
    ({"init_lora_weights": "pissa_niter_0"}, "pissa_niter_N"),
    ({"init_lora_weights": True}, "init_lora_weights=True"),
    ({"init_lora_weights": "loftq", "quantization": None}, "LoftQ fits the adapter to the NF4 base"),
    ({"init_lora_weights": "loftq", "quantization": "fp4"}, "use quantization='nf4'"),
    ({"init_lora_weights": "pissa", "quantization": "int8"}, "cannot be stored in 8 bits"),
    ({"loraplus_lr_ratio": 0}, r"loraplus_lr_ratio=0: must be a finite number in \(0, 1e6\]"),
    ({"loraplus_lr_ratio": float("nan")}, "loraplus_lr_ratio=nan"),
    ({"loraplus_lr_ratio": "16"}, "write a number, not text"),
    ({"use_dora": "yes"}, "use_dora='yes': must be True or False"),
    ({"use_rslora": 1}, "use_rslora=1: must be True or False"),
    ({"fsdp": True, "use_dora": True, "loraplus_lr_ratio": 16}, "fsdp=True with use_dora=True, loraplus_lr_ratio"),
    ({"fsdp": True, "init_lora_weights": "olora"}, "fsdp=True with init_lora_weights='olora'"),
])
def test_config_refuses_what_a_variant_cannot_do(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**kwargs)


def test_variants_are_named_in_the_preflight_summary_and_the_defaults_name_none():
    from alpaca_lora.train.memory import estimate_memory

    assert lora_variants(FinetuneConfig().to_dict()) == []
    cfg = FinetuneConfig(use_dora=True, use_rslora=True, loraplus_lr_ratio=16, init_lora_weights="pissa_niter_4")
    assert lora_variants(cfg.to_dict()) == ["DoRA", "rsLoRA", "LoRA+ x16", "init pissa_niter_4"]
    assert lora_variants({"lora_r": 8}) == []  # a finetune_config.json of an older run
    # DoRA trains a magnitude per output row and keeps W + s B A of one weight for its norm
    plain = estimate_memory({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "vocab_size": 1000}, lora_r=4)
    dora = estimate_memory({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "vocab_size": 1000}, lora_r=4, use_dora=True)
    assert dora.assumptions["lora_parameters"] == plain.assumptions["lora_parameters"] + 2 * 4 * 64
    assert dora.parts["workspace"] == plain.parts["workspace"] + 2 * 4 * 64 * 64
    assert dora.parts["activations"] > plain.parts["activations"]


def test_preflight_log_names_the_variants(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="alpaca_lora"):
        finetune(tiny_model_dir, SHORT_RECORDS, tmp_path / "run", max_steps=1, **{**RUN, "use_dora": True,
                                                                                  "loraplus_lr_ratio": 4})
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("preflight:"))
    assert "on attention (DoRA, LoRA+ x4)" in line


# ---- the fused layers ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["rslora", "dora", "gaussian", "pissa", "olora", "loftq"])
def test_fused_layers_compute_what_peft_computes(tiny_model_dir, variant, caplog):
    """Outputs and gradients equal with the fused layers and with peft's (DoRA: the fused path falls back)."""
    from alpaca_lora.kernels import lora_layer

    lora_layer._fallback_once.cache_clear()  # logged once per process: an earlier test may have used it up
    quantization = "nf4"
    results = []
    for fused in (True, False):
        cfg = FinetuneConfig(quantization=quantization, fused_lora=fused, lora_dropout=0.0, lora_r=4,
                             lora_target_modules="all-linear", **VARIANTS[variant])
        with caplog.at_level(logging.INFO, logger="alpaca_lora.kernels.lora_layer"):
            model = attach_lora(load_model(tiny_model_dir, quantization, "float32", device="cpu")[0], cfg).train()
            gen = torch.Generator().manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.add_(torch.randn(p.shape, generator=gen) * 0.1)
            ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (logits_f, grads_f), (logits_p, grads_p) = results
    torch.testing.assert_close(logits_f, logits_p, atol=1e-4, rtol=1e-4)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-4, rtol=1e-3)
    fell_back = any("computed by peft's own LoRA forward" in r.getMessage() for r in caplog.records)
    assert fell_back is (variant == "dora")


# ---- initialisations -------------------------------------------------------------------------------


@torch.no_grad()
def _quantization_errors(model, tiny_model_dir, cfg):
    """Per adapted layer: (|W - (Q(base) + s B A)|, |W - Q(W)|) in the Frobenius norm, W the fp32 original."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file as read

    original = read(str(tiny_model_dir / "model.safetensors"))
    plain = load_model(tiny_model_dir, "nf4", "float32", device="cpu")[0]
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            w = original[key].float()
            base = m.get_base_layer().weight
            start = bnb.functional.dequantize_4bit(base.data, base.quant_state) + m.scaling["default"] * (
                m.lora_B["default"].weight @ m.lora_A["default"].weight)
            q = plain.get_submodule(key.removesuffix(".weight")).weight
            out.append((float((w - start).norm()), float((w - bnb.functional.dequantize_4bit(q.data, q.quant_state))
                                                         .norm())))
    return out


@pytest.mark.parametrize("init", ["loftq", "pissa"])
def test_loftq_and_qpissa_start_closer_to_the_full_precision_weights(tiny_model_dir, init):
    """The reason for both on a 4-bit base: base + adapter at step 0 is nearer W than NF4(W) alone."""
    cfg = FinetuneConfig(quantization="nf4", lora_r=8, lora_target_modules="all-linear", init_lora_weights=init)
    model = attach_lora(load_model(tiny_model_dir, "nf4", "float32", device="cpu")[0], cfg)
    errors = _quantization_errors(model, tiny_model_dir, cfg)
    assert len(errors) == 2 * 7
    assert all(after < before for after, before in errors), errors
    print(f"{init}: |W - start| / |W - NF4(W)| = {sum(a for a, _ in errors) / sum(b for _, b in errors):.3f}")


@pytest.mark.parametrize("variant", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_residual_adapters_are_saved_as_plain_lora_on_the_original_base(tiny_model_dir, tmp_path, variant, rslora):
    """Trained A, B on the residual base == the saved rank-2r adapter on the untouched base (fp32, no 4-bit)."""
    from peft import PeftModel

    cfg = FinetuneConfig(quantization=None, lora_r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora,
                         lora_target_modules="all-linear", **VARIANTS[variant])
    model = attach_lora(load_model(tiny_model_dir, None, "float32", device="cpu")[0], cfg).eval()
    initial = initial_factors(model)
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_" in name:  # "training": move A and B away from where they started
            p.data.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    to_plain_lora(tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "adapter" / "adapter_config.json",
                  initial)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(8 * math.sqrt(2) if rslora else 16)
    base = load_model(tiny_model_dir, None, "float32", device="cpu")[0]
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    torch.testing.assert_close(again, trained, atol=2e-4, rtol=1e-4)


# ---- each variant: train, merge, resume -------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_merges_and_resumes_exactly(tiny_model_dir, tmp_path, variant):
    settings = {**RUN, **VARIANTS[variant], "quantization": "nf4", "compute_dtype": "float32"}
    full = finetune(tiny_model_dir, SHORT_RECORDS, tmp_path / "full", max_steps=6, **settings)
    losses = _losses(tmp_path / "full")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    print(f"{variant}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    # resume the finished run from its checkpoint-3: steps 4 to 6 again give the same adapter and losses
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    resumed = finetune(tiny_model_dir, SHORT_RECORDS, tmp_path / "full", max_steps=6, resume_from_checkpoint=True,
                       **settings)
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "full") == losses
    # merged == unmerged (merge's own check, against peft's forward of the saved adapter)
    merged = merge(full.adapter_dir, tmp_path / "merged", dtype="float32")
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["adapter_effect_max_abs_logit_diff"] > 0
    assert report["merge_into"] == ("dequantized" if variant == "loftq" else "original")
    card = (merged / "README.md").read_text()
    assert all(v in card for v in lora_variants(settings))
    saved = json.loads((full.adapter_dir / "adapter_config.json").read_text())
    residual = variant in ("pissa", "pissa_niter", "olora")
    assert saved["r"] == (8 if residual else 4) and saved.get("use_dora", False) is (variant == "dora")
    if variant == "dora":
        assert any(k.endswith("lora_magnitude_vector") for k in a)
    if residual:  # a checkpoint keeps the raw form, which merges only after the run converts it
        raw = json.loads((tmp_path / "full" / "checkpoint-3" / "adapter_config.json").read_text())
        assert raw["init_lora_weights"] == settings["init_lora_weights"] and raw["r"] == 4
        with pytest.raises(ModelError, match="raw form of an init_lora_weights="):
            merge(tmp_path / "full" / "checkpoint-3", tmp_path / "raw-merged")


def test_loraplus_trains_b_at_the_ratio_of_the_learning_rate(tiny_model_dir, tmp_path):
    from alpaca_lora.train.setup import setup

    run = setup(tiny_model_dir, SHORT_RECORDS, tmp_path / "run",
                FinetuneConfig(**{**RUN, "loraplus_lr_ratio": 16, "max_steps": 1}))
    groups = run.optimizer.param_groups
    names = {id(p): n for n, p in run.model.named_parameters()}
    assert [g["initial_lr"] for g in groups] == [pytest.approx(3e-3), pytest.approx(3e-3 * 16)]
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"]) and groups[1]["params"]
    run.metrics.close()


COMBINED = {  # every variant in four runs: they combine freely, except the initialisations
    "dora+rslora+loraplus+pissa": {**VARIANTS["dora"], **VARIANTS["rslora"], **VARIANTS["loraplus"],
                                   **VARIANTS["pissa"]},
    "olora": VARIANTS["olora"],
    "loftq": VARIANTS["loftq"],
    "gaussian": VARIANTS["gaussian"],
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", list(COMBINED))
def test_each_variant_trains_in_reduced_precision(tiny_model_dir, tmp_path, variant, dtype):
    """The precision matrix: every variant, on the 4-bit base, in bf16 and fp16 (autocast on the CPU)."""
    settings = {**RUN, **COMBINED[variant], "quantization": "nf4", "compute_dtype": dtype, "save_steps": 1000,
                "learning_rate": 2e-2, "lora_dropout": 0.0, "micro_batch_size": 4}
    result = finetune(tiny_model_dir, SHORT_RECORDS, tmp_path / "run", max_steps=10, **settings)
    losses = _losses(tmp_path / "run")
    last_three = sum(losses[-3:]) / 3
    print(f"{variant} [{dtype}]: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"last three / first {last_three / losses[0]:.3f}")
    assert result.compute_dtype == dtype and all(math.isfinite(x) for x in losses)
    # a tenth off in ten steps, judged on the mean of the last three steps (measured 0.75-0.87): each
    # step trains another micro-batch, and one batch's loss alone moves by +-10% at this learning rate
    assert last_three < 0.9 * losses[0]
    tensors = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


# ---- where the saved adapters go -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dora_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora") / "run"
    finetune(tiny_model_dir, SHORT_RECORDS, out, max_steps=4, **{**RUN, "use_dora": True, "quantization": None,
                                                                   "compute_dtype": "float32", "learning_rate": 2e-2})
    return out


def test_a_dora_adapter_generates_as_its_merged_model_and_exports_merged_gguf(dora_run, tmp_path):
    from alpaca_lora import export_gguf, generate

    merged = merge(dora_run, tmp_path / "merged", dtype="float32")
    prompts = [r["instruction"] for r in SHORT_RECORDS[:3]]
    assert generate(dora_run, prompts, max_new_tokens=5, compute_dtype="float32", quantization=None) == \
        generate(merged, prompts, max_new_tokens=5, compute_dtype="float32")
    out = export_gguf(dora_run, tmp_path / "dora.gguf", quantization="f32")
    assert json.loads(out.with_name("dora.json").read_text())["verification"]["passed"]
    with pytest.raises(ModelError, match="DoRA adapter; llama.cpp's LoRA GGUF holds A and B only"):
        export_gguf(dora_run, tmp_path / "adapter.gguf", quantization="f32", adapter_only=True)
    assert not (tmp_path / "adapter.gguf").exists()


@pytest.mark.parametrize("init", ["loftq", "pissa", "olora"])
def test_dora_starts_from_the_same_model_as_lora_with_each_init(tiny_model_dir, init):
    """DoRA's magnitudes are taken after the initialisation: at step 0 the DoRA model is the LoRA model."""
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for dora in (False, True):
        cfg = FinetuneConfig(quantization="nf4", lora_r=4, lora_dropout=0.0, lora_target_modules="all-linear",
                             init_lora_weights=init, use_dora=dora)
        model = attach_lora(load_model(tiny_model_dir, "nf4", "float32", device="cpu")[0], cfg).train()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=2e-4, rtol=1e-4)
