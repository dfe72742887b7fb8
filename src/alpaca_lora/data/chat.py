r"""Tokenize a conversation with its chat template and mask it: loss on assistant turns only.

:func:`tokenize_conversation` is the one place conversation labels are masked, as
:func:`~alpaca_lora.data.prepare.tokenize_instruction` is for Alpaca records. The whole conversation is
rendered once and tokenized once (without adding special tokens, as ``apply_chat_template`` does), so
the ids decode to exactly the rendered text. The assistant turns are found as character spans of that
text and mapped to tokens through the tokenizer's offsets; a rendered prefix is never assumed to
tokenize to a token prefix.

Finding the spans. For assistant turn i the template renders the messages before it with the
generation prompt (``P``) and the messages up to it (``F``); where the full text starts with ``F``
and ``F`` with ``P`` (ChatML, Llama 3, Alpaca, Mistral, Gemma, ...), the turn is the text between
them. For a template that renders earlier turns differently once later ones follow, each message's
content is searched for in order instead. Either way the trained span runs from the turn's first
character to the end of its end-of-turn token: the last special token of the turn (``<|im_end|>``,
``<|eot_id|>``, EOS), which must exist, since a model never trained on it never stops. What follows
it (ChatML's newline) and everything outside assistant turns (system, user and tool turns, role
headers, a default system prompt) has label -100.

Worked example (ChatML, pad == eos == ``<|im_end|>``)::

    text    <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n
    labels  -100 ...                                          -100  Hello ! <|im_end|>  -100

Past ``cutoff_len`` whole turns are dropped from the end; if even the first trained turn does not
fit, its content is cut and its end-of-turn token put last, as an Alpaca response keeps EOS.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_lora.data import chat_templates
from alpaca_lora.data.encoding import unencodable_at
from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.prepare import DROP_PROMPT_FULL
from alpaca_lora.errors import ConfigError, DataError, shown

logger = logging.getLogger(__name__)

DROP_NO_TRAINED_TURN = "no trained assistant turn"
_PROGRESS_MIN = 2000


@dataclass(frozen=True)
class Turn:
    """One assistant turn of a tokenized conversation.

    Attributes:
        message: Index of the message in the conversation.
        start: First token of the turn's content.
        end: One past its end-of-turn token.
        train: Whether it carries loss.

    """

    message: int
    start: int
    end: int
    train: bool


@dataclass
class Encoded:
    """A tokenized conversation before truncation: ids, assistant turns and the rendered text."""

    input_ids: list[int]
    turns: list[Turn]
    text: str


def tokenize_conversation(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    *,
    chat_template: str | Path | None = None,
    cutoff_len: int = 2048,
    train_on_inputs: bool = False,
    tools: str | list | None = None,
) -> dict[str, list[int]]:
    """Render a conversation with the chat template, tokenize it, and mask all but the assistant turns.

    Args:
        messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]``; a turn may
            say ``"train": False`` (no loss on it) or ``"tool_call": True`` (an assistant turn whose
            content is a tool call's JSON).
        tokenizer: A fast Hugging Face tokenizer (it reports character offsets).
        chat_template: None for the tokenizer's own, or what
            :func:`~alpaca_lora.data.chat_templates.resolve_chat_template` accepts.
        cutoff_len: Longest result, in tokens.
        train_on_inputs: Put loss on every token, not only on assistant turns.
        tools: Tool schemas (JSON text or a list) the conversation may call.

    Returns:
        Equal-length lists: ``input_ids``, ``attention_mask`` (all 1) and ``labels`` (the ids on every
        trained assistant turn's content and end-of-turn token, -100 elsewhere).

    Raises:
        DataError: A malformed conversation, or one the template refuses.
        ConfigError: Bad ``cutoff_len`` or template, a slow tokenizer, or a template whose assistant
            turns end without a special token.

    """
    source = chat_templates.resolve_chat_template(tokenizer, chat_template)
    tools_text = tools if isinstance(tools, str) or tools is None else json.dumps(tools)
    encoded = encode_conversation(normalize_messages(messages), tools_text or "", tokenizer, source)
    return truncate(encoded, cutoff_len, train_on_inputs)[0]


def encode_conversation(messages: list[dict[str, Any]], tools: str, tokenizer: Any, source: str) -> Encoded:
    """Render and tokenize normalized ``messages``; find their assistant turns as token spans."""
    rendered = render_conversation(messages, tools, tokenizer, source)
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    return locate_turns(rendered, list(enc["input_ids"]), enc["offset_mapping"], special_ids(tokenizer))


@dataclass
class Rendered:
    """A conversation rendered to text, with its assistant turns as character spans.

    Attributes:
        text: The rendered conversation.
        spans: ``(message index, start, end)`` per assistant turn: with ``searched`` False the turn's
            whole text (end-of-turn included); with ``searched`` True its content only.
        searched: Whether the spans were found by searching the contents (see the module docs).
        train: Per assistant turn, whether it carries loss.

    """

    text: str
    spans: list[tuple[int, int, int]]
    searched: bool
    train: list[bool]


def render_conversation(messages: list[dict[str, Any]], tools: str, tokenizer: Any, source: str) -> Rendered:
    """Render normalized ``messages`` with the template ``source`` and find the assistant turns in the text."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("conversations need a fast tokenizer (one with tokenizer.json), which reports where each "
                          "token is in the text; load the tokenizer with use_fast=True")
    msgs, schemas = chat_templates.template_messages(messages, tools, source)
    shift = len(msgs) - len(messages)  # a system message added for the tool schemas
    text = chat_templates.render(tokenizer, source, msgs, tools=schemas)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = _prefix_spans(tokenizer, source, msgs, schemas, text, [i + shift for i in assistant])
    searched = spans is None
    if spans is None:
        spans = _searched_spans(msgs, text, [i + shift for i in assistant])
    return Rendered(text, [(i, a, b) for i, (a, b) in zip(assistant, spans, strict=True)], searched,
                    [bool(messages[i].get("train", True)) for i in assistant])


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (what may end a turn)."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def locate_turns(rendered: Rendered, ids: list[int], offsets: Any, special: set[int]) -> Encoded:
    """Map the rendered turns to token spans through the tokenizer's character ``offsets``."""
    starts = [int(o[0]) for o in offsets]  # non-decreasing: tokens come in text order
    turns = []
    for (i, start_char, end_char), train in zip(rendered.spans, rendered.train, strict=True):
        first, stop = bisect.bisect_left(starts, start_char), bisect.bisect_left(starts, end_char)
        if rendered.searched:  # a content span: its end is the first special token after it
            ends = [next((k for k in range(stop, len(ids)) if ids[k] in special), None)]
            ends = [k for k in ends if k is not None]
        else:  # the turn's whole text: its end is its last special token
            ends = [k for k in range(first, stop) if ids[k] in special][-1:]
        if not ends:
            raise ConfigError(
                f"the chat template ends assistant turns with no special token of this tokenizer (turn {i} renders "
                f"as {shown(rendered.text[start_char:end_char], 120)}), so a model trained on it would never learn to "
                "stop; use a template whose assistant turns end with EOS or an end-of-turn token of the tokenizer "
                "(e.g. chat_template='alpaca', or 'chatml' for a tokenizer with <|im_end|>)")
        turns.append(Turn(i, min(first, ends[0]), ends[0] + 1, train))
    return Encoded(ids, turns, rendered.text)


def truncate(encoded: Encoded, cutoff_len: int, train_on_inputs: bool) -> tuple[dict[str, list[int]], str, int]:
    """Cut to ``cutoff_len`` at a turn boundary and label; return ``(features, status, trained turns cut off)``.

    ``status`` is "ok", "truncated" or :data:`~alpaca_lora.data.prepare.DROP_PROMPT_FULL` (not even one
    token of the first trained turn fits: no label is left).
    """
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
        raise ConfigError(f"cutoff_len={shown(cutoff_len)}: must be a positive int (tokens per example)")
    ids, turns = list(encoded.input_ids), encoded.turns
    trained = [t for t in turns if t.train] if not train_on_inputs else turns
    status, dropped = "ok", 0
    if len(ids) > cutoff_len:
        fitting = [t for t in trained if t.end <= cutoff_len]
        if fitting:
            ids = ids[:fitting[-1].end]
            dropped = sum(1 for t in trained if t.end > fitting[-1].end)
        elif trained and trained[0].start < cutoff_len - 1:  # cut the first turn's content, end-of-turn last
            first = trained[0]
            ids = ids[:cutoff_len - 1] + [ids[first.end - 1]]
            turns = [Turn(first.message, first.start, cutoff_len, first.train)]
            dropped = sum(1 for t in trained if t.message > first.message)
        else:
            ids, status = ids[:cutoff_len], DROP_PROMPT_FULL
        status = "truncated" if status == "ok" else status
    if train_on_inputs:
        labels = list(ids) if status != DROP_PROMPT_FULL else [IGNORE_INDEX] * len(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for t in turns:
            if t.train and t.end <= len(ids):
                labels[t.start:t.end] = ids[t.start:t.end]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, status, dropped


# ---- spans -----------------------------------------------------------------------------------------


def _prefix_spans(tokenizer: Any, source: str, msgs: list[dict], schemas: list | None, text: str,
                  assistant: list[int]) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns from prefix renders; None where the template breaks the rule."""
    spans = []
    try:
        for i in assistant:
            before = chat_templates.render(tokenizer, source, msgs[:i], tools=schemas, add_generation_prompt=True)
            upto = chat_templates.render(tokenizer, source, msgs[:i + 1], tools=schemas)
            if not (text.startswith(upto) and upto.startswith(before)) or len(upto) == len(before):
                return None
            spans.append((len(before), len(upto)))
    except (DataError, ConfigError):
        return None
    return spans


def _searched_spans(msgs: list[dict], text: str, assistant: list[int]) -> list[tuple[int, int]]:
    """Spans of the assistant contents, found by searching each message's content in order."""
    cursor, found = 0, {}
    for i, m in enumerate(msgs):
        content = m.get("content") or ""
        at = -1
        for candidate in (content, content.strip()):
            if candidate:
                at = text.find(candidate, cursor)
                if at >= 0:
                    found[i] = (at, at + len(candidate))
                    cursor = at + len(candidate)
                    break
        if at < 0 and i in assistant:
            raise ConfigError(
                f"cannot find assistant turn {i} ({shown(content, 80)}) in the text the chat template renders, so "
                "its tokens cannot be labelled; this template changes the turn's text. Pass another chat_template")
    return [found[i] for i in assistant]


def normalize_messages(messages: Any, *, require_assistant: bool = True) -> list[dict[str, Any]]:
    """Check a conversation given directly (a list of role/content dicts) and fill in ``train`` / ``tool_call``.

    Raises:
        DataError: Not a non-empty list of dicts with a known string ``role`` and a string ``content``,
            text UTF-8 cannot encode, or (with ``require_assistant``) no assistant turn.

    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"a conversation is a non-empty list of messages, got {shown(messages, 100)}; e.g. "
                        "[{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} ({shown(m, 100)}) needs a string 'role' and a string 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"message {i}: unknown role {shown(m['role'], 40)}; roles are system, user, assistant "
                            "and tool")
        at = unencodable_at(m["content"])
        if at is not None:
            raise DataError(f"message {i}: its content holds a lone surrogate at character {at}, which cannot be "
                            "encoded as UTF-8; fix the text")
        out.append({"role": m["role"], "content": m["content"], "train": m.get("train", True) is not False,
                    "tool_call": bool(m.get("tool_call", False))})
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError("the conversation has no assistant turn, so nothing to train on; add one")
    return out


_EOT_PROBE = [{"role": "user", "content": "Hi", "train": True, "tool_call": False},
              {"role": "assistant", "content": "Hello", "train": True, "tool_call": False}]


def end_of_turn_ids(tokenizer: Any, source: str) -> list[int]:
    """The token that ends an assistant turn in ``source`` (found by rendering a short exchange)."""
    try:
        encoded = encode_conversation(_EOT_PROBE, "", tokenizer, source)
    except (ConfigError, DataError):  # the template cannot render the probe: EOS alone stops
        return []
    return [encoded.input_ids[t.end - 1] for t in encoded.turns]
