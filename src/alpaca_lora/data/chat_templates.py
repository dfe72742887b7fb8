r"""Chat templates: the tokenizer's own, a built-in one by name, a Jinja string or a ``.jinja`` file.

A conversation is rendered with ``tokenizer.apply_chat_template`` and the template resolved here, so
training, :func:`~alpaca_lora.inference.generate.generate`, the merged model's tokenizer and any
server that reads ``tokenizer_config.json`` (vLLM, llama.cpp, Ollama) render the same text.

Built-in templates, for bases that ship none:

- ``chatml``: ``<|im_start|>role\n...<|im_end|>\n`` (SmolLM2, Qwen, Hermes); no default system prompt.
- ``llama3``: ``<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`` after ``bos_token``.
- every Alpaca prompt template of :func:`~alpaca_lora.data.prompts.list_templates` (``alpaca``,
  ``alpaca_short``, ...): a user turn is the template's prompt with the turn as the instruction (a
  system message becomes the ``input`` of the first instruction), an assistant turn is its text and
  ``eos_token``. A tool turn renders like a user turn. So a one-turn conversation renders exactly as
  the Alpaca record ``{"instruction": user, "output": assistant}`` does in training.

Tool calls: where the template handles ``tool_calls`` (its source mentions them) an assistant tool
call is passed as a ``tool_calls`` message and the record's ``tools`` as ``tools=``; otherwise the
call is rendered as text, ``<tool_call>\n{json}\n</tool_call>``, and the tool schemas are added to
the system message as ``<tools>\n{json}\n</tools>`` (a system message is added if there is none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alpaca_lora.data.prompts import PromptTemplate, get_template, list_templates
from alpaca_lora.errors import ConfigError, DataError, shown

MAX_CHAT_TEMPLATE_BYTES = 2**20
"""Largest chat template file read."""

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_FIXED = {"chatml": CHATML, "llama3": LLAMA3}
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
TOOLS_OPEN, TOOLS_CLOSE = "<tools>\n", "\n</tools>"


def chat_template_names() -> list[str]:
    """Names accepted by ``chat_template=``: ``chatml``, ``llama3`` and the Alpaca prompt templates."""
    return sorted([*_FIXED, *list_templates()])


def resolve_chat_template(tokenizer: Any, chat_template: str | Path | None = None) -> str:
    """Return the Jinja source of the chat template to render conversations with.

    Args:
        tokenizer: The base's tokenizer; its own ``chat_template`` is used when ``chat_template`` is None.
        chat_template: None (the tokenizer's own), a name from :func:`chat_template_names`, a Jinja
            string (it holds ``{{`` or ``{%``), or a path to a ``.jinja`` file.

    Returns:
        The template source.

    Raises:
        ConfigError: The tokenizer has no template and none was given, an unknown name, an unreadable
            file, or a template that is not valid Jinja.

    """
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one renders chats
            own = own.get("default")
        if not isinstance(own, str) or not own.strip():
            raise ConfigError(
                "the base's tokenizer has no chat template, so conversations cannot be rendered with it; pass "
                f"chat_template= one of {chat_template_names()} (e.g. 'alpaca' or, for a tokenizer with <|im_end|>, "
                "'chatml'), a Jinja string or a .jinja file")
        return _checked(own, "the tokenizer's chat template")
    if isinstance(chat_template, str) and chat_template in _FIXED:
        return _FIXED[chat_template]
    if isinstance(chat_template, str) and chat_template in list_templates():
        return alpaca_chat_template(get_template(chat_template), tokenizer)
    if isinstance(chat_template, str) and ("{{" in chat_template or "{%" in chat_template):
        return _checked(chat_template, "chat_template")
    if isinstance(chat_template, (str, Path)) and _is_file(Path(chat_template)):
        return _checked(_read(Path(chat_template)), f"chat template file {chat_template}")
    raise ConfigError(
        f"chat_template={shown(str(chat_template))}: not a built-in name, a Jinja string or an existing file; use "
        f"one of {chat_template_names()}, a Jinja string, a .jinja file path, or None for the tokenizer's own")


def alpaca_pieces(template: PromptTemplate) -> tuple[str, str, str, str, str]:
    """The literal text around an Alpaca template's placeholders, for the renderings built from it.

    Returns:
        ``(no-input before, no-input after, with-input before, between instruction and input, after input)``.

    """
    no_input = template.prompt_no_input.split("{instruction}", 1)
    with_input = template.prompt_input.split("{instruction}", 1)
    between, after = with_input[1].split("{input}", 1)
    return no_input[0], no_input[1], with_input[0], between, after


def alpaca_chat_template(template: PromptTemplate, tokenizer: Any) -> str:
    """An Alpaca prompt template as a chat template (see the module docs).

    ``bos_token`` opens the text when the tokenizer adds BOS to a plain text, as
    :func:`~alpaca_lora.data.prepare.tokenize_instruction` does, since a chat text is tokenized
    without the tokenizer's special tokens.
    """
    plain_before, plain_after, before, between, after = alpaca_pieces(template)
    bos = "{{ bos_token }}" if adds_bos(tokenizer) else ""
    return (
        bos + "{% set ns = namespace(system='') %}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] %}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% elif ns.system %}"
        f"{{{{ {_lit(before)} + message['content'] + {_lit(between)} + ns.system + {_lit(after)} }}}}"
        "{% set ns.system = '' %}"
        f"{{% else %}}{{{{ {_lit(plain_before)} + message['content'] + {_lit(plain_after)} }}}}"
        "{% endif %}{% endfor %}"
    )


def supports_tools(source: str) -> bool:
    """Whether the template renders structured tool calls (it reads ``tool_calls``)."""
    return "tool_calls" in source


def template_messages(messages: list[dict[str, Any]], tools: str, source: str) -> tuple[list[dict], list | None]:
    """Normalized messages (role, content, tool_call) as the template expects them, and its ``tools=``.

    See the module docs for how tool calls and tool schemas are rendered.
    """
    structured = supports_tools(source)
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m["content"]
        if m.get("tool_call"):
            calls = _tool_calls(content) if structured else None
            out.append({"role": "assistant", "content": "", "tool_calls": calls} if calls is not None
                       else {"role": "assistant", "content": TOOL_CALL_OPEN + content + TOOL_CALL_CLOSE})
        else:
            out.append({"role": role, "content": content})
    schemas = _tool_schemas(tools)
    if not schemas:
        return out, None
    if structured:
        return out, schemas
    listing = TOOLS_OPEN + json.dumps(schemas, ensure_ascii=False) + TOOLS_CLOSE
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" if out[0]["content"] else "") + listing}
    else:
        out.insert(0, {"role": "system", "content": listing})
    return out, None


def render(tokenizer: Any, source: str, messages: list[dict[str, Any]], *, tools: list | None = None,
           add_generation_prompt: bool = False) -> str:
    """Render template-ready ``messages`` to text; a template error is a DataError saying what it said."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=source, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise DataError(f"the chat template refuses this conversation: {shown(str(exc), 300)}; fix the "
                        "conversation (e.g. roles in the order the template requires) or pass another "
                        "chat_template") from None
    if not isinstance(text, str):
        raise ConfigError(f"the chat template rendered a {type(text).__name__}, not text; check chat_template")
    return text


# ---- helpers ---------------------------------------------------------------------------------------


def _lit(text: str) -> str:
    """``text`` as a Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped + "'"


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts BOS before a plain text (so a chat text must start with ``bos_token``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _tool_calls(content: str) -> list[dict[str, Any]] | None:
    """A tool call's JSON text as ``tool_calls`` entries; None when it is not such JSON (rendered as text)."""
    try:
        parsed = json.loads(content)
    except ValueError:
        return None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return None
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


def _tool_schemas(tools: str) -> list | None:
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except ValueError:
        raise DataError(f"the record's tools are not valid JSON ({shown(tools, 100)}); fix them") from None
    if isinstance(parsed, dict):
        parsed = [parsed]
    return parsed if isinstance(parsed, list) and parsed else None


def _checked(source: str, what: str) -> str:
    from jinja2 import Environment, TemplateSyntaxError

    try:
        Environment().parse(source)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"{what} is not valid Jinja (line {exc.lineno}: {shown(exc.message, 200)}); fix it") from None
    return source


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _read(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CHAT_TEMPLATE_BYTES:
            raise ConfigError(f"chat template file {path} is larger than {MAX_CHAT_TEMPLATE_BYTES:,} bytes; is it "
                              "the right file?")
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read chat template file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"chat template file {path} is not UTF-8 text; save it as UTF-8") from None
