"""Exceptions users catch. Every message says what is wrong and how to fix it."""

from __future__ import annotations


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


class DistributedError(AlpacaLoraError, RuntimeError):
    """Another process of a multi-process run failed; this one stops too (the message names the rank)."""
