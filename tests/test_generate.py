"""generate(): left-padded batches equal single prompts, response-only text, EOS stops, settings honoured."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from alpaca_lora import ConfigError, ModelError
from alpaca_lora.generate import _load_folder, clear_cache, generate
from alpaca_lora.merge import merge
from alpaca_lora.train import finetune

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
