"""Exceptions users catch. Every message says what is wrong and how to fix it."""

from __future__ import annotations

import reprlib
from pathlib import Path


class AlpacaLoraError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(AlpacaLoraError, TypeError, ValueError):
    """A bad configuration field, override name or value.

    It derives from both ``TypeError`` (an unknown keyword is a call error) and ``ValueError``
    (a value out of range), so either ``except`` clause a user already has will catch it.
    """


class DataError(AlpacaLoraError, ValueError):
    """A data file or record that cannot be used; the message names the file and record."""


class ModelError(AlpacaLoraError, ValueError):
    """A base model, adapter or module layout that cannot be used as asked."""


class CheckpointError(AlpacaLoraError, ValueError):
    """A checkpoint that is missing, incomplete or from a different run."""


class TrainingDiverged(AlpacaLoraError, FloatingPointError):
    """The training loss or gradient became NaN or infinite; the update was skipped.

    Attributes:
        step: The optimizer step that diverged (1-based; it was not applied).
        checkpoint: The checkpoint of the last good state, or None when no step had completed.

    """

    def __init__(self, message: str, *, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class TrainingInterrupted(AlpacaLoraError):
    """Training stopped on SIGTERM or a first Ctrl-C (SIGINT), after saving a resumable checkpoint.

    Attributes:
        signal_name: "SIGTERM" or "SIGINT".
        step: Optimizer steps completed (and saved).
        checkpoint: The checkpoint to resume from (``resume_from_checkpoint=True`` finds it).
        exit_code: What the command line exits with: 128 + the signal number (130, 143).

    """

    def __init__(self, message: str, *, signal_name: str, signal_number: int, step: int, checkpoint: Path) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + signal_number


class DistributedError(AlpacaLoraError, RuntimeError):
    """Another process of a multi-process run failed; this one stops too (the message names the rank)."""


SHOWN_CHARS = 120
"""Most characters of a user's value an error message quotes (a gigantic value must not make a gigantic message)."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was, for quoting input in messages.

    A value that cannot be represented (a broken ``__repr__``, a structure nested past the recursion
    limit) is shown by its type name.
    """
    try:
        text = _SHORT_REPR.repr(value)  # containers cut by depth and length while the text is built
    except Exception:  # noqa: BLE001 - any failure of a user object's __repr__
        return f"<{type(value).__name__}>"
    if len(text) > limit:
        text = f"{text[:limit]}..."
    if isinstance(value, (str, bytes)) and len(value) > limit // 2:
        text += f" ({len(value):,} characters)"
    return text


def _short_repr() -> reprlib.Repr:
    """A ``reprlib.Repr`` that builds at most about ``SHOWN_CHARS`` of text whatever the value's size or sharing.

    A plain ``repr`` of a "billion laughs" list (a few shared lists nested nine deep) would build
    gigabytes before it could be cut.
    """
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, SHOWN_CHARS, SHOWN_CHARS, SHOWN_CHARS
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 8
    return r


_SHORT_REPR = _short_repr()
