"""merge(): merged logits equal adapter logits, a self-describing pickle-free export, wrong bases refused."""

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from alpaca_lora import ConfigError, ModelError
from alpaca_lora.export.hub import export_files
from alpaca_lora.export.layout import pickle_files
from alpaca_lora.export.merge import merge
from alpaca_lora.model.load import load_model
from alpaca_lora.train.recipe import finetune

RECORDS = [
    {"instruction": "Name the color of the sky.", "input": "", "output": "blue"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "What is two plus two?", "input": "", "output": "four"},
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
]
PROBES = ["Name the color of the sky.", "Give the opposite of hot, please, in one short word."]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A 4-bit (NF4) LoRA run on the tiny Llama: the folder finetune() writes."""
    out = tmp_path_factory.mktemp("adapter")
    finetune(tiny_model_dir, RECORDS, out, max_steps=5, batch_size=4, micro_batch_size=4, val_set_size=0,
             learning_rate=2e-2, lora_dropout=0.0, gradient_checkpointing=False, cutoff_len=64,
             quantization="nf4", compute_dtype="float32", warmup_ratio=0.0)
    return out


@pytest.fixture(scope="module")
def merged32(adapter, tmp_path_factory):
    return merge(adapter, tmp_path_factory.mktemp("export") / "merged32", dtype="float32")


def _ids(tokenizer):
    rows = [tokenizer(p).input_ids for p in PROBES]
    n = min(map(len, rows))
    return torch.tensor([r[:n] for r in rows])


def _logits(model, ids, training_path=False):
    # bitsandbytes runs 4-bit layers in eval mode through a bf16 kernel on CPUs with AVX512-BF16;
    # train mode (dropout is 0 here) takes the dequantize-then-matmul path that training used.
    with torch.no_grad():
        return model.train(training_path)(input_ids=ids).logits.float()


def _load(folder, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)


def test_merged_logits_equal_unmerged_adapter_logits(adapter, merged32, tiny_model_dir):
    base, tok = load_model(tiny_model_dir, None, "float32", device="cpu")
    ids = _ids(tok)
    plain = _logits(base, ids)
    unmerged = _logits(PeftModel.from_pretrained(base, adapter), ids)
    merged = _logits(_load(merged32), ids)
    diff = float((merged - unmerged).abs().max())
    print(f"max |merged - unmerged| = {diff:.3g}")
    assert diff <= 1e-4
    assert float((unmerged - plain).abs().max()) > 1e-3  # the adapter is not a no-op
    report = json.loads((merged32 / "merge_report.json").read_text())
    check = report["verification"]
    assert check["passed"] and 0 <= check["max_abs_logit_diff"] <= 1e-4
    # the tolerance is 1e-4 plus 1e-5 of the largest logit of the probe
    assert check["max_abs_logit"] > 0 and check["tolerance"] == pytest.approx(1e-4 + 1e-5 * check["max_abs_logit"])
    assert check["adapter_effect_max_abs_logit_diff"] > 1e-3
    assert report["dtype"] == "float32" and report["merge_into"] == "original" and report["adapted_weights"] == 8


def test_export_is_complete_and_pickle_free(adapter, merged32):
    names = {p.name for p in merged32.iterdir()}
    for required in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "prompt_template.json", "README.md", "merge_report.json"):
        assert required in names, required
    assert not {"adapter_config.json", "adapter_model.safetensors"} & names
    assert not any(p.is_dir() for p in merged32.iterdir())  # no checkpoint-N folders
    assert export_files(merged32) == sorted(names)  # push_to_hub uploads everything merge wrote
    assert pickle_files(merged32) == []
    assert (merged32 / "prompt_template.json").read_bytes() == (adapter / "prompt_template.json").read_bytes()
    # A plain transformers model: no LoRA tensors, the same tensor names as the base.
    with safe_open(str(merged32 / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "lora" in k] and fh.metadata() == {"format": "pt"}


def test_model_card_describes_the_model(adapter, merged32):
    card = (merged32 / "README.md").read_text()
    cfg = json.loads((adapter / "finetune_config.json").read_text())
    results = json.loads((adapter / "train_results.json").read_text())
    data = json.loads((adapter / "fingerprint.json").read_text())["data"]
    assert card.startswith("---\nlibrary_name: transformers")
    assert "`alpaca`" in card  # template name
    assert f"r={cfg['lora_r']}, alpha={cfg['lora_alpha']}, dropout={cfg['lora_dropout']}" in card
    assert cfg["lora_target_modules"] in card
    assert data["sha256"] in card and f"{data['num_records']} records" in card
    assert json.dumps(results["train_loss"]) in card
    assert "from alpaca_lora import generate" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "base_model:" not in card  # a local path is no Hub id; the Hub would reject it as metadata


def test_tokenizer_round_trip(adapter, merged32):
    original, saved = AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(merged32)
    for text in ["Hello world!", "### Response:\nfour", "naïve café ☕ 12345", "<|im_end|> after"]:
        ids = original(text).input_ids
        assert saved(text).input_ids == ids
        assert saved.decode(ids) == original.decode(ids)
    assert (saved.eos_token_id, saved.pad_token_id, saved.bos_token_id) == (
        original.eos_token_id, original.pad_token_id, original.bos_token_id)
    assert (merged32 / "tokenizer.json").read_bytes() == (adapter / "tokenizer.json").read_bytes()


def test_small_shards_write_an_index_and_reload_identically(adapter, merged32, tmp_path):
    out = merge(adapter, tmp_path / "sharded", dtype="float32", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    with safe_open(str(merged32 / "model.safetensors"), "pt") as fh:
        assert sorted(index["weight_map"]) == sorted(fh.keys())
    for f in files:  # every shard but a lone oversized tensor stays under the limit
        n = len(load_file(str(out / f)))
        assert (out / f).stat().st_size <= 100_000 + 4096 or n == 1
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    assert torch.equal(_logits(_load(out), ids), _logits(_load(merged32), ids))


def test_float16_export_holds_float16_tensors(adapter, tmp_path):
    out = merge(adapter, tmp_path / "fp16", dtype="float16")
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors and all(t.dtype == torch.float16 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    check = json.loads((out / "merge_report.json").read_text())["verification"]
    assert check["max_abs_logit_diff"] <= 1e-4 < check["export_dtype_max_abs_logit_diff"] < 0.5


def test_merge_into_dequantized_matches_the_4bit_training_forward(adapter, merged32, tiny_model_dir, tmp_path):
    base4, tok = load_model(tiny_model_dir, "nf4", "float32", device="cpu")
    ids = _ids(tok)
    trained = _logits(PeftModel.from_pretrained(base4, adapter), ids, training_path=True)  # what training saw
    deq = merge(adapter, tmp_path / "deq", dtype="float32", merge_into="dequantized")
    gap_deq = float((_logits(_load(deq), ids) - trained).abs().max())
    gap_orig = float((_logits(_load(merged32), ids) - trained).abs().max())
    print(f"|dequantized merge - 4-bit + adapter| = {gap_deq:.3g}, |original merge - 4-bit + adapter| = {gap_orig:.3g}")
    assert gap_deq < 1e-3 and gap_deq < gap_orig / 10
    assert json.loads((deq / "merge_report.json").read_text())["merge_into"] == "dequantized"


def test_dequantized_needs_a_4bit_trained_adapter(adapter, tmp_path):
    copy = _copy_adapter(adapter, tmp_path / "fp-adapter")
    cfg = json.loads((copy / "finetune_config.json").read_text())
    (copy / "finetune_config.json").write_text(json.dumps({**cfg, "quantization": None}))
    with pytest.raises(ConfigError, match="merge_into='original'"):
        merge(copy, tmp_path / "out", merge_into="dequantized")


def _tiny_base(folder, tokenizer, **changes):
    config = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**{**config, **changes})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_base_with_other_shapes_is_refused_even_when_allowed(adapter, smol_tokenizer, tmp_path):
    other = _tiny_base(tmp_path / "wide", smol_tokenizer, hidden_size=32, intermediate_size=64)
    with pytest.raises(ModelError, match="not the model the adapter") as info:
        merge(adapter, tmp_path / "out", base_model=other)
    assert "allow_base_mismatch=True" in str(info.value) and "hidden_size" in str(info.value)
    with pytest.raises(ModelError, match="does not fit"):
        merge(adapter, tmp_path / "out", base_model=other, allow_base_mismatch=True)
    assert not (tmp_path / "out" / "merge_report.json").exists()


def test_a_compatible_other_base_needs_allow_base_mismatch(adapter, smol_tokenizer, tmp_path):
    deeper = _tiny_base(tmp_path / "deeper", smol_tokenizer, num_hidden_layers=3)
    with pytest.raises(ModelError, match="num_hidden_layers"):
        merge(adapter, tmp_path / "out", base_model=deeper)
    out = merge(adapter, tmp_path / "out", base_model=deeper, allow_base_mismatch=True, dtype="float32")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["base_fingerprint_differences"] and report["verification"]["passed"]
    assert _load(out).config.num_hidden_layers == 3


def _copy_adapter(adapter, dest):
    shutil.copytree(adapter, dest, ignore=shutil.ignore_patterns("checkpoint-*"))
    return dest


def test_an_unavailable_recorded_base_asks_for_base_model(adapter, tiny_model_dir, tmp_path):
    copy = _copy_adapter(adapter, tmp_path / "moved")
    fp = json.loads((copy / "fingerprint.json").read_text())
    fp["base_model"].update(name_or_path="/nowhere/base", resolved_path="/nowhere/base")
    (copy / "fingerprint.json").write_text(json.dumps(fp))
    cfg = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/nowhere/base"}))
    with pytest.raises(ModelError, match="pass base_model="):
        merge(copy, tmp_path / "out")
    assert (merge(copy, tmp_path / "out", base_model=tiny_model_dir) / "model.safetensors").is_file()


def test_an_untrained_adapter_is_refused_before_anything_is_written(adapter, tmp_path):
    """lora_B all zero (saved at step 0, or saved empty as tloen/alpaca-lora#293 did) would export the base as is."""
    copy = _copy_adapter(adapter, tmp_path / "empty")
    weights = load_file(str(copy / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(copy / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="does not change the model's logits at all: it is untrained"):
        merge(copy, tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_wrong_merge_fails_verification_and_leaves_no_export(adapter, tmp_path, monkeypatch):
    """Break the merge math on purpose (a 10% wrong LoRA scale): the logit check must catch it."""
    from alpaca_lora.model.adapter_files import LoraAdapter

    scale = LoraAdapter.scale
    monkeypatch.setattr(LoraAdapter, "scale", lambda self, module: 1.1 * scale(self, module))
    with pytest.raises(ModelError, match="verification failed"):
        merge(adapter, tmp_path / "out", dtype="float32")
    assert not list((tmp_path / "out").iterdir())
    monkeypatch.undo()


def test_bad_arguments_and_output_folders(adapter, tmp_path):
    for kwargs, match in (({"dtype": "int8"}, "dtype"), ({"merge_into": "4bit"}, "merge_into"),
                          ({"max_shard_size": "lots"}, "max_shard_size"), ({"max_shard_size": 0}, "max_shard_size")):
        with pytest.raises(ConfigError, match=match):
            merge(adapter, tmp_path / "out", **kwargs)
    with pytest.raises(ConfigError, match="adapter folder"):
        merge(adapter, adapter)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        merge(adapter, tmp_path / "busy")
    with pytest.raises(ModelError, match="adapter_config.json"):
        merge(tmp_path / "busy", tmp_path / "out")


def test_re_export_into_an_earlier_export_leaves_no_stale_shard(adapter, tmp_path):
    out = merge(adapter, tmp_path / "out", max_shard_size="100KB", verify=False)
    assert (out / "model.safetensors.index.json").is_file()
    merge(adapter, out, verify=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "merge_report.json").read_text())["verification"] is None


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, transformers, peft  # the interpreter baseline: what any merge needs loaded

    def status(key):  # kB -> bytes, this process only (ru_maxrss would include the forking parent's pages)
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    baseline = status("VmRSS")
    from alpaca_lora.export.merge import merge
    merge(sys.argv[1], sys.argv[2], dtype="float16")
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc/self/status")
def test_merging_the_135m_base_peaks_under_1_6x_the_fp16_model(smol_dir, tmp_path):
    """Peak RSS of a verified fp16 merge of SmolLM2-135M, in a fresh process, over its import baseline."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(smol_dir, use_safetensors=True)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    model.save_pretrained(tmp_path / "adapter")
    del base, model
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "adapter"), str(tmp_path / "merged")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in (tmp_path / "merged").glob("*.safetensors"))
    used = rss["peak"] - rss["baseline"]
    check = json.loads((tmp_path / "merged" / "merge_report.json").read_text())["verification"]
    print(f"merge peak RSS over baseline {used / 1e6:.0f} MB for a {size / 1e6:.0f} MB fp16 model "
          f"({used / size:.2f}x); max |merged - unmerged| logit {check['max_abs_logit_diff']:.2e}")
    assert used <= 1.6 * size
    assert check["passed"] and check["max_abs_logit_diff"] <= 1e-4


# ---- issue #19: damaged adapters and other bad input end in our errors -------------------------------


def _edit(adapter, dest, config=None, tensors=None, files=None):
    """A copy of ``adapter`` with config fields set, ``tensors(state) -> state`` applied, files overwritten."""
    copy = _copy_adapter(adapter, dest)
    if config is not None:
        cfg = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        save_file(tensors(load_file(str(copy / "adapter_model.safetensors"))), str(copy / "adapter_model.safetensors"))
    for name, data in (files or {}).items():
        (copy / name).write_bytes(data)
    return copy


@pytest.mark.parametrize(("name", "change", "match"), [
    ("truncated", {"files": {"adapter_model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\""}}, "truncated"),
    ("config-string", {"files": {"adapter_config.json": b'"LORA"'}}, "JSON object"),
    ("alpha-nan", {"files": {"adapter_config.json": b'{"peft_type": "LORA", "r": 16, "lora_alpha": NaN, '
                                                    b'"target_modules": ["q_proj"]}'}}, "lora_alpha=nan"),
    ("rank", {"config": {"r": 8}}, "do not match r=8"),  # the weights have rank 16: a scale of alpha/8 is wrong
    ("targets", {"config": {"target_modules": ["v_proj"]}}, "does not select"),
    ("int-weights", {"tensors": lambda s: {k: v.to(torch.int32) for k, v in s.items()}}, "floating point"),
    ("template", {"files": {"prompt_template.json": b'["not", "a", "template"]'}}, "prompt_template.json"),
])
def test_a_damaged_adapter_is_a_model_error_naming_the_file(adapter, tmp_path, name, change, match):
    copy = _edit(adapter, tmp_path / name, **change)
    with pytest.raises(ModelError, match=match) as info:
        merge(copy, tmp_path / "out", verify=False)
    assert str(copy) in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing written


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_a_diverged_adapter_is_refused_as_such_not_as_a_full_disk(adapter, tmp_path, bad):
    copy = _edit(adapter, tmp_path / "nan", tensors=lambda s: {
        k: v.fill_(bad) if "layers.0.self_attn.q_proj.lora_A" in k else v for k, v in s.items()})
    with pytest.raises(ModelError, match="NaN or infinite") as info:
        merge(copy, tmp_path / "out")
    message = str(info.value)
    assert "layers.0.self_attn.q_proj.lora_A" in message and "diverged" in message and "disk" not in message
    assert "learning_rate" in message and "checkpoint" in message


def test_a_merged_weight_past_float16_is_refused(adapter, tmp_path):
    copy = _edit(adapter, tmp_path / "huge", config={"lora_alpha": 1e9})
    with pytest.raises(ModelError, match="exceeds the range of torch.float16") as info:
        merge(copy, tmp_path / "out", verify=False)
    assert "bfloat16" in str(info.value)
    assert (merge(copy, tmp_path / "out32", dtype="float32", verify=False) / "model.safetensors").is_file()


def test_a_base_holding_nan_is_refused(adapter, tiny_model_dir, tmp_path):
    base = shutil.copytree(tiny_model_dir, tmp_path / "nan-base")
    state = load_file(str(base / "model.safetensors"))
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.norm.weight of the base .* NaN"):
        merge(adapter, tmp_path / "out", base_model=base, allow_base_mismatch=True, verify=False)


def test_a_damaged_record_of_the_run_leaves_the_card_blank_but_merges(adapter, tmp_path, caplog):
    copy = _edit(adapter, tmp_path / "records", files={"train_results.json": b"[1, 2]",
                                                       "fingerprint.json": b'{"data": [1]}'})
    with caplog.at_level(logging.WARNING, logger="alpaca_lora.export.merge"):
        out = merge(copy, tmp_path / "out", verify=False)
    assert (out / "README.md").is_file() and "Final metrics | `{}`" in (out / "README.md").read_text()
    assert any("train_results.json" in r.getMessage() for r in caplog.records)


def test_bad_paths_and_argument_types(adapter, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        merge(adapter, tmp_path / "a-file")
    with pytest.raises(ConfigError, match="inside the adapter folder"):
        merge(adapter, adapter / "merged")
    assert not (adapter / "merged").exists()
    with pytest.raises(ModelError, match="is a file; pass the folder"):
        merge(adapter, tmp_path / "out", base_model=tmp_path / "a-file")
    for kwargs, match in (({"dtype": ["float16"]}, "dtype"), ({"verify": "yes"}, "verify"),
                          ({"allow_base_mismatch": 1}, "allow_base_mismatch"), ({"base_model": 5}, "base_model")):
        with pytest.raises(ConfigError, match=match):
            merge(adapter, tmp_path / "out", **kwargs)
    with pytest.raises(ConfigError, match="output_dir"):
        merge(adapter, None)
