"""An Ollama ``Modelfile`` for an exported GGUF: the training chat template as a Go template, stops, sampling.

Ollama renders prompts with Go's ``text/template``, not Jinja, so the training template is translated:

- An Alpaca prompt template (the run trained on instruction records) is written out directly: the
  instruction from the user turn, a system message as the Alpaca input, the answer followed by EOS.
- Any other chat template is read off its own renderings: a probe conversation whose contents are unique
  markers is rendered with and without a system message, and the text between the markers gives what
  comes before a system, user and assistant turn after each kind of turn, and the generation prompt.

The translation is checked by rendering conversations both ways (docs/export.md, tests/export).
"""

from __future__ import annotations

import json
from typing import Any

from alpaca_lora.data import chat_templates
from alpaca_lora.errors import ConfigError, DataError
from alpaca_lora.export.gguf_source import ModelSource

_M = {"system": "QzSYSTEMzQ", "u1": "QzUSER1zQ", "a1": "QzASSISTANT1zQ", "u2": "QzUSER2zQ"}


def modelfile(gguf_name: str, source: ModelSource, chat_template: str | None) -> str:
    """The text of a Modelfile for ``gguf_name`` (in the same folder) with the training prompt format."""
    from alpaca_lora.data.chat import end_of_turn_ids
    from alpaca_lora.data.chat_templates import alpaca_chat_template

    tok = source.tokenizer
    lines = [f"# ollama create {gguf_name.removesuffix('.gguf')} -f {gguf_name.removesuffix('.gguf')}.Modelfile",
             f"FROM ./{gguf_name}"]
    template = None
    if chat_template:
        alpaca = alpaca_chat_template(source.template, tok) == chat_template
        template = alpaca_go_template(source, tok) if alpaca else go_template(tok, chat_template)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    stops = {tok.eos_token} | ({tok.convert_ids_to_tokens(i) for i in end_of_turn_ids(tok, chat_template)}
                                if chat_template else set())
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in sorted(s for s in stops if s)]
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    lines += [f"PARAMETER {names[k]} {v}" for k, v in source.generation.items()]
    return "\n".join(lines) + "\n"


def alpaca_go_template(source: ModelSource, tokenizer: Any) -> str:
    """The Alpaca prompt template as a Go template (a system message becomes the Alpaca input)."""
    from alpaca_lora.data.chat_templates import adds_bos, alpaca_pieces

    plain_before, plain_after, before, between, after = alpaca_pieces(source.template)
    bos = _lit(tokenizer.bos_token) if adds_bos(tokenizer) and tokenizer.bos_token else ""
    return (f'{bos}{{{{ $sys := "" }}}}{{{{ range .Messages }}}}{{{{ if eq .Role "system" }}}}{{{{ $sys = .Content }}}}'
            f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{_lit(tokenizer.eos_token)}'
            f'{{{{ else if $sys }}}}{_lit(before)}{{{{ .Content }}}}{_lit(between)}{{{{ $sys }}}}{_lit(after)}'
            f'{{{{ $sys = "" }}}}{{{{ else }}}}{_lit(plain_before)}{{{{ .Content }}}}{_lit(plain_after)}'
            "{{ end }}{{ end }}")


def go_template(tokenizer: Any, source: str) -> str | None:
    """A Go template that renders conversations as the Jinja ``source`` does; None if it cannot be read off."""
    def render(keys: list[str]) -> str | None:
        roles = {"system": "system", "u1": "user", "a1": "assistant", "u2": "user"}
        msgs = [{"role": roles[k], "content": _M[k]} for k in keys]
        try:
            text = chat_templates.render(tokenizer, source, msgs, add_generation_prompt=True)
        except (ConfigError, DataError):
            return None
        return text if all(text.count(_M[k]) == 1 for k in keys) else None

    plain = render(["u1", "a1", "u2"])
    if plain is None:
        return None
    first_user, user_to_assistant, assistant_to_user, generation = _between(plain, ["u1", "a1", "u2"])
    full = render(["system", "u1", "a1", "u2"])
    parts = _between(full, ["system", "u1", "a1", "u2"]) if full else None
    if parts and (parts[2], parts[3], parts[4]) != (user_to_assistant, assistant_to_user, generation):
        parts = None  # the system message changes later turns: render system-less conversations only
    system = (f'{{{{ if eq .Role "system" }}}}{_lit(parts[0])}{{{{ .Content }}}}{{{{ else if eq .Role "user" }}}}'
              f'{{{{ if eq $prev "system" }}}}{_lit(parts[1])}{{{{ else if eq $prev "" }}}}') if parts else (
              '{{ if eq .Role "user" }}{{ if eq $prev "" }}')
    return ('{{ $prev := "" }}{{ range .Messages }}' + system
            + f'{_lit(first_user)}{{{{ else }}}}{_lit(assistant_to_user)}{{{{ end }}}}{{{{ .Content }}}}'
            f'{{{{ else if eq .Role "assistant" }}}}{_lit(user_to_assistant)}{{{{ .Content }}}}'
            '{{ end }}{{ if or (eq .Role "user") (eq .Role "assistant") (eq .Role "system") }}'
            '{{ $prev = .Role }}{{ end }}'
            f'{{{{ end }}}}{{{{ if ne $prev "assistant" }}}}{_lit(generation)}{{{{ end }}}}')


def _between(text: str, keys: list[str]) -> list[str]:
    """The text before the first marker, between consecutive markers, and after the last."""
    out, at = [], 0
    for k in keys:
        i = text.index(_M[k], at)
        out.append(text[at:i])
        at = i + len(_M[k])
    return [*out, text[at:]]


def _lit(text: str) -> str:
    """Literal text for a Go template (``{{`` would open an action, so it is printed as a string)."""
    return text.replace("{{", '{{ "{{" }}')
