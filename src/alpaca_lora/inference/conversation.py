"""Conversations as generation prompts: rendered with the folder's chat template, stopped at end-of-turn.

``generate(folder, messages)`` renders the messages with the chat template saved in the folder (the one
training used, see :mod:`alpaca_lora.export.chat_template`) and ``add_generation_prompt=True``, tokenizes
the text as training did (no special tokens added: the template holds them), and stops at the template's
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``) as well as at EOS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alpaca_lora.data import chat_templates
from alpaca_lora.data.chat import end_of_turn_ids, normalize_messages
from alpaca_lora.errors import ConfigError, DataError


def is_conversation(value: Any) -> bool:
    """Whether ``value`` is one conversation (a list of message dicts) rather than an instruction."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) for m in value)


def conversation_requests(request: Any, input: Any) -> tuple[list[list[dict[str, Any]]], bool] | None:  # noqa: A002
    """``(conversations, batch)`` when ``request`` is a conversation or a list of them; None for instructions."""
    if is_conversation(request):
        conversations, batch = [request], False
    elif isinstance(request, (list, tuple)) and request and all(is_conversation(c) for c in request):
        conversations, batch = list(request), True
    else:
        return None
    if input is not None:
        raise ConfigError("input= goes with instructions; a conversation holds its context in its messages (e.g. a "
                          "system message), so pass input=None")
    out = []
    for i, messages in enumerate(conversations):
        try:
            out.append(normalize_messages(messages, require_assistant=False))
        except DataError as exc:
            raise ConfigError(f"{f'conversation {i}' if batch else 'the conversation'}: {exc}") from None
    return out, batch


def chat_prompts(conversations: list[list[dict[str, Any]]], tokenizer: Any,
                 chat_template: str | Path | None) -> tuple[list[list[int]], list[int]]:
    """Token ids of each conversation's generation prompt, and the template's end-of-turn ids.

    Raises:
        ConfigError: No usable chat template, or a conversation the template refuses.

    """
    source = chat_templates.resolve_chat_template(tokenizer, chat_template)
    prompts = []
    for i, messages in enumerate(conversations):
        msgs, schemas = chat_templates.template_messages(messages, "", source)
        try:
            text = chat_templates.render(tokenizer, source, msgs, tools=schemas, add_generation_prompt=True)
        except DataError as exc:
            raise ConfigError(f"conversation {i}: {exc}") from None
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts, end_of_turn_ids(tokenizer, source)
