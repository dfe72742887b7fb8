"""Fine-tuning on conversations: masks, the shipped chat template, merge, generate, and the training matrix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from alpaca_lora import ModelError, finetune, generate, merge
from alpaca_lora.config import FinetuneConfig
from alpaca_lora.data.chat_templates import alpaca_chat_template
from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.prompts import get_template
from alpaca_lora.export.chat_template import check_saved_chat_template
from alpaca_lora.inference.generate import clear_cache
from alpaca_lora.train.setup import setup

WORDS = "red blue green cat dog sun moon tree".split()
CHATS = [{"messages": [
    *([{"role": "system", "content": "Answer in one word."}] if i % 2 else []),
    {"role": "user", "content": f"Say {w}."},
    {"role": "assistant", "content": w},
    {"role": "user", "content": "Again, twice."},
    {"role": "assistant", "content": f"{w} {w}", **({"train": False} if i == 3 else {})},
]} for i, w in enumerate(WORDS)]
FAST = dict(batch_size=4, micro_batch_size=2, learning_rate=2e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
            val_set_size=0, warmup_ratio=0.0, cutoff_len=128, gradient_checkpointing=False, save_steps=1000,
            quantization=None, compute_dtype="float32")


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir, tmp_path_factory):
    """A messages .jsonl file fine-tuned for 4 steps, and its merged folder."""
    tmp = tmp_path_factory.mktemp("chat-run")
    data = tmp / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in CHATS) + "\n", encoding="utf-8")
    result = finetune(tiny_model_dir, data, tmp / "adapter", max_steps=4, **FAST)
    return result, merge(result.adapter_dir, tmp / "merged", dtype="float32"), data


def test_the_training_labels_are_the_assistant_turns(tiny_model_dir, tmp_path, smol_tokenizer):
    run = setup(tiny_model_dir, CHATS, tmp_path, FinetuneConfig(**{**FAST, "packing": False}))
    assert run.data_format == "messages"
    eot = "<|im_end|>"
    for row in run.train_set:
        trained = smol_tokenizer.decode([i for i, lab in zip(row["input_ids"], row["labels"], strict=True)
                                         if lab != IGNORE_INDEX])
        word = next(w for w in WORDS if f"Say {w}." in smol_tokenizer.decode(row["input_ids"]))
        second = "" if word == WORDS[3] else f"{word} {word}{eot}"  # that turn says train: false
        assert trained == f"{word}{eot}{second}"
    assert run.report.turns == 2 * len(WORDS) - 1


def test_the_output_ships_the_training_template_and_the_merge_keeps_it(chat_run, smol_tokenizer):
    result, merged, _ = chat_run
    folder = result.adapter_dir
    assert (folder / "chat_template.jinja").is_file() and not (folder / "prompt_template.json").exists()
    for saved in (folder, merged):
        tok = AutoTokenizer.from_pretrained(saved)
        for chat in CHATS:  # the merged tokenizer renders every training conversation as training did
            assert tok.apply_chat_template(chat["messages"], tokenize=False) == \
                smol_tokenizer.apply_chat_template(chat["messages"], tokenize=False)
    card = (merged / "README.md").read_text()
    assert "chat_template.jinja" in card and "apply_chat_template" in card


def test_generate_answers_a_conversation_from_the_adapter_and_the_merged_folder(chat_run):
    result, merged, _ = chat_run
    conversation = [{"role": "user", "content": "Say red."}]
    clear_cache()
    from_merged = generate(merged, conversation, max_new_tokens=6, compute_dtype="float32")
    from_adapter = generate(result.adapter_dir, conversation, max_new_tokens=6, compute_dtype="float32")
    assert isinstance(from_merged, str) and from_merged == from_adapter
    both = generate(merged, [conversation, [{"role": "user", "content": "Say sun."}]], max_new_tokens=6,
                    compute_dtype="float32")
    assert isinstance(both, list) and len(both) == 2 and both[0] == from_merged


def test_generation_stops_at_the_end_of_turn_token(chat_run, monkeypatch):
    """<|im_end|> ends a chat answer even where the model's EOS is another token."""
    from alpaca_lora.inference import generate as gen_module

    _, merged, _ = chat_run
    seen = {}
    real = gen_module.generate_batches

    def spy(model, tok, prompts, kwargs, batch_size, limit):
        seen.update(kwargs)
        return real(model, tok, prompts, kwargs, batch_size, limit)

    monkeypatch.setattr(gen_module, "generate_batches", spy)
    generate(merged, [{"role": "user", "content": "Say red."}], max_new_tokens=2)
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.convert_tokens_to_ids("<|im_end|>") in seen["eos_token_id"]


def test_a_saved_template_that_renders_otherwise_fails_loudly(chat_run, tmp_path, smol_tokenizer):
    result, _, _ = chat_run
    tok = AutoTokenizer.from_pretrained(result.adapter_dir)
    messages = [{**m, "train": True, "tool_call": False} for m in CHATS[0]["messages"]]
    expected = tok.apply_chat_template(messages, tokenize=False)
    check_saved_chat_template(result.adapter_dir, messages, "", expected)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="renders a training conversation differently"):
        check_saved_chat_template(tmp_path, messages, "", expected)


def test_an_alpaca_run_ships_its_prompt_template_as_the_chat_template(tiny_model_dir, tmp_path, smol_tokenizer):
    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in WORDS]
    result = finetune(tiny_model_dir, records, tmp_path / "a", max_steps=1, **FAST)
    tok = AutoTokenizer.from_pretrained(result.adapter_dir)
    assert tok.chat_template == alpaca_chat_template(get_template("alpaca"), smol_tokenizer)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Say red."}], tokenize=False)
    assert rendered == get_template("alpaca").render("Say red.")
    assert (result.adapter_dir / "prompt_template.json").is_file()


def test_sharegpt_tool_calls_fine_tune(tiny_model_dir, tmp_path, shared_data):
    data = json.loads((shared_data / "glaive_toolcall_sharegpt.json").read_text(encoding="utf-8"))[:12]
    (tmp_path / "glaive.json").write_text(json.dumps(data), encoding="utf-8")
    result = finetune(tiny_model_dir, tmp_path / "glaive.json", tmp_path / "out", max_steps=2,
                      **{**FAST, "cutoff_len": 512})
    assert result.records_kept > 0 and all(map(torch.isfinite, torch.tensor(_losses(result.adapter_dir))))
    cfg = json.loads((result.adapter_dir / "finetune_config.json").read_text())
    assert cfg["data_format"] == "auto" and (result.adapter_dir / "chat_template.jinja").is_file()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_conversations_train_in_every_precision(tiny_model_dir, tmp_path, dtype):
    result = finetune(tiny_model_dir, CHATS, tmp_path / dtype, max_steps=3,
                      **{**FAST, "compute_dtype": dtype, "quantization": "nf4"})
    losses = _losses(result.adapter_dir)
    assert result.compute_dtype == dtype and len(losses) == 3
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert all(bool(torch.isfinite(t).all()) for t in _adapter(result.adapter_dir).values())


def test_packed_conversations_train_as_padded_ones(tiny_model_dir, tmp_path):
    packed = finetune(tiny_model_dir, CHATS, tmp_path / "packed", max_steps=3, packing=True, **FAST)
    padded = finetune(tiny_model_dir, CHATS, tmp_path / "padded", max_steps=3, packing=False, **FAST)
    assert _losses(packed.adapter_dir) == pytest.approx(_losses(padded.adapter_dir), rel=1e-5)
    assert _max_diff(_adapter(packed.adapter_dir), _adapter(padded.adapter_dir)) < 1e-4
    assert packed.tokens_seen == padded.tokens_seen


def test_length_grouping_sees_every_conversation(tiny_model_dir, tmp_path):
    plain = finetune(tiny_model_dir, CHATS, tmp_path / "plain", num_epochs=1, **FAST)
    grouped = finetune(tiny_model_dir, CHATS, tmp_path / "grouped", num_epochs=1, group_by_length=True, **FAST)
    assert grouped.tokens_seen == plain.tokens_seen and grouped.steps == plain.steps


def test_resumed_conversation_run_equals_the_uninterrupted_one(tiny_model_dir, tmp_path):
    settings = {**FAST, "lora_dropout": 0.1, "save_steps": 2}
    full = finetune(tiny_model_dir, CHATS, tmp_path / "full", max_steps=4, **settings)
    finetune(tiny_model_dir, CHATS, tmp_path / "split", max_steps=4, **settings)
    assert (tmp_path / "split" / "checkpoint-2").is_dir()  # resume from mid-run, as after a crash at step 3
    resumed = finetune(tiny_model_dir, CHATS, tmp_path / "split", max_steps=4,
                       resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"), **settings)
    assert _max_diff(_adapter(full.adapter_dir), _adapter(resumed.adapter_dir)) <= 1e-6
    assert _losses(full.adapter_dir) == pytest.approx(_losses(tmp_path / "split"), abs=1e-6)
