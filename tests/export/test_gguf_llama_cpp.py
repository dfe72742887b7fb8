"""Exported GGUF files in their real consumer, llama.cpp (llama-cpp-python, built portable by .ci/run).

llama.cpp must read the same tokens, compute the same logits (within the file type's rounding), answer
greedily as the merged transformers model does, render chats exactly as training did, and apply an
adapter GGUF over a base GGUF as the merged model computes.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_lora.data import chat_templates
from alpaca_lora.export.gguf import export_gguf
from alpaca_lora.export.merge import merge
from alpaca_lora.train.recipe import finetune
from conftest import SHORT_RECORDS, save_tiny_llama

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: bash .ci/install_llama_cpp.sh")

from gguf_tokenizers import build_tokenizer  # noqa: E402 - after the skip

TEXTS = ["Hello world, 12345 numbers and  double  spaces.\n\nNew line: ünïcödé 日本語 🙂 tabs\there",
         " leading space", "I'm   you're 1999's ALL CAPS", "### Instruction:\nName three primary colors.\n\n"]
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\nName three primary colors.\n\n### Response:\n")
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}],
]


class Llama:
    """A llama.cpp model, closed on exit (its finalizer fails at interpreter shutdown otherwise)."""

    def __init__(self, path: Path, **kwargs) -> None:
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0, **kwargs)

    def __enter__(self):
        return self.llm

    def __exit__(self, *exc) -> None:
        self.llm.close()


def llama_logits(path: Path, ids: list[int], **kwargs) -> np.ndarray:
    with Llama(path, logits_all=True, **kwargs) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])  # (T, V)


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def relative_rms(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(((got - ref) ** 2).mean()) / np.sqrt(((ref - ref.mean(-1, keepdims=True)) ** 2).mean()))


@pytest.fixture(scope="module")
def smol_gguf(smol_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol-gguf")
    return {q: export_gguf(smol_dir, out / f"smol-{q}.gguf", quantization=q) for q in ("f16", "q8_0")}


@pytest.fixture(scope="module")
def training_texts(real_records):
    return [r["instruction"] + " " + r["output"] for r in real_records[:400]]


@pytest.mark.parametrize("kind", ["spm", "llama3", "smollm"])
def test_llama_cpp_tokenizes_as_transformers(kind, training_texts, tmp_path):
    """Llama 2 style byte fallback, Llama 3's split pattern and SmolLM's digits: the same token ids."""
    tok = build_tokenizer(kind, training_texts)
    out = export_gguf(save_tiny_llama(tmp_path / kind, tok), tmp_path / f"{kind}.gguf", quantization="f32")
    with Llama(out, vocab_only=True) as llm:
        for text in [*TEXTS, *training_texts[-5:]]:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text


def test_embedded_model_tokens_logits_and_greedy_answers(smol_dir, smol_tokenizer, smol_gguf):
    ids = smol_tokenizer(PROMPT)["input_ids"]
    with Llama(smol_gguf["f16"], vocab_only=True) as llm:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == smol_tokenizer(text)["input_ids"]
    ref = hf_logits(smol_dir, ids)
    for quantization, tolerance in (("f16", 0.01), ("q8_0", 0.15)):
        got = llama_logits(smol_gguf[quantization], ids)
        assert relative_rms(got, ref) < tolerance, quantization
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    want = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    with Llama(smol_gguf["f16"]) as llm:
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if token == llm.token_eos() or len(got) == 16:  # transformers stops at EOS too
                break
    assert got == want and len(got) >= 4


def test_chat_rendering_in_llama_cpp_equals_training(smol_tokenizer, smol_gguf):
    """llama.cpp's Jinja renderer gives the training text; so does its built-in one given a system message.

    The built-in renderer (``llama_chat_apply_template``) recognizes ChatML but not the template's default
    system prompt, which only the Jinja renderer (llama-server's default, ``--jinja``) reproduces.
    """
    import ctypes

    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    with Llama(smol_gguf["q8_0"], vocab_only=True) as llm:
        template = llm.metadata["tokenizer.chat_template"]
        model_template = llama_cpp.llama_model_chat_template(llm._model.model, None)
        for messages in CHATS:
            want = chat_templates.render(smol_tokenizer, smol_tokenizer.chat_template, messages,
                                         add_generation_prompt=True)
            formatter = Jinja2ChatFormatter(template=template, eos_token=smol_tokenizer.eos_token,
                                            bos_token=smol_tokenizer.bos_token, add_generation_prompt=True)
            assert formatter(messages=messages).prompt == want
            if messages[0]["role"] != "system":
                continue
            chat = (llama_cpp.llama_chat_message * len(messages))(*[
                llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
            buf = ctypes.create_string_buffer(8192)
            n = llama_cpp.llama_chat_apply_template(model_template, chat, len(messages), True, buf, len(buf))
            assert buf.raw[:n].decode() == want


@pytest.fixture(scope="module")
def alpaca_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcpp-run")
    finetune(tiny_model_dir, SHORT_RECORDS * 2, out / "adapter", max_steps=4, batch_size=4, micro_batch_size=4,
             val_set_size=0, learning_rate=2e-2, lora_dropout=0.0, gradient_checkpointing=False, cutoff_len=64,
             quantization=None, compute_dtype="float32", warmup_ratio=0.0, lora_target_modules="all-linear")
    return out / "adapter", merge(out / "adapter", out / "merged", dtype="float32")


def test_adapter_gguf_over_base_gguf_equals_the_merged_model(alpaca_run, tiny_model_dir, smol_tokenizer, tmp_path):
    adapter, merged = alpaca_run
    base = export_gguf(tiny_model_dir, tmp_path / "base.gguf", quantization="f32")
    lora = export_gguf(adapter, tmp_path / "lora.gguf", quantization="f32", adapter_only=True)
    whole = export_gguf(merged, tmp_path / "merged.gguf", quantization="f32")
    ids = smol_tokenizer(PROMPT)["input_ids"]
    ref = hf_logits(merged, ids)
    with_lora, merged_file = llama_logits(base, ids, lora_path=str(lora)), llama_logits(whole, ids)
    assert relative_rms(merged_file, ref) < 0.01 and relative_rms(with_lora, ref) < 0.01
    assert relative_rms(llama_logits(base, ids), ref) > 0.1  # the adapter matters: the check could fail


@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_tiny_merged_model_logits_and_greedy_answers(alpaca_run, smol_tokenizer, tmp_path, quantization):
    """The merged tiny model, exported: llama.cpp's next-token logits and greedy continuation as transformers'."""
    _, merged = alpaca_run
    out = export_gguf(merged, tmp_path / f"tiny-{quantization}.gguf", quantization=quantization)
    ids = smol_tokenizer(PROMPT)["input_ids"]
    got, ref = llama_logits(out, ids), hf_logits(merged, ids)
    assert relative_rms(got, ref) < (0.01 if quantization == "f16" else 0.15)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=smol_tokenizer.pad_token_id)[0, len(ids):].tolist()
    with Llama(out) as llm:
        answer = [t for _, t in zip(range(8), llm.generate(ids, temp=0.0, top_k=1, reset=True), strict=False)]
    agree = next((i for i, (a, b) in enumerate(zip(answer, want, strict=True)) if a != b), len(want))
    assert agree >= (8 if quantization == "f16" else 1), (answer, want)


def test_alpaca_run_chat_template_renders_in_llama_cpp(alpaca_run, tmp_path):
    """An Alpaca run ships its prompt template as the chat template: llama.cpp renders the training prompt."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, merged = alpaca_run
    tok = AutoTokenizer.from_pretrained(merged)
    out = export_gguf(merged, tmp_path / "alpaca.gguf", quantization="q8_0")
    with Llama(out, vocab_only=True) as llm:
        template = llm.metadata["tokenizer.chat_template"]
    prompt = Jinja2ChatFormatter(template=template, eos_token=tok.eos_token, bos_token=tok.bos_token)(
        messages=[{"role": "user", "content": "Name three primary colors."}]).prompt
    assert prompt == PROMPT


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quants_through_llama_cpp(smol_dir, smol_tokenizer, tmp_path, quantization):
    out = export_gguf(smol_dir, tmp_path / f"smol-{quantization}.gguf", quantization=quantization)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["verification"]["passed"] and any(k.endswith("_K") for k in report["tensor_types"])
    ids = smol_tokenizer(PROMPT)["input_ids"]
    got, ref = llama_logits(out, ids), hf_logits(smol_dir, ids)
    assert relative_rms(got, ref) < 0.5 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.7


@pytest.mark.parametrize("variant", [
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    {"head_dim": 32},  # wider heads than hidden / heads
    {"tie_word_embeddings": False},
], ids=["llama3-rope", "linear-rope", "head-dim", "untied"])
def test_llama_variants_compute_as_transformers(variant, smol_tokenizer, tmp_path):
    folder = save_tiny_llama(tmp_path / "m", smol_tokenizer, initializer_range=0.05, **variant)
    out = export_gguf(folder, tmp_path / "m.gguf", quantization="f32")
    ids = smol_tokenizer(PROMPT * 2)["input_ids"]  # past 64 positions: the scaled frequencies matter
    assert len(ids) > 64
    assert relative_rms(llama_logits(out, ids), hf_logits(folder, ids)) < 0.01

