"""Command-line flags generated from dataclasses and function signatures.

Every flag of the ``alpaca-lora`` command comes from a Python definition: a dataclass field (its
type hint, default and the docstring under it) or a function parameter (its type hint, default and
its line in the Google-style ``Args:`` section). Nothing is copied by hand, so the command line and
the Python API cannot drift apart.

Flags are spelled like the Python names (``--micro_batch_size``, as tloen/alpaca-lora spelled
them); the dashed spelling (``--micro-batch-size``) is accepted too. A boolean flag alone means
true (``--train_on_inputs``); ``--train_on_inputs false`` turns one off.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, NoReturn

from alpaca_lora.config_file import field_docs
from alpaca_lora.errors import shown

_ARGS_HEADERS = ("Args:", "Arguments:", "Parameters:")


def docstring_args(func: Callable[..., Any]) -> dict[str, str]:
    """Parse the ``Args:`` section of a Google-style docstring into ``{parameter: description}``.

    Continuation lines (indented deeper than the parameter line) are joined to the description.
    """
    doc = inspect.getdoc(func) or ""
    out: dict[str, str] = {}
    in_args, indent, current = False, None, None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in _ARGS_HEADERS:
            in_args, indent, current = True, None, None
            continue
        if not in_args:
            continue
        if not stripped:
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the next section (Returns:, Raises:, ...)
            break
        match = re.match(r"\*{0,2}(\w+)(?:\s*\([^)]*\))?:\s*(.*)", stripped)
        if match and (indent is None or depth == indent):
            indent, current = depth, match.group(1)
            out[current] = match.group(2)
        elif current is not None:
            out[current] = f"{out[current]} {stripped}"
    return out


def parse_bool(text: str) -> bool:
    """Parse a boolean flag value (true/false, yes/no, on/off, 1/0)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(
        f"expected true or false, got {shown(text)} (put positional arguments before boolean flags)"
    )


def parse_int(text: str) -> int:
    """Parse an int flag value; the error quotes at most a bounded part of the text."""
    try:
        return int(text)
    except ValueError:  # also an int longer than Python converts (sys.get_int_max_str_digits)
        raise argparse.ArgumentTypeError(f"invalid int value: {shown(text)}; give a whole number") from None


def parse_float(text: str) -> float:
    """Parse a float flag value (``nan`` and ``inf`` parse; the config then refuses them)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {shown(text)}; give a number, e.g. 3e-4") from None


def parse_json_or_text(text: str) -> Any:
    """Parse a flag value as JSON (numbers, true/false/null, lists, objects), else keep the text."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an over-long int, or nested past Python's stack
        return text


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    convert.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its errors
    return convert


def _text_or_json(allowed: tuple[type, ...]) -> Callable[[str], Any]:
    """JSON where it gives a value of an ``allowed`` type (a list, a dict, null, a number), else the text."""

    def convert(text: str) -> Any:
        value = parse_json_or_text(text)
        if value is None:
            return None if type(None) in allowed else text
        kinds = {bool: (bool,), int: (int,), float: (float, int), list: (list,), dict: (dict,)}
        ok = any(isinstance(value, k) and not (isinstance(value, bool) and k is not bool)
                 for a in allowed for k in kinds.get(typing.get_origin(a) or a, ()))
        return value if ok else text

    convert.__name__ = "value"
    return convert


def converter(hint: Any) -> Callable[[str], Any]:
    """Return the function that turns a flag's text into a value of type ``hint``.

    ``int``, ``float``, ``str`` and ``bool`` convert directly (``Optional`` ones also take
    ``none``/``null``); ``Any`` and paths stay text; other unions take JSON where it gives one of
    their types (a list such as ``'["q_proj", "v_proj"]'``, an object, ``null``, a number) and the
    text otherwise.
    """
    simple = {bool: parse_bool, int: parse_int, float: parse_float, str: str}
    if hint in simple:
        return simple[hint]
    if hint is Any or getattr(hint, "__name__", "") in ("Path", "PurePath"):
        return str
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        if len(args) == 1 and args[0] in simple:
            return _optional(simple[args[0]]) if nullable else simple[args[0]]
        return _text_or_json(typing.get_args(hint))
    return parse_json_or_text


def _is_bool(hint: Any) -> bool:
    return hint is bool or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                            and set(typing.get_args(hint)) == {bool, type(None)})


def plain_doc(text: str) -> str:
    """Docstring markup made plain for a terminal: ``:func:`x``` -> ``x``, double backquotes dropped."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def _help(doc: str, default: Any) -> str:
    text = plain_doc(doc or "")
    if default is not inspect.Parameter.empty and default is not dataclasses.MISSING:
        text = f"{text} (default: {default!r})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_flag(parser: argparse.ArgumentParser, name: str, hint: Any, default: Any, doc: str,
             required: bool = False) -> None:
    """Add ``--name`` (and the dashed alias ``--na-me``) converting to ``hint``; unset flags stay unset."""
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(doc, default)}
    if _is_bool(hint):
        kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
    else:
        kwargs.update(type=converter(hint), metavar="V", required=required)
    parser.add_argument(f"--{name}", **kwargs)
    dashed = name.replace("_", "-")
    if dashed != name:
        parser.add_argument(f"--{dashed}", **{**kwargs, "help": argparse.SUPPRESS, "required": False})


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Add a flag per field of dataclass ``cls`` (type, default and doc from the class) and return their names."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            add_flag(parser, f.name, hints[f.name], f.default, docs.get(f.name, ""))
            names.append(f.name)
    return names


def add_signature_flags(parser: argparse.ArgumentParser, func: Callable[..., Any], *, skip: tuple[str, ...] = (),
                        as_flags: tuple[str, ...] = (), many: tuple[str, ...] = (),
                        optional: tuple[str, ...] = ()) -> list[str]:
    """Add the parameters of ``func`` to ``parser`` and return their names.

    Parameters without a default become positional arguments (except those in ``as_flags``, which
    become required flags); parameters with one become flags. Types come from the annotations, help
    texts from the docstring's ``Args:`` section. ``*args``/``**kwargs`` are left out.

    Args:
        parser: The (sub)command parser.
        func: The library function the command calls.
        skip: Parameters not offered on the command line.
        as_flags: Parameters without a default that are still spelled as (required) flags.
        many: Positional parameters that take one or more values (a list when more than one is given).
        optional: Positional parameters that may be left out (another flag gives what they would): ``many``
            ones then take zero or more values (an empty list when none is given), others become ``None``.

    """
    docs = docstring_args(func)
    hints = typing.get_type_hints(func)
    names = []
    for p in inspect.signature(func).parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint, doc = hints.get(p.name, str), docs.get(p.name, "")
        if p.default is p.empty and p.name not in as_flags:
            nargs = ("*" if p.name in optional else "+") if p.name in many else ("?" if p.name in optional else None)
            parser.add_argument(p.name, type=converter(hint), metavar=p.name.upper(), help=_help(doc, p.default),
                                nargs=nargs)
        else:
            add_flag(parser, p.name, hint, p.default, doc, required=p.default is p.empty)
        names.append(p.name)
    return names


MAX_ERROR_CHARS = 1000
"""Longest usage-error message printed: argparse quotes the offending argument whole."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose unknown-flag error names the closest known flags (exit status 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # "--micro" must not silently mean --micro_batch_size
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Exit with status 2 and the message, cut to ``MAX_ERROR_CHARS`` (a megabyte argument is quoted whole)."""
        if len(message) > MAX_ERROR_CHARS:
            message = f"{message[:MAX_ERROR_CHARS]}... ({len(message):,} characters)"
        super().error(message)

    def known_flags(self) -> list[str]:
        """Every option string this parser accepts."""
        return [s for action in self._actions for s in action.option_strings]

    def fail_unknown(self, extras: list[str]) -> NoReturn:
        """Exit with status 2, naming each unknown flag and its close matches."""
        known = self.known_flags()
        problems = []
        after_flag = False
        for extra in extras:
            flag = extra.split("=", 1)[0]
            if not flag.startswith("-"):
                if not after_flag:  # else it is the unknown flag's value
                    problems.append(f"unexpected argument {shown(extra, 80)}")
                after_flag = False
                continue
            after_flag = "=" not in extra
            name = flag.replace("-", "_").strip("_")
            close = difflib.get_close_matches(name, [k.replace("-", "_").strip("_") for k in known], n=3,
                                              cutoff=0.6) if len(name) <= 100 else []
            hint = f" (did you mean {', '.join('--' + c for c in dict.fromkeys(close))}?)" if close else ""
            problems.append(f"unknown flag {flag if len(flag) <= 80 else shown(flag, 80)}{hint}")
        more = f" and {len(problems) - 10:,} more" if len(problems) > 10 else ""
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {'; '.join(problems[:10])}{more}. See {self.prog} --help for every "
                  "flag.\n")
