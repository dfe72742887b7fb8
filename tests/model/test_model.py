import pytest
import torch

from alpaca_lora import ConfigError, FinetuneConfig, ModelError
from alpaca_lora.model.load import load_model, load_tokenizer, resolve_compute_dtype
from alpaca_lora.model.lora import attach_lora, resolve_target_modules
from conftest import with_custom_code


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


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, torch.bfloat16),  # Xeon with AMX
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),  # EPYC Zen 4/5: AVX512-BF16, no AMX
    ({"avx2", "fma"}, torch.float32),  # bf16 would be emulated
])
def test_cpu_auto_dtype_follows_native_bf16(monkeypatch, flags, expected):
    """Each branch of the CPU check, forced: bf16 with native bf16 products, fp32 without."""
    from alpaca_lora.model import load as model_module

    monkeypatch.setattr(model_module, "cpu_flags", lambda: frozenset(flags))
    assert model_module.cpu_has_native_bf16() is (expected == torch.bfloat16)
    assert resolve_compute_dtype("auto", torch.device("cpu")) == expected
    assert resolve_compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError):
        resolve_compute_dtype("float8", torch.device("cpu"))


def test_cpu_flags_are_read_from_the_flags_line():
    from alpaca_lora.model.load import cpu_flags, cpu_has_native_bf16

    assert cpu_has_native_bf16(frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert cpu_has_native_bf16(frozenset({"avx2", "avx512_bf16"}))
    assert not cpu_has_native_bf16(frozenset({"avx2", "avx512f", "avx512_vnni"}))
    flags = cpu_flags()
    assert isinstance(flags, frozenset) and ("fpu" in flags or not flags)  # every x86 Linux CPU has fpu


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_auto_dtype_follows_bf16_support(monkeypatch, bf16, expected):
    """Both branches of the GPU check, forced: bf16 on Ampere and newer, fp16 (loss-scaled) before."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_compute_dtype("auto", torch.device("cuda")) == expected


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(tmp_path / "nope")


def test_tokenizer_pad_falls_back_without_breaking_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_setup_leaves_the_4bit_model_trainable_after_a_no_grad_probe(tiny_model_dir, tmp_path):
    """A no-grad forward right after setup() must not repack 4-bit weights for inference-only kernels."""
    from alpaca_lora import FinetuneConfig
    from alpaca_lora.train.recipe import micro_batch_loss
    from alpaca_lora.train.setup import setup

    records = [{"instruction": "Say hi", "input": "", "output": "hi"}] * 4
    run = setup(tiny_model_dir, records, tmp_path, FinetuneConfig(val_set_size=0, max_steps=1, cutoff_len=96))
    with torch.no_grad():
        micro_batch_loss(run, run.collator([run.train_set[i] for i in range(2)]))
    import bitsandbytes as bnb

    layers = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.training for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    run.metrics.close()


def test_cpu_load_keeps_no_tensor_inside_the_mapped_weight_file(tiny_model_dir):
    """An fp32 checkpoint's embedding is a view of the mmap'd file; after loading it must own its memory."""
    from transformers import AutoModelForCausalLM

    from alpaca_lora.model.load import _mapped_weight_ranges, copy_file_backed_tensors, load_model

    def pointing_into_files(model: torch.nn.Module) -> int:
        ranges = _mapped_weight_ranges()
        return sum(any(a <= t.untyped_storage().data_ptr() < b for a, b in ranges)
                   for t in [*model.parameters(), *model.buffers()])

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # what from_pretrained alone leaves
    if not pointing_into_files(plain):
        pytest.skip("this platform shows no memory-mapped weights (no /proc/self/maps)")
    embedding = plain.get_input_embeddings().weight.detach().clone()
    assert copy_file_backed_tensors(plain) > 0 and pointing_into_files(plain) == 0
    assert torch.equal(plain.get_input_embeddings().weight, embedding)  # same values, own memory
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight  # still tied

    model, _ = load_model(tiny_model_dir, device="cpu")
    assert pointing_into_files(model) == 0


def test_no_grad_forward_pauses_checkpointing_and_restores_it(tiny_model_dir, tmp_path):
    """Evaluation runs the layers without checkpointing (no per-layer warning) and training gets it back."""
    import warnings

    from alpaca_lora import FinetuneConfig
    from alpaca_lora.train.recipe import evaluate
    from alpaca_lora.train.setup import setup

    records = [{"instruction": "Say hi", "input": "", "output": "hi"}] * 8
    run = setup(tiny_model_dir, records, tmp_path, FinetuneConfig(val_set_size=2, max_steps=1, cutoff_len=96))
    flags = [m for m in run.model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert flags
    grad_modes = []
    loss_sum = run.loss_sum
    run.loss_sum = lambda *a: grad_modes.append(torch.is_grad_enabled()) or loss_sum(*a)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert evaluate(run) > 0
    assert grad_modes and not any(grad_modes)  # no autograd graph is built for the eval loss
    assert not [w for w in caught if "requires_grad" in str(w.message)]
    assert all(m.gradient_checkpointing for m in flags)
    run.metrics.close()


# ---- hostile base folders (issue #19) -------------------------------------------------------------

def _custom_code_copy(source, folder, where="config.json"):
    """``source`` copied to ``folder`` with an ``auto_map`` in ``where``; its evil.py would write ``folder/RAN``."""
    return with_custom_code(source, folder, where, folder / "RAN")


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_folder_with_its_own_code_is_refused_without_running_it(tiny_model_dir, tmp_path, where):
    folder = _custom_code_copy(tiny_model_dir, tmp_path / "custom", where)
    for load in (load_tokenizer, lambda f: load_model(f, None, "float32", device="cpu")):
        with pytest.raises(ModelError, match="auto_map") as info:
            load(folder)
        assert str(folder) in str(info.value) and where in str(info.value) and "trust_remote_code" in str(info.value)
    assert not (folder / "RAN").exists()


def _damaged_copy(source, folder):
    import shutil

    shutil.copytree(source, folder)
    return folder


def test_a_truncated_base_weight_file_names_the_file(tiny_model_dir, tmp_path):
    folder = _damaged_copy(tiny_model_dir, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut in half
    with pytest.raises(ModelError, match="truncated") as info:
        load_model(folder, None, "float32", device="cpu")
    assert str(weights) in str(info.value) and "download it again" in str(info.value)


def test_a_tensor_missing_from_the_base_is_an_error_not_a_random_init(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _damaged_copy(tiny_model_dir, tmp_path / "missing-tensor")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ModelError, match="model.layers.1.self_attn.q_proj.weight") as info:
        load_model(folder, "nf4", "float32", device="cpu")
    assert str(folder / "config.json") in str(info.value) and "download the folder again" in str(info.value)


def test_a_config_for_fewer_layers_than_the_weights_is_an_error(tiny_model_dir, tmp_path):
    """Weights of a second layer that config.json does not mention would be dropped silently."""
    import json

    folder = _damaged_copy(tiny_model_dir, tmp_path / "one-layer-config")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ModelError, match="model.layers.1") as info:
        load_model(folder, None, "float32", device="cpu")
    assert str(folder) in str(info.value) and "copy it again" in str(info.value)


def test_a_config_of_the_wrong_json_type_names_the_file(tiny_model_dir, tmp_path):
    folder = _damaged_copy(tiny_model_dir, tmp_path / "list-config")
    (folder / "config.json").write_text('[{"model_type": "llama"}]')
    with pytest.raises(ModelError, match="JSON object") as info:
        load_model(folder, None, "float32", device="cpu")
    assert str(folder / "config.json") in str(info.value) and "restore the config.json" in str(info.value)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_model_dir, tmp_path):
    import json

    folder = _damaged_copy(tiny_model_dir, tmp_path / "big-tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|my_new_pad|>"}))
    assert len(load_tokenizer(folder)) == 49153  # the new pad token got the id 49152
    with pytest.raises(ModelError, match="49,153 tokens but the model's embedding has 49,152 rows") as info:
        load_model(folder, None, "float32", device="cpu")
    assert str(folder) in str(info.value) and "resize_token_embeddings" in str(info.value)


def test_a_pad_token_id_outside_the_vocabulary_is_refused(tiny_model_dir, tmp_path):
    """A hand-edited tokenizer.json gives the pad token an id far past the last row of the vocabulary."""
    import json

    folder = _damaged_copy(tiny_model_dir, tmp_path / "pad-out-of-range")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<pad>"] = 99999
    tok["added_tokens"].append({"id": 99999, "content": "<pad>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}))
    with pytest.raises(ModelError, match="pad token '<pad>' the id 99999") as info:
        load_tokenizer(folder)
    assert str(folder) in str(info.value) and "tokenizer_config.json" in str(info.value)


@pytest.mark.parametrize(("name", "why"), [("lm_head", "is the output head"),
                                           ("embed_tokens", r"not a linear layer \(it is a Embedding\)"),
                                           ("input_layernorm", "not a linear layer"),
                                           ("self_attn", "not a linear layer")])
def test_lora_targets_outside_the_decoders_linear_layers_are_refused_up_front(tiny_model_dir, name, why):
    model, _ = load_model(tiny_model_dir, None, "float32", device="cpu")
    with pytest.raises(ModelError, match=why) as info:
        resolve_target_modules(model, ["q_proj", name])
    message = str(info.value)
    assert "decoder" in message and "'down_proj'" in message and "'lm_head'" not in message.split("are ")[-1]
    assert resolve_target_modules(model, ["q_proj", "down_proj"]) == ["q_proj", "down_proj"]


def test_attach_lora_seeds_lora_a_from_the_config_and_leaves_the_callers_rng_alone(tiny_model_dir):
    """LoRA A is what torch.manual_seed(config.seed) gives, every time, and the caller's RNG state is kept."""
    from peft import LoraConfig, get_peft_model

    cfg = FinetuneConfig(lora_r=4, seed=7, fused_lora=False, gradient_checkpointing=False)

    def lora_a(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    torch.manual_seed(1234)
    torch.rand(3)  # a state of the caller's own
    before = torch.get_rng_state()
    first = lora_a(attach_lora(load_model(tiny_model_dir, None, "float32", device="cpu")[0], cfg))
    assert torch.equal(torch.get_rng_state(), before)
    second = lora_a(attach_lora(load_model(tiny_model_dir, None, "float32", device="cpu")[0], cfg))
    assert first and first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    model, _ = load_model(tiny_model_dir, None, "float32", device="cpu")
    torch.manual_seed(cfg.seed)  # the weights a global seed gives
    reference = lora_a(get_peft_model(model, LoraConfig(r=4, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                        bias="none", task_type="CAUSAL_LM")))
    assert reference.keys() == first.keys() and all(torch.equal(first[n], reference[n]) for n in first)
