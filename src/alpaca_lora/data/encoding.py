"""Text that UTF-8 cannot encode: where it is, and a message saying how to fix it."""

from __future__ import annotations


def unencodable_at(text: str) -> int | None:
    """Index of the first character of ``text`` that UTF-8 cannot encode (a lone surrogate), or None.

    Undecodable bytes of a file become such surrogates when read; a Python string may hold one too.
    A tokenizer fails on them deep inside, so records holding one are refused here, by name.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def surrogate_problem(text: str, at: int) -> str:
    """Why ``text`` cannot be encoded, given the index of its first lone surrogate."""
    code = ord(text[at])
    if 0xDC80 <= code <= 0xDCFF:  # what a file's undecodable byte becomes (surrogateescape)
        return (f"holds bytes that are not valid UTF-8 (byte {code - 0xDC00:#04x} at character {at}); save the data "
                "as UTF-8")
    return (f"holds a lone surrogate ({text[at]!a} at character {at}), which cannot be encoded as UTF-8 and which no "
            "tokenizer reads; fix the text (e.g. text.encode('utf-8', 'replace').decode())")
