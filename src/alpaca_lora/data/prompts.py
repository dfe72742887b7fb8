"""Prompt templates: the Alpaca family, shipped as package data and loaded by name.

A template is four strings. ``prompt_input`` and ``prompt_no_input`` hold the placeholders
``{instruction}`` (both) and ``{input}`` (``prompt_input`` only); ``response_split`` is the header
that ends every prompt, used to cut a response out of generated text. Templates live inside the
package (``alpaca_lora/data/templates/*.json``) so they load the same way from any working directory.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alpaca_lora.errors import ConfigError, shown

MAX_TEMPLATE_BYTES = 2**20
"""Largest template file read (a template is four short strings)."""
_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")
_FIELDS = ("description", "prompt_input", "prompt_no_input", "response_split")


@dataclass(frozen=True)
class PromptTemplate:
    """An instruction prompt template.

    Attributes:
        description: One line saying what the template is for.
        prompt_input: Prompt for records with an ``input``; holds ``{instruction}`` and ``{input}``.
        prompt_no_input: Prompt for records without ``input``; holds ``{instruction}``.
        response_split: The text that ends the prompt and precedes the response.
        name: Registry name, or ``"custom"``.

    """

    description: str
    prompt_input: str
    prompt_no_input: str
    response_split: str
    name: str = "custom"

    def __post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise ConfigError(f"prompt template {shown(self.name, 80)} is invalid: " + "; ".join(problems))

    def render(self, instruction: str, input: str | None = None, output: str | None = None) -> str:  # noqa: A002
        """Render the prompt for one record, optionally followed by its output.

        Args:
            instruction: The task description.
            input: Optional context; ``None`` or an empty string selects ``prompt_no_input``.
            output: If given, appended after the prompt (for display; training tokenizes it apart).

        Returns:
            The prompt text, ending with the response header (plus ``output`` if given).

        """
        values = {"instruction": instruction, "input": input or ""}
        template = self.prompt_input if input else self.prompt_no_input
        # One pass, so a literal "{input}" inside the instruction is left alone.
        text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
        return text + output if output else text

    def split_response(self, text: str) -> str:
        """Return the response part of ``text`` (everything after the first response header).

        Args:
            text: A rendered prompt followed by generated text, or generated text alone.

        Returns:
            The stripped response; ``text`` stripped when the header is absent.

        """
        _, found, after = text.partition(self.response_split)
        return (after if found else text).strip()

    def to_dict(self) -> dict[str, str]:
        """Return the template as a JSON-serialisable dict (the on-disk format)."""
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the template as JSON to ``path`` and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def _validate(t: PromptTemplate) -> list[str]:
    problems = []
    for field in (*_FIELDS, "name"):
        if not isinstance(getattr(t, field), str):
            problems.append(f"field {field!r} must be a string, got {type(getattr(t, field)).__name__}")
    if problems:
        return problems
    for field, needed in (("prompt_input", ("instruction", "input")), ("prompt_no_input", ("instruction",))):
        for name in needed:
            if "{" + name + "}" not in getattr(t, field):
                problems.append(f"{field!r} lacks the placeholder {{{name}}}; add it where the {name} goes")
    if not t.response_split.strip():
        problems.append("'response_split' is empty; set it to the response header, e.g. '### Response:'")
    else:
        for field in ("prompt_input", "prompt_no_input"):
            if t.response_split not in getattr(t, field):
                problems.append(
                    f"'response_split' {shown(t.response_split, 80)} does not occur in {field!r}; "
                    "it must be the header that ends the prompt"
                )
    return problems


def list_templates() -> list[str]:
    """Return the names of the built-in templates, sorted."""
    folder = resources.files("alpaca_lora.data") / "templates"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _from_dict(data: dict[str, Any], name: str, source: str) -> PromptTemplate:
    if not isinstance(data, dict):
        raise ConfigError(f"prompt template from {source} must be a JSON object, got {type(data).__name__}")
    missing = [f for f in _FIELDS if f not in data and f != "description"]
    unknown = [k for k in data if k not in (*_FIELDS, "name")]
    if missing or unknown:
        raise ConfigError(
            f"prompt template from {source}: missing fields {missing}, unknown fields {shown(unknown)}; "
            f"a template has exactly {list(_FIELDS)}"
        )
    fields = {f: data.get(f, "") for f in _FIELDS}
    return PromptTemplate(**fields, name=data.get("name", name))


def get_template(template: str | Path | dict[str, Any] | PromptTemplate = "alpaca") -> PromptTemplate:
    """Load a prompt template by registry name, JSON file path or dict.

    Args:
        template: A name from :func:`list_templates`, a path to a JSON file with the template
            fields, a dict with those fields, or a :class:`PromptTemplate` (returned as is).

    Returns:
        The template.

    Raises:
        ConfigError: Unknown name, unreadable file, or a template missing a placeholder.

    """
    if isinstance(template, PromptTemplate):
        return template
    if isinstance(template, dict):
        return _from_dict(template, "custom", "dict")
    names = list_templates()
    if not isinstance(template, (str, os.PathLike)):
        raise ConfigError(f"template={shown(template)}: must be a built-in name {names}, a JSON file path, a dict "
                          f"with fields {list(_FIELDS)} or a PromptTemplate (got {type(template).__name__})")
    if isinstance(template, str) and template in names:
        text = (resources.files("alpaca_lora.data") / "templates" / f"{template}.json").read_text("utf-8")
        return _from_dict(json.loads(text), template, f"built-in template {template!r}")
    path = Path(template)
    if _is_file(path):
        return _from_dict(_read_template_file(path), path.stem, f"file {path}")
    close = difflib.get_close_matches(str(template), names, n=3) if len(str(template)) <= 100 else []
    hint = f" Did you mean {close}?" if close else ""
    raise ConfigError(
        f"unknown prompt template {shown(str(template))}: not a built-in name and not an existing file.{hint} "
        f"Built-in templates: {names}; or pass a path to a JSON file or a dict with fields {list(_FIELDS)}."
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _read_template_file(path: Path) -> Any:
    try:
        size = path.stat().st_size
        raw = path.read_bytes() if size <= MAX_TEMPLATE_BYTES else b""
    except OSError as exc:
        raise ConfigError(f"cannot read prompt template file {path}: {exc.strerror or exc}") from None
    if size > MAX_TEMPLATE_BYTES:
        raise ConfigError(f"prompt template file {path} is larger than {MAX_TEMPLATE_BYTES:,} bytes; a template "
                          "is four short strings: is it the right file?")
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"prompt template file {path} is not valid UTF-8 JSON "
                          f"({shown(' '.join(str(exc).split()))}); fix the file") from None
