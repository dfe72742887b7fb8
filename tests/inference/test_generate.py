"""generate(): left-padded batches equal single prompts, response-only text, EOS stops, settings honoured."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from alpaca_lora import ConfigError, ModelError
from alpaca_lora.data.prepare import tokenize_prompt
from alpaca_lora.data.prompts import get_template
from alpaca_lora.export.merge import merge
from alpaca_lora.inference.generate import _load_folder, clear_cache, generate
from alpaca_lora.train.recipe import finetune
from conftest import save_tiny_llama

FP32 = dict(compute_dtype="float32")
RECORDS = [
    {"instruction": "Name the color of the sky.", "input": "", "output": "blue"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "What is two plus two?", "input": "", "output": "four"},
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
]
# Different prompt lengths, with and without input, so a batch needs real left padding.
INSTRUCTIONS = ["Hi.", "Name the color of the sky.", "Translate to French.",
                "Write a long and careful explanation of why the sky looks blue during the day.", "Give the opposite."]
INPUTS = [None, None, "cat", None, "hot"]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A full-precision LoRA run on the tiny Llama and its fp32 merge."""
    out = tmp_path_factory.mktemp("gen-run")
    finetune(tiny_model_dir, RECORDS, out / "adapter", max_steps=12, batch_size=4, micro_batch_size=4,
             val_set_size=0, learning_rate=3e-2, lora_dropout=0.0, gradient_checkpointing=False, cutoff_len=64,
             quantization=None, compute_dtype="float32", warmup_ratio=0.0)
    merged = merge(out / "adapter", out / "merged", dtype="float32", verify=False)
    return out / "adapter", merged


CHAIN = (" red", " blue", None, " green")  # None: EOS


@pytest.fixture(scope="module")
def chain_dir(smol_tokenizer, tmp_path_factory):
    """A tiny Llama that, after any Alpaca prompt, deterministically says " red blue", then EOS.

    Attention and MLP outputs are zeroed, so each position's logits depend only on its own token;
    the (untied) head maps the prompt's last token -> " red" -> " blue" -> EOS -> " green". A
    generator that ignored EOS would go on with " green".
    """
    tok = smol_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    last = tok("### Response:\n").input_ids[-1]
    ids = [last] + [tok.eos_token_id if w is None else tok(w).input_ids[0] for w in CHAIN]
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.normal_(0, 0.01)
        emb[tok.eos_token_id].normal_(0, 0.02)  # the pad (== EOS) row starts at zero
        for current, following in zip(ids, ids[1:], strict=False):
            head[following] = 10 * emb[current] / emb[current].norm()
    folder = tmp_path_factory.mktemp("chain")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_batched_greedy_equals_one_by_one(tiny_model_dir):
    batched = generate(tiny_model_dir, INSTRUCTIONS, INPUTS, max_new_tokens=10, batch_size=3, **FP32)
    single = [generate(tiny_model_dir, i, x, max_new_tokens=10, **FP32) for i, x in zip(INSTRUCTIONS, INPUTS,
                                                                                         strict=True)]
    print(batched)
    assert batched == single
    assert all(isinstance(t, str) and t for t in batched)


def test_returns_only_the_response_and_stops_at_eos(chain_dir):
    assert generate(chain_dir, "Name a color.", max_new_tokens=20, **FP32) == "red blue"
    texts = generate(chain_dir, INSTRUCTIONS, INPUTS, max_new_tokens=20, **FP32)
    assert texts == ["red blue"] * len(INSTRUCTIONS)


def test_eos_stop_comes_from_the_tokenizer(chain_dir, tmp_path):
    """Even with no EOS in the model's generation config, generation stops at the tokenizer's EOS."""
    folder = shutil.copytree(chain_dir, tmp_path / "chain")
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg.pop("eos_token_id", None)
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    assert generate(folder, "Name a color.", max_new_tokens=20, **FP32) == "red blue"


def test_folder_template_is_used_and_template_overrides(chain_dir, tmp_path):
    folder = shutil.copytree(chain_dir, tmp_path / "chain")
    custom = {"description": "x", "prompt_input": "{instruction} {input} Answer:",
              "prompt_no_input": "{instruction} Answer:", "response_split": "Answer:"}
    (folder / "prompt_template.json").write_text(json.dumps(custom))
    assert generate(folder, "Name a color.", max_new_tokens=5, **FP32) != "red blue"  # prompt ends differently
    assert generate(folder, "Name a color.", template="alpaca", max_new_tokens=5, **FP32) == "red blue"


def test_adapter_folder_and_merged_folder_give_the_same_text(run, tiny_model_dir):
    adapter, merged = run
    from_adapter = generate(adapter, INSTRUCTIONS, INPUTS, max_new_tokens=8, **FP32)
    from_merged = generate(merged, INSTRUCTIONS, INPUTS, max_new_tokens=8, **FP32)
    from_base = generate(tiny_model_dir, INSTRUCTIONS, INPUTS, max_new_tokens=8, **FP32)
    print(from_adapter, from_base)
    assert from_adapter == from_merged
    assert from_adapter != from_base  # the adapter changed what the model says


def test_loaded_model_with_tokenizer_is_left_untouched(run, smol_tokenizer):
    _, merged = run
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, use_safetensors=True).train()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    tokenizer.padding_side = "right"
    text = generate(model, INSTRUCTIONS[:3], INPUTS[:3], tokenizer=tokenizer, max_new_tokens=8)
    assert text == generate(merged, INSTRUCTIONS[:3], INPUTS[:3], max_new_tokens=8, **FP32)
    assert tokenizer.padding_side == "right" and model.training  # restored
    # Without tokenizer=, the tokenizer comes from the folder the model was loaded from.
    assert generate(model, "Hi.", max_new_tokens=4) == generate(merged, "Hi.", max_new_tokens=4, **FP32)


def test_streamed_pieces_join_to_the_greedy_text(tiny_model_dir, chain_dir):
    for folder, least in ((tiny_model_dir, 3), (chain_dir, 1)):
        pieces = list(generate(folder, INSTRUCTIONS[3], max_new_tokens=16, stream=True, **FP32))
        assert "".join(pieces) == generate(folder, INSTRUCTIONS[3], max_new_tokens=16, **FP32)
        assert len(pieces) >= least and all(isinstance(p, str) and p for p in pieces)


def test_sampling_settings_reach_generation(tiny_model_dir):
    prompt = INSTRUCTIONS[3]
    greedy = generate(tiny_model_dir, prompt, max_new_tokens=10, **FP32)

    def sample(seed, **kw):
        torch.manual_seed(seed)
        return generate(tiny_model_dir, prompt, max_new_tokens=10, do_sample=True, **kw, **FP32)

    hot = sample(0, temperature=5.0)
    assert hot == sample(0, temperature=5.0)  # seeded sampling is reproducible
    assert hot != greedy and hot != sample(1, temperature=5.0)
    assert sample(2, temperature=5.0, top_k=1) == greedy  # top_k reaches the sampler
    assert sample(3, temperature=1e-4) == greedy  # so does temperature
    assert sample(4, temperature=5.0, top_p=1e-6) == greedy  # and top_p
    beams = generate(tiny_model_dir, prompt, max_new_tokens=10, num_beams=3, **FP32)
    assert isinstance(beams, str) and beams
    assert sample(5, num_beams=3) != hot  # beam sampling is allowed


def test_list_in_list_out(chain_dir):
    assert generate(chain_dir, ["a", "b"], max_new_tokens=4, **FP32) == ["red blue", "red blue"]
    assert generate(chain_dir, ["a", "b"], ["x", None], max_new_tokens=4, **FP32) == ["red blue", "red blue"]
    assert generate(chain_dir, [], max_new_tokens=4, **FP32) == []
    assert isinstance(generate(chain_dir, "a", "x", max_new_tokens=4, **FP32), str)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"temperature": 0.7}, "do_sample=True"),
    ({"top_p": 0.9}, "do_sample=True"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"num_beams": 0}, "num_beams"),
    ({"num_beams": 65}, "from 1 to 64"),
    ({"num_beams": 10**9}, "from 1 to 64"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"max_new_token": 5}, "max_new_tokens"),  # unknown setting: close match suggested
    ({"num_return_sequences": 2}, "num_return_sequences"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_settings_are_config_errors(chain_dir, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate(chain_dir, "a", **kwargs)


def test_bad_inputs_are_config_errors(chain_dir):
    with pytest.raises(ConfigError, match="one instruction"):
        generate(chain_dir, ["a", "b"], stream=True)
    with pytest.raises(ConfigError, match="num_beams=1"):
        generate(chain_dir, "a", stream=True, num_beams=2)
    with pytest.raises(ConfigError, match="2 strings"):
        generate(chain_dir, ["a", "b"], ["only one"])
    with pytest.raises(ConfigError, match="input"):
        generate(chain_dir, ["a", "b"], "shared input")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ConfigError, match="tokenizer="):
        generate(model, "a")
    with pytest.raises(ModelError, match="not a folder"):
        generate("/nowhere/model", "a")


def test_folders_are_cached_until_cleared(chain_dir):
    clear_cache()
    generate(chain_dir, "a", max_new_tokens=2, **FP32)
    generate(chain_dir, "b", max_new_tokens=2, **FP32)
    assert _load_folder.cache_info().hits >= 1 and _load_folder.cache_info().currsize == 1
    clear_cache()
    assert _load_folder.cache_info().currsize == 0


# ---- issue #19: damaged adapters, hostile arguments, the context bound -------------------------------


def _adapter_copy(adapter, dest, config=None, tensors=None):
    """A copy of an adapter folder with ``config`` fields set and ``tensors(state) -> state`` applied."""
    shutil.copytree(adapter, dest, ignore=shutil.ignore_patterns("checkpoint-*"))
    if config is not None:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        state = load_file(str(dest / "adapter_model.safetensors"))
        save_file(tensors(state), str(dest / "adapter_model.safetensors"))
    return dest


def _truncate(folder):
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(("name", "config", "tensors", "match"), [
    ("rank", {"r": 8}, None, "rank"),  # the run trained r=16
    ("targets", {"target_modules": ["q_proj"]}, None, "target_modules"),
    ("r-string", {"r": "8"}, None, "r='8'"),
    ("targets-number", {"target_modules": 5}, None, "target_modules=5"),
    ("extra", None, lambda s: {**s, "base_model.model.model.norm.weight": torch.ones(64)}, "not LoRA A/B"),
    ("missing-layer", None, lambda s: {k.replace("layers.1.", "layers.7."): v for k, v in s.items()}, "does not have"),
    ("half-pair", None, lambda s: {k: v for k, v in s.items() if "layers.0.self_attn.q_proj.lora_B" not in k},
     "partner"),
])
def test_a_damaged_adapter_is_a_model_error_before_peft_reads_it(run, tmp_path, name, config, tensors, match):
    adapter, _ = run
    folder = _adapter_copy(adapter, tmp_path / name, config, tensors)
    with pytest.raises(ModelError, match=match) as info:
        generate(folder, "Hi.", max_new_tokens=2, **FP32)
    assert str(folder) in str(info.value)


def test_a_truncated_adapter_file_is_a_model_error_naming_it(run, tmp_path):
    folder = _adapter_copy(run[0], tmp_path / "cut")
    _truncate(folder)
    with pytest.raises(ModelError, match="damaged or truncated") as info:
        generate(folder, "Hi.", max_new_tokens=2, **FP32)
    assert str(folder / "adapter_model.safetensors") in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_adapter_is_refused_not_answered_with_nothing(run, tmp_path, bad):
    folder = _adapter_copy(run[0], tmp_path / "nan", tensors=lambda s: {
        k: v.fill_(bad) if "layers.1.self_attn.v_proj.lora_B" in k else v for k, v in s.items()})
    with pytest.raises(ModelError, match="NaN or infinite") as info:
        generate(folder, "Hi.", max_new_tokens=4, **FP32)
    message = str(info.value)
    assert "layers.1.self_attn.v_proj.lora_B" in message and "diverged" in message
    assert "learning_rate" in message and "checkpoint" in message


def test_an_untrained_adapter_warns_and_answers_as_the_base(run, tiny_model_dir, tmp_path, caplog):
    folder = _adapter_copy(run[0], tmp_path / "zero", tensors=lambda s: {
        k: torch.zeros_like(v) if "lora_B" in k else v for k, v in s.items()})
    clear_cache()
    with caplog.at_level(logging.WARNING, logger="alpaca_lora.inference.generate"):
        text = generate(folder, INSTRUCTIONS[1], max_new_tokens=6, **FP32)
    assert text == generate(tiny_model_dir, INSTRUCTIONS[1], max_new_tokens=6, **FP32)
    warned = [r for r in caplog.records if r.name == "alpaca_lora.inference.generate" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "no-op" in warned[0].getMessage() and "lora_B" in warned[0].getMessage()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"do_sample": True, "temperature": "hot"}, "temperature"),
    ({"do_sample": True, "temperature": float("inf")}, "temperature"),
    ({"do_sample": True, "top_p": "x"}, "top_p"),
    ({"do_sample": True, "top_k": 1.5}, "top_k"),
    ({"repetition_penalty": "a"}, "repetition_penalty"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_new_tokens": "5"}, "max_new_tokens"),
    ({"num_beams": "2"}, "num_beams"),
    ({"do_sample": "yes"}, "do_sample"),
    ({"batch_size": float("nan")}, "batch_size"),
    ({"stream": "yes"}, "stream"),
    ({"compute_dtype": ["float32"]}, "compute_dtype"),
    ({"quantization": "q4"}, "quantization"),
    ({"template": 5}, "template"),
    ({"no_repeat_ngram_size": "x"}, "no_repeat_ngram_size"),
    ({"length_penalty": float("nan")}, "length_penalty"),
    ({"return_dict_in_generate": True}, "return_dict_in_generate"),
    ({"pad_token_id": 10**6}, "pad_token_id"),
    ({"eos_token_id": [2, -5]}, "eos_token_id"),
])
def test_wrong_types_and_values_are_config_errors_naming_the_argument(chain_dir, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate(chain_dir, "a", **{"max_new_tokens": 2, **FP32, **kwargs})


def test_a_lone_surrogate_is_a_config_error_naming_the_item(chain_dir):
    with pytest.raises(ConfigError, match="the instruction holds a lone surrogate"):
        generate(chain_dir, "bad \ud800 text", **FP32)
    with pytest.raises(ConfigError, match="item 1 input"):
        generate(chain_dir, ["a", "b"], [None, "x\udfff"], **FP32)


def test_a_tokenizer_pad_id_outside_the_vocabulary_is_refused_before_generating(chain_dir):
    model = AutoModelForCausalLM.from_pretrained(chain_dir, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(chain_dir)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # a new id, one past the model's embedding (not resized)
    assert tokenizer.pad_token_id == model.config.vocab_size
    with pytest.raises(ModelError, match=f"pad_token_id={model.config.vocab_size} is outside") as info:
        generate(model, ["a", "a much longer instruction"], tokenizer=tokenizer, max_new_tokens=2)
    assert "pass the one it was trained with" in str(info.value)


@pytest.fixture(scope="module")
def short_context_dir(smol_tokenizer, tmp_path_factory):
    """A tiny Llama whose context holds 96 tokens."""
    return save_tiny_llama(tmp_path_factory.mktemp("short-context"), smol_tokenizer, max_position_embeddings=96)


def test_a_prompt_longer_than_the_context_is_an_error_naming_item_tokens_and_limit(short_context_dir):
    with pytest.raises(ConfigError, match=r"item 1: the prompt .* is [\d,]+ tokens.* holds 96") as info:
        generate(short_context_dir, ["Hi.", "Summarise."], [None, "word " * 20_000], **FP32)
    assert "shorten" in str(info.value)
    with pytest.raises(ConfigError, match="the instruction: the prompt"):
        generate(short_context_dir, "x" * 100_000, **FP32)


def test_max_new_tokens_past_the_context_is_clamped_with_a_warning(short_context_dir, smol_tokenizer, caplog):
    prompt = INSTRUCTIONS[3]
    room = 96 - len(tokenize_prompt(get_template("alpaca").render(prompt), smol_tokenizer))
    kw = {"min_new_tokens": room, **FP32}  # no early EOS: the answer runs to the bound
    with caplog.at_level(logging.WARNING, logger="alpaca_lora.inference.generate"):
        clamped = generate(short_context_dir, prompt, max_new_tokens=2000, **kw)
    assert any(f"stops after {room} new tokens" in r.getMessage() for r in caplog.records)
    assert clamped == generate(short_context_dir, prompt, max_new_tokens=room, **kw)
    # In a list, a clamped prompt is answered as it is alone, and the others are not cut by it.
    texts = generate(short_context_dir, [prompt, "Hi."], max_new_tokens=room, **FP32)
    assert texts == [generate(short_context_dir, p, max_new_tokens=room, **FP32) for p in (prompt, "Hi.")]


def test_a_loaded_peft_model_with_nan_lora_weights_is_refused_before_generating(run, tiny_model_dir):
    """As for an adapter folder: a diverged adapter in memory is a ModelError naming the weights, not garbage."""
    from peft import PeftModel

    from alpaca_lora import ModelError, load_model

    adapter, _ = run
    base, tok = load_model(tiny_model_dir, None, "float32", device="cpu")
    model = PeftModel.from_pretrained(base, str(adapter))
    assert generate(model, "Hi.", tokenizer=tok, max_new_tokens=2, **FP32) is not None  # finite: answers
    name, weight = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN or infinite values in 1 of") as info:
        generate(model, "Hi.", tokenizer=tok, max_new_tokens=2, **FP32)
    assert name in str(info.value) and "checkpoint-N" in str(info.value)
