"""New tokens: added whole, rows started at the mean, trained alone, saved small, merged, generated, exported."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_lora import ConfigError, FinetuneConfig, ModelError, export_gguf, finetune, generate, merge
from alpaca_lora.model.load import load_model
from alpaca_lora.model.new_tokens import add_to_tokenizer, init_new_rows
from conftest import SHORT_RECORDS, save_tiny_llama

NEW = ["<frob>", "<grunt>"]
SPECIAL = ["<|tool|>"]
RECORDS = [dict(r, output=f"{r['output']} <frob>", input=(r["input"] + " <|tool|>").strip()) for r in SHORT_RECORDS]
RUN = dict(batch_size=4, micro_batch_size=2, learning_rate=1e-2, lora_r=4, lora_alpha=8, val_set_size=0,
           warmup_ratio=0.0, cutoff_len=64, save_steps=3, quantization="nf4", compute_dtype="float32",
           add_tokens=[*NEW, "echo"], special_tokens=SPECIAL)


@pytest.fixture(scope="module", params=["tied", "untied"])
def base(request, tiny_model_dir, smol_tokenizer, tmp_path_factory):
    if request.param == "tied":
        return tiny_model_dir
    return save_tiny_llama(tmp_path_factory.mktemp("untied"), smol_tokenizer, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("new-tokens") / "run"
    result = finetune(base, RECORDS, out, max_steps=6, **RUN)
    return base, result


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"add_tokens": "<frob>"}, "add_tokens='<frob>': must be None or a list"),
    ({"add_tokens": []}, "a list of 1 to"),
    ({"special_tokens": ["  "]}, "non-blank strings"),
    ({"add_tokens": ["<a>"], "special_tokens": ["<a>"]}, r"\['<a>'\] given more than once"),
    ({"add_tokens": ["<a>"], "fsdp": True}, "fsdp=True with add_tokens"),
])
def test_config_refuses_bad_token_lists(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**kwargs)


def test_tokens_are_added_whole_and_known_ones_skipped(tiny_model_dir, caplog):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = len(tok)
    with caplog.at_level(logging.WARNING, logger="alpaca_lora"):
        new = add_to_tokenizer(tok, [*NEW, "echo"], SPECIAL)
    assert new.ids == [before, before + 1, before + 2] and new.skipped == ["echo"] and new.old_size == before
    assert "already in the vocabulary, skipped: ['echo']" in caplog.text
    ids = tok("say <frob> then <|tool|>", add_special_tokens=False)["input_ids"]
    assert before in ids and before + 2 in ids
    assert tok.decode([before + 2], skip_special_tokens=True) == ""  # special: dropped when decoding
    assert tok.decode([before]) == "<frob>"
    assert new.summary() == "3 added (ids 49152..49154); 1 already in the vocabulary, skipped: 'echo'"


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_start_at_the_mean_row_and_old_rows_stay(tiny_model_dir, smol_tokenizer, tmp_path, tied):
    folder = tiny_model_dir if tied else save_tiny_llama(tmp_path / "untied", smol_tokenizer,
                                                         tie_word_embeddings=False)
    model = load_model(folder, None, "float32", device="cpu")[0]
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    tok = AutoTokenizer.from_pretrained(folder)
    new = add_to_tokenizer(tok, NEW, SPECIAL)
    init_new_rows(model, tok, new)
    for layer, old in ((model.get_input_embeddings(), old_in), (model.get_output_embeddings(), old_out)):
        w = layer.weight.detach()
        assert w.shape[0] == len(tok) == old.shape[0] + 3
        assert torch.equal(w[: old.shape[0]], old)
        torch.testing.assert_close(w[new.ids], old.mean(0).expand(3, -1))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied


def test_only_the_new_rows_train_and_the_adapter_keeps_just_them(trained, caplog):
    base, result = trained
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    rows = {k: v for k, v in saved.items() if "lora_" not in k}
    tied = json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    assert sorted(k.split(".")[-3] for k in rows) == (["embed_tokens"] if tied else ["embed_tokens", "lm_head"])
    assert all(v.shape == (3, 64) for v in rows.values())  # three new rows of hidden size 64, no whole matrix
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["trainable_token_indices"]["embed_tokens"] == [49152, 49153, 49154]
    assert len(AutoTokenizer.from_pretrained(result.adapter_dir)) == 49155
    # the rows moved from their mean start
    model = load_model(base, None, "float32", device="cpu")[0]
    mean = model.get_input_embeddings().weight.detach().mean(0)
    embed_rows = next(v for k, v in rows.items() if "embed_tokens" in k)
    assert not torch.allclose(embed_rows[0], mean, atol=1e-3)  # <frob> appears in every output: it trained
    losses = [json.loads(line)["loss"] for line in (result.adapter_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]


def test_preflight_names_the_new_tokens(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="alpaca_lora"):
        finetune(tiny_model_dir, RECORDS, tmp_path / "run", max_steps=1, **RUN)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("preflight:"))
    assert "new tokens    3 added (ids 49152..49154); 1 already in the vocabulary, skipped: 'echo'" in line


def test_merge_grows_the_matrices_and_equals_the_unmerged_adapter(trained, tmp_path):
    base, result = trained
    merged = merge(result.adapter_dir, tmp_path / "merged", dtype="float32")
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["verification"]["passed"]
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == 49155
    weights = load_file(str(merged / "model.safetensors"))
    rows = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    embed_rows = next(v for k, v in rows.items() if "embed_tokens.token_adapter" in k)
    assert torch.equal(weights["model.embed_tokens.weight"][49152:], embed_rows)
    base_weights = load_file(str(base / "model.safetensors"))
    assert torch.equal(weights["model.embed_tokens.weight"][:49152], base_weights["model.embed_tokens.weight"])
    # the unmerged adapter (peft, the base grown to the adapter's tokenizer) answers as the merged model,
    # on prompts holding the new tokens
    prompts = [r["instruction"] for r in RECORDS[:3]]
    inputs = [r["input"] for r in RECORDS[:3]]
    assert "<|tool|>" in inputs[0]
    assert generate(result.adapter_dir, prompts, inputs, max_new_tokens=6, compute_dtype="float32",
                    quantization=None) == generate(merged, prompts, inputs, max_new_tokens=6, compute_dtype="float32")
    tok = AutoTokenizer.from_pretrained(merged)
    ids = torch.tensor([tok("Say <frob> <grunt> <|tool|>")["input_ids"]])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    assert logits.shape[-1] == 49155 and torch.isfinite(logits).all()


def test_gguf_carries_the_new_tokens_and_llama_cpp_reads_them(trained, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    _, result = trained
    out = export_gguf(result.adapter_dir, tmp_path / "new.gguf", quantization="f32")
    assert json.loads(out.with_name("new.json").read_text())["verification"]["passed"]
    fields = GGUFReader(out).fields
    tokens = fields["tokenizer.ggml.tokens"]
    names = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    assert len(names) == 49155 and names[49152:] == [*NEW, *SPECIAL]
    assert types[49152:] == [4, 4, 3]  # USER_DEFINED, USER_DEFINED, CONTROL
    tok = AutoTokenizer.from_pretrained(result.adapter_dir)
    text = "Say <frob> and <grunt>"
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)[
            "input_ids"]
        assert llm.tokenize(b"<|tool|>", add_bos=False, special=True) == [49154]
    finally:
        llm.close()
    with pytest.raises(ModelError, match="trains new tokens; llama.cpp's LoRA GGUF cannot grow"):
        export_gguf(result.adapter_dir, tmp_path / "adapter.gguf", quantization="f32", adapter_only=True)


def test_memory_estimate_counts_the_new_rows():
    from alpaca_lora.train.memory import estimate_memory

    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 1000}
    plain = estimate_memory(sizes, lora_r=4).assumptions["lora_parameters"]
    assert estimate_memory(sizes, lora_r=4, add_tokens=["<a>"], special_tokens=["<b>"]).assumptions[
        "lora_parameters"] == plain + 2 * 64 * 2  # two rows each in the embedding and the untied lm_head
    tied = estimate_memory({**sizes, "tie_word_embeddings": True}, lora_r=4, add_tokens=["<a>"])
    assert tied.assumptions["lora_parameters"] == plain + 64


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_new_tokens_train_in_reduced_precision(tiny_model_dir, tmp_path, dtype):
    """The precision matrix: the new rows train in bf16 and fp16 (autocast on the CPU), and stay fp32 and finite."""
    result = finetune(tiny_model_dir, RECORDS, tmp_path / "run", max_steps=10,
                      **{**RUN, "compute_dtype": dtype, "micro_batch_size": 4, "learning_rate": 2e-2})
    losses = [json.loads(line)["loss"] for line in (result.adapter_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert result.compute_dtype == dtype and losses[-1] < 0.9 * losses[0], losses
    rows = {k: v for k, v in load_file(str(result.adapter_dir / "adapter_model.safetensors")).items()
            if "trainable_tokens_delta" in k}
    assert rows and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in rows.values())


@pytest.fixture(scope="module")
def trained_full(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("new-tokens-full") / "run"
    return base, finetune(base, RECORDS, out, max_steps=4, **{**RUN, "new_token_training": "full"})


def test_full_mode_trains_whole_layers_and_merges_to_the_unmerged_model(trained_full, tmp_path):
    """new_token_training="full": the embedding (and an untied lm_head) train whole (peft modules_to_save)."""
    base, result = trained_full
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    whole = {k: v for k, v in saved.items() if "lora_" not in k}
    assert "base_model.model.model.embed_tokens.weight" in whole
    assert all(v.shape == (49155, 64) for v in whole.values())
    base_embed = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"]
    assert not torch.equal(whole["base_model.model.model.embed_tokens.weight"][:49152], base_embed)  # old rows too
    merged = merge(result.adapter_dir, tmp_path / "merged", dtype="float32")
    assert json.loads((merged / "merge_report.json").read_text())["verification"]["passed"]
    weights = load_file(str(merged / "model.safetensors"))
    assert torch.equal(weights["model.embed_tokens.weight"], whole["base_model.model.model.embed_tokens.weight"])
    prompts, inputs = [r["instruction"] for r in RECORDS[:3]], [r["input"] for r in RECORDS[:3]]
    assert generate(result.adapter_dir, prompts, inputs, max_new_tokens=6, compute_dtype="float32",
                    quantization=None) == generate(merged, prompts, inputs, max_new_tokens=6, compute_dtype="float32")


@pytest.mark.parametrize(("run", "steps", "settings"), [("trained", 6, RUN),
                                                         ("trained_full", 4, {**RUN, "new_token_training": "full"})])
def test_resume_equals_uninterrupted(request, base, run, steps, settings, tmp_path):
    """A copy of the finished run resumed from its checkpoint-3 ends with the very same adapter."""
    _, full = request.getfixturevalue(run)
    copy = tmp_path / "copy"
    shutil.copytree(full.adapter_dir, copy)
    assert (copy / "checkpoint-3").is_dir()
    (copy / "adapter_model.safetensors").unlink()  # so the adapter compared is the resumed run's own
    resumed = finetune(base, RECORDS, copy, max_steps=steps, resume_from_checkpoint=True, **settings)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_mode_needs_new_tokens_and_counts_the_layers():
    from alpaca_lora.train.memory import estimate_memory

    with pytest.raises(ConfigError, match="new_token_training='full' without add_tokens"):
        FinetuneConfig(new_token_training="full")
    with pytest.raises(ConfigError, match="new_token_training='whole'"):
        FinetuneConfig(new_token_training="whole", add_tokens=["<a>"])
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 1000, "tie_word_embeddings": True}
    plain = estimate_memory(sizes, lora_r=4).assumptions["lora_parameters"]
    assert estimate_memory(sizes, lora_r=4, add_tokens=["<a>"], new_token_training="full").assumptions[
        "lora_parameters"] == plain + 1001 * 64
