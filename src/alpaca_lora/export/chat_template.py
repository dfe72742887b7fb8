"""The chat template an output folder ships, checked against what training rendered.

Servers (vLLM, llama.cpp, Ollama) render prompts with the chat template in a folder's
``tokenizer_config.json`` / ``chat_template.jinja``. A model trained on one rendering and served with
another answers garbage (unsloth#3899, LLaMA-Factory#6320), so after the tokenizer is written the
folder is read back and a training conversation rendered with it must give the training text exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alpaca_lora.data import chat_templates
from alpaca_lora.errors import ModelError, shown


def check_saved_chat_template(folder: Path, messages: list[dict[str, Any]], tools: str, expected: str) -> None:
    """Raise ModelError unless the tokenizer saved in ``folder`` renders ``messages`` as ``expected``.

    Args:
        folder: A folder holding a saved tokenizer.
        messages: A normalized training conversation (see :mod:`alpaca_lora.data.conversations`).
        tools: Its tool schemas as JSON text ("" for none).
        expected: The text training rendered for it.

    """
    from alpaca_lora.model.load import load_tokenizer

    saved = load_tokenizer(folder)
    source = getattr(saved, "chat_template", None)
    if not isinstance(source, str):
        raise ModelError(f"the tokenizer saved in {folder} has no chat template, so servers would render prompts "
                         "their own way; this is a bug: please report it")
    msgs, schemas = chat_templates.template_messages(messages, tools, source)
    got = chat_templates.render(saved, source, msgs, tools=schemas)
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                  min(len(got), len(expected)))
        raise ModelError(
            f"the chat template saved in {folder} renders a training conversation differently from training (first "
            f"difference at character {at}: saved {shown(got[at:at + 60])} vs trained {shown(expected[at:at + 60])}); "
            "a server reading this folder would prompt the model in a format it was not trained on. This is a bug: "
            "please report it")


def training_rendering(tokenizer: Any, source: str, messages: list[dict[str, Any]], tools: str) -> str:
    """The text ``source`` renders for a normalized conversation (what training tokenized)."""
    msgs, schemas = chat_templates.template_messages(messages, tools, source)
    return chat_templates.render(tokenizer, source, msgs, tools=schemas)
