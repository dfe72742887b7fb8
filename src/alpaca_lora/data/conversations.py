"""Reading conversation records: OpenAI ``messages`` and ShareGPT ``conversations``, normalized to one form.

Every conversation becomes::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str,
                   "train": bool, "tool_call": bool}, ...],
     "tools": str}  # the JSON text of the tool schemas, "" when there are none

``train`` is False for a turn marked ``"train": false`` or ``"loss_weight": 0`` (LLaMA-Factory's
spelling). ``tool_call`` is True for an assistant turn that calls a tool: a ShareGPT ``function_call``
(its JSON text kept verbatim) or an OpenAI assistant message with ``tool_calls`` (rewritten as compact
JSON text, ``{"name": ..., "arguments": {...}}``, or a list of those for several calls). A bad record
is an error naming the file, the record and the turn (an index, counted from 0 like the record
index), or, with ``skip_bad_records=True``, a reported skip.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import datasets

from alpaca_lora.data.encoding import surrogate_problem, unencodable_at
from alpaca_lora.data.records import SKIP_HINT, Items, json_kind, listed, read_items, warn_skipped
from alpaca_lora.data.stream import Item
from alpaca_lora.errors import ConfigError, DataError, shown

ROLES = ("system", "user", "assistant", "tool")
CONVERSATION_FORMATS = ("messages", "sharegpt")

# Per format: (the record's conversation key, a turn's role key, its content key).
_KEYS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}
_OTHER = {"messages": "sharegpt", "sharegpt": "messages"}
# ShareGPT speakers -> (role, tool_call); user/assistant/tool are accepted as aliases.
_SHAREGPT_ROLES = {
    "human": ("user", False), "gpt": ("assistant", False), "system": ("system", False),
    "function_call": ("assistant", True), "observation": ("tool", False),
    "user": ("user", False), "assistant": ("assistant", False), "tool": ("tool", False),
}
_VALID_ROLES = {
    "messages": ", ".join(ROLES),
    "sharegpt": "human, gpt, system, function_call, observation (or user, assistant, tool)",
}

# A problem found in a record: (the turn index, or None for the record as a whole; what is wrong).
_Problem = tuple["int | None", str]

# ---- reading -----------------------------------------------------------------------------------


def conversation_format(columns: list[str]) -> str | None:
    """The conversation format the column names show: "messages", "sharegpt" or None for neither.

    Args:
        columns: The column names (record keys) of a source.

    Returns:
        "messages" when there is a ``messages`` column, else "sharegpt" when there is a
        ``conversations`` column, else None.

    """
    if "messages" in columns:
        return "messages"
    return "sharegpt" if "conversations" in columns else None


def read_conversations(
    name: str, items: Items, *, format: str, skip_bad_records: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate the raw items of :func:`~alpaca_lora.data.records.read_items` as conversations.

    Args:
        name: The source's name for messages, as ``read_items`` returns it.
        items: The raw items ``read_items`` returns.
        format: "messages" (OpenAI: ``messages``, a list of ``{"role", "content"}``) or "sharegpt"
            (``conversations``, a list of ``{"from", "value"}``). Either reads its list from the
            other's key when a record has only that one.
        skip_bad_records: Skip bad records and report them instead of raising on the first one.

    Returns:
        ``(records, skipped)``: the normalized conversations (see the module docstring); one
        human-readable reason per skipped record.

    Raises:
        ConfigError: ``format`` is not one of ``CONVERSATION_FORMATS``.
        DataError: No items, a bad record (unless ``skip_bad_records``), or no usable record at all.

    """
    if format not in CONVERSATION_FORMATS:
        raise ConfigError(f"format={shown(format, 60)}: a conversation format is one of "
                          f"{', '.join(CONVERSATION_FORMATS)}")
    if not items:
        raise DataError(f"{name} holds no records; it needs at least one conversation with an assistant turn")
    skipped: list[str] = []
    records = list(checked_conversations(items, format, skip_bad_records=skip_bad_records, skipped=skipped))
    if not records:
        raise no_usable_conversations(name, len(skipped), skipped)
    return records, skipped


def checked_conversations(
    items: Iterable[Item], format: str, *, skip_bad_records: bool, skipped: Any
) -> Iterator[dict[str, Any]]:
    """Yield the normalized conversations of ``items`` one at a time (``format``: "messages" or "sharegpt").

    A bad record raises DataError (naming the record and turn, with the fix), or with
    ``skip_bad_records`` its reason is appended to ``skipped`` (a list, or a
    :class:`~alpaca_lora.data.stream.Skips` that keeps only a few).
    """
    for where, obj, parse_problem in items:
        record, found = (None, (None, parse_problem)) if parse_problem else _check_conversation(obj, format)
        if record is not None:
            yield record
            continue
        turn, problem = found
        reason = f"{where}: {problem}" if turn is None else f"{where}, turn {turn}: {problem}"
        if not skip_bad_records:
            raise DataError(f"{reason}. {SKIP_HINT}")
        skipped.append(reason)


def no_usable_conversations(name: str, count: int, reasons: list[str]) -> DataError:
    """The error for conversation data whose ``count`` records are all bad (``reasons``: the first ones)."""
    return DataError(f"{name}: no usable conversations, all {count} are bad (first reasons: {'; '.join(reasons[:5])})"
                     ". Fix the data, or pass the format it is in (format='messages' or format='sharegpt').")


def load_conversations(source: Any, *, format: str = "auto", skip_bad_records: bool = False) -> datasets.Dataset:
    """Load conversation data as a ``Dataset`` with exactly the columns ``messages`` and ``tools``.

    Args:
        source: Anything :func:`~alpaca_lora.data.records.read_records` reads.
        format: "messages", "sharegpt", or "auto" to choose by the columns: ``messages`` means
            "messages", ``conversations`` means "sharegpt".
        skip_bad_records: Skip bad records and report them (a warning that says how many and
            shows up to five reasons) instead of raising on the first one.

    Returns:
        The normalized conversations (see the module docstring), with the features of
        :func:`conversation_features`.

    Raises:
        ConfigError: An unknown ``format``.
        DataError: A file-level problem, no conversation column (with ``format="auto"``), a bad
            record (unless ``skip_bad_records``), or no usable record at all.

    """
    if format not in ("auto", *CONVERSATION_FORMATS):
        raise ConfigError(f"format={shown(format, 60)}: must be 'auto', 'messages' or 'sharegpt'")
    name, items, columns = read_items(source)
    if format == "auto":
        found = conversation_format(columns)
        if found is None and items:
            raise DataError(
                f"{name}: no 'messages' or 'conversations' column among {listed(columns)}, so no conversations; "
                "for instruction data use load_instructions() (or load_data(), which detects the format)"
            )
        format = found or "messages"
    records, skipped = read_conversations(name, items, format=format, skip_bad_records=skip_bad_records)
    return conversations_dataset(records, skipped, stacklevel=2)


def conversations_dataset(
    records: list[dict[str, Any]], skipped: list[str], *, stacklevel: int = 2
) -> datasets.Dataset:
    """The ``Dataset`` of normalized conversations; the skipped ones are warned of by ``warn_skipped``."""
    warn_skipped(skipped, len(records), stacklevel=stacklevel + 1)
    columns = {"messages": [r["messages"] for r in records], "tools": [r["tools"] for r in records]}
    return datasets.Dataset.from_dict(columns, features=conversation_features())


def conversation_features() -> datasets.Features:
    """The features of a conversation ``Dataset``: a list of turn structs, and the tools' JSON text."""
    turn = {"role": datasets.Value("string"), "content": datasets.Value("string"),
            "train": datasets.Value("bool"), "tool_call": datasets.Value("bool")}
    return datasets.Features({"messages": [turn], "tools": datasets.Value("string")})


# ---- validation --------------------------------------------------------------------------------


def _check_conversation(obj: Any, fmt: str) -> tuple[dict[str, Any] | None, _Problem]:
    """Validate and normalize one raw record: ``(record, (None, ""))`` or ``(None, (turn, problem))``."""
    key = _KEYS[fmt][0]
    if not isinstance(obj, dict):
        return None, (None, f"is a {json_kind(obj)}, not an object with a {key!r} list")
    other = _KEYS[_OTHER[fmt]][0]
    if key not in obj and other in obj:
        key = other
    turns = obj.get(key)
    if turns is None:
        return None, (None, f"has {'a null' if key in obj else 'no'} {key!r} list of turns")
    if not isinstance(turns, list):
        return None, (None, f"{key!r} is a {json_kind(turns)}, not a list of turns")
    if not turns:
        return None, (None, f"{key!r} is an empty list; a conversation needs a user and an assistant turn")
    tools, problem = _tools_text(obj.get("tools"))
    if problem:
        return None, (None, problem)
    messages = []
    for index, turn in enumerate(turns):
        message, problem = _check_turn(turn, fmt)
        if message is None:
            return None, (index, problem)
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        return None, (None, "has no assistant turn, so nothing to learn from; add one or remove the record")
    return {"messages": messages, "tools": tools}, (None, "")


def _check_turn(turn: Any, fmt: str) -> tuple[dict[str, Any] | None, str]:
    """Validate and normalize one turn: ``(message, "")`` or ``(None, problem)``."""
    _, role_key, content_key = _KEYS[fmt]
    if not isinstance(turn, dict):
        return None, f"is a {json_kind(turn)}, not an object with {role_key!r} and {content_key!r}"
    role, tool_call = _role(turn.get(role_key), fmt)
    if role is None:
        return None, _role_problem(turn, fmt)
    train, problem = _train_flag(turn)
    if problem:
        return None, problem
    content = turn.get(content_key)
    if fmt == "messages" and role == "assistant" and turn.get("tool_calls"):
        if isinstance(content, str) and content.strip():
            return None, (f"has both text content ({shown(content, 60)}) and tool_calls; put the text in an "
                          "assistant turn of its own")
        if content is not None and not isinstance(content, str):
            return None, f"'content' is a {json_kind(content)}; a message with tool_calls has null or empty content"
        content, problem = _tool_calls_text(turn["tool_calls"])
        if problem:
            return None, problem
        tool_call = True
    elif fmt == "messages" and turn.get("tool_call") is not None:  # what load_conversations writes: read back
        if not isinstance(turn["tool_call"], bool) or (turn["tool_call"] and role != "assistant"):
            return None, f"'tool_call' is {shown(turn['tool_call'], 60)}; it is true only for an assistant turn"
        tool_call = turn["tool_call"]
    if not isinstance(content, str):
        return None, _content_problem(turn, fmt, content)
    if role in ("user", "assistant") and not content.strip():
        return None, f"the {role} turn's {content_key!r} is empty; give it text or remove the turn"
    bad = unencodable_at(content)
    if bad is not None:
        return None, f"{content_key!r} {surrogate_problem(content, bad)}"
    return {"role": role, "content": content, "train": train, "tool_call": tool_call}, ""


def _role(value: Any, fmt: str) -> tuple[str | None, bool]:
    """``(role, tool_call)`` for a turn's role value, or ``(None, False)`` for an unknown one."""
    if not isinstance(value, str):
        return None, False
    if fmt == "messages":
        return (value, False) if value in ROLES else (None, False)
    return _SHAREGPT_ROLES.get(value, (None, False))


def _role_problem(turn: dict[str, Any], fmt: str) -> str:
    """Why a turn has no usable role, suggesting the other format when the turn is in it."""
    _, role_key, content_key = _KEYS[fmt]
    other = _OTHER[fmt]
    _, other_role, other_content = _KEYS[other]
    if role_key not in turn and other_role in turn:
        return (f"has {other_role!r}/{other_content!r} keys where {fmt} turns have {role_key!r}/{content_key!r}; "
                f"the data is in the {other} form: pass format={other!r}")
    if role_key not in turn:
        return f"has no {role_key!r}; roles are {_VALID_ROLES[fmt]}"
    return f"unknown role {shown(turn[role_key], 60)}; roles are {_VALID_ROLES[fmt]}"


def _content_problem(turn: dict[str, Any], fmt: str, content: Any) -> str:
    """Why a turn's content is not a string."""
    content_key = _KEYS[fmt][2]
    if content_key not in turn:
        return f"has no {content_key!r}; every turn needs its text"
    if content is None:
        allowed = " (only an assistant message with tool_calls may have null content)" if fmt == "messages" else ""
        return f"{content_key!r} is null{allowed}; give the text"
    parts = "; join the text parts into one string" if isinstance(content, list) else "; quote it"
    return f"{content_key!r} is a {json_kind(content)}, not a string{parts}"


def _train_flag(turn: dict[str, Any]) -> tuple[bool, str]:
    """Whether the turn is trained on: ``(train, "")``, or ``(True, problem)`` for a bad flag."""
    train, weight = turn.get("train"), turn.get("loss_weight")
    if train is not None and not isinstance(train, bool):
        return True, f"'train' is {shown(train, 60)}; it must be true or false"
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if weight is not None and (not number or weight not in (0, 1)):
        return True, f"'loss_weight' is {shown(weight, 60)}: only 0 (no loss) or 1 is supported"
    return not (train is False or weight == 0), ""


def _tool_calls_text(calls: Any) -> tuple[str, str]:
    """OpenAI ``tool_calls`` as compact JSON text: ``(text, "")`` or ``("", problem)``."""
    if not isinstance(calls, list):
        return "", f"'tool_calls' is a {json_kind(calls)}, not a list of calls"
    normalized = []
    for index, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            return "", (f"tool_calls[{index}] is {shown(call, 80)}, with no function name; a call is "
                        "{'type': 'function', 'function': {'name': ..., 'arguments': '{...}'}}")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):  # not JSON text: kept as the string it is
                pass
        normalized.append({"name": name, "arguments": arguments})
    return _compact(normalized[0] if len(normalized) == 1 else normalized, "tool_calls")


def _tools_text(value: Any) -> tuple[str, str]:
    """The record's tool schemas as JSON text (``""`` for none): ``(text, "")`` or ``("", problem)``."""
    if value is None or value == "":
        return "", ""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            return "", f"'tools' is not valid JSON ({reason}): {shown(value, 80)}; give the tool schemas as JSON text"
        text = value
    elif isinstance(value, (list, dict)):
        parsed = value
        text, problem = _compact(value, "tools")
        if problem:
            return "", problem
    else:
        return "", f"'tools' is a {json_kind(value)}; give a list of tool schemas or its JSON text"
    if not isinstance(parsed, (list, dict)):
        return "", f"'tools' holds a JSON {json_kind(parsed)}, not a list of tool schemas"
    if not parsed:
        return "", ""
    bad = unencodable_at(text)
    if bad is not None:
        return "", f"'tools' {surrogate_problem(text, bad)}"
    return text, ""


def _compact(value: Any, what: str) -> tuple[str, str]:
    """``value`` as compact JSON text, or ``("", problem)`` when it cannot be written as JSON."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")), ""
    except (TypeError, ValueError, RecursionError) as exc:
        return "", f"{what!r} cannot be written as JSON ({type(exc).__name__}); it must hold plain JSON values"
