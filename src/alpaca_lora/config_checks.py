"""Value checks for typed settings: each names the field, the value, what is allowed and the fix.

``FinetuneConfig`` (:mod:`alpaca_lora.config`) and the demo's settings build their problem lists from
these; each check returns "" for a good value, so a class collects every problem and raises once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from alpaca_lora.errors import ConfigError, shown

INT_MAX = 2**31 - 1
"""Largest count (steps, examples, tokens, seconds) a config accepts: beyond it something is wrong."""
MAX_LORA_R = 65_536
"""Largest LoRA rank: the hidden size of the largest Llama-family models is smaller."""
SEED_MAX = 2**32 - 1
"""Largest seed (numpy seeds its generator from 32 bits)."""
MAX_EPOCHS = 1_000_000
"""Largest ``num_epochs`` (a step count derived from more would not fit a training loop)."""
FLOAT32_MAX = 3.4028234663852886e38
"""Largest float32: torch's AdamW refuses a larger learning rate with "value cannot be converted" mid-step."""
_TRUE_WORDS = ("true", "yes", "on", "1", "y", "t")
_FALSE_WORDS = ("false", "no", "off", "0", "n", "f", "none", "")


_Class = TypeVar("_Class", bound=type)


def keyword_checked(cls: _Class) -> _Class:
    """Make the dataclass ``cls`` refuse unknown keyword names with a ConfigError listing close matches.

    Applied at class definition, above ``@dataclass``: ``FinetuneConfig(lora_rank=8)`` then says
    "did you mean lora_r?", as ``finetune(lora_rank=8)`` does, instead of Python's bare ``TypeError``.
    """
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise ConfigError(f"{cls.__name__}() takes at most {len(names)} values by position, got {len(args)}; "
                              f"pass fields by name, e.g. {cls.__name__}({names[0]}=...)")
        check_names(kwargs, names, f"{cls.__name__}()", cls.__name__)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]  # our own class, at its definition
    return cls


def is_finite(value: int | float) -> bool:
    """True for a finite float and for an int a float can hold (``math.isfinite`` overflows on huge ints)."""
    return math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max


def number_fix(name: str, value: Any, example: Any) -> str:
    """How to fix a non-number: the number a text spells, the int a whole float is, else an example."""
    if isinstance(value, str) and len(value) < 40:
        try:
            finite = math.isfinite(float(value))
        except ValueError:
            finite = False
        if finite:
            return f"; write a number, not text: {name}={value.strip()}"
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and isinstance(example, int):
        return f"; use {name}={int(value)}"
    return f"; e.g. {name}={example!r} (the default)" if example is not None else ""


def int_problem(name: str, value: Any, low: int, high: int, *, optional: bool = False, example: Any = None) -> str:
    """Say what is wrong with an int field's ``value`` ("" when it is a real int in ``[low, high]``).

    Bools and whole floats are refused: ``True`` is not a count, and ``8.0`` is a float that fails
    later in ``range()`` or a tensor shape.
    """
    if optional and value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return ""
    kind = f"an int in [{low}, {high}]" + (" or None" if optional else "")
    if isinstance(value, int) and not isinstance(value, bool):
        fix = f"; e.g. {name}={example!r} (the default)" if example is not None else ""
    else:
        fix = number_fix(name, value, example if example is not None else low)
    return f"{name}={shown(value)}: must be {kind}{fix}"


def number_problem(name: str, value: Any, ok: Callable[[float], bool], allowed: str, *, example: Any = None) -> str:
    """Say what is wrong with a float field's ``value`` ("" when it is a finite number for which ``ok`` holds)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and is_finite(value) and ok(value):
        return ""
    fix = number_fix(name, value, example) if not isinstance(value, (int, float)) or isinstance(value, bool) else (
        f"; e.g. {name}={example!r} (the default)" if example is not None else "")
    return f"{name}={shown(value)}: must be a finite number {allowed}{fix}"


def bool_problem(name: str, value: Any) -> str:
    """Say what is wrong with a bool field's ``value`` ("" for True or False).

    Text is refused: any non-empty string is true in Python, so ``train_on_inputs="no"`` would mean yes.
    """
    if isinstance(value, bool):
        return ""
    word = value.strip().lower() if isinstance(value, str) else value
    if isinstance(word, (str, int)) and not isinstance(word, bool):
        if word in _TRUE_WORDS or word == 1:
            return f"{name}={shown(value)}: must be True or False, not {type(value).__name__}; use {name}=True"
        if word in _FALSE_WORDS or word == 0:
            return f"{name}={shown(value)}: must be True or False, not {type(value).__name__}; use {name}=False"
    return f"{name}={shown(value)}: must be True or False"


def is_choice(value: Any, allowed: tuple) -> bool:
    """Whether ``value`` is one of ``allowed`` (text or None; an unhashable value is not)."""
    return (value is None or isinstance(value, str)) and value in allowed


def choice_problem(name: str, value: Any, allowed: tuple) -> str:
    """Say that ``value`` is not one of ``allowed``, with the closest one when it looks like a typo."""
    close = (difflib.get_close_matches(value, [a for a in allowed if isinstance(a, str)], n=1)
             if isinstance(value, str) and len(value) <= 100 else [])
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{name}={shown(value)}: must be one of {list(allowed)}{hint}"


def check_names(data: Any, names: list[str], source: str, what: str) -> None:
    """Raise ConfigError naming every key of ``data`` not in ``names``, with close matches.

    Args:
        data: The mapping (or keyword arguments) to check.
        names: The known names.
        source: Where the keys came from, for the message (a file, "finetune() keyword arguments").
        what: The class whose fields they should be, e.g. "FinetuneConfig".

    """
    bad = []
    for key in data:
        if not isinstance(key, str):
            bad.append(f"{shown(key, 60)} (a field name is text)")
        elif key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.6) if len(key) <= 100 else []
            bad.append(shown(key, 60) + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if bad:
        more = f" and {len(bad) - 10:,} more" if len(bad) > 10 else ""
        raise ConfigError(
            f"unknown {what} field(s) in {source}: {'; '.join(bad[:10])}{more}. "
            f"See help(alpaca_lora.{what}) for every field."
        )
