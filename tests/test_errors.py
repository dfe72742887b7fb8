"""errors.shown: quoting a user's value in a message costs little and says little, whatever the value."""

import time

import pytest

from alpaca_lora.errors import SHOWN_CHARS, shown


def test_a_billion_laughs_built_in_python_is_shown_without_expanding_it():
    laughs = ["lol"] * 9
    for _ in range(9):
        laughs = [laughs] * 9  # 9**10 strings if expanded; a plain repr would build gigabytes
    start = time.perf_counter()
    text = shown(laughs)
    assert time.perf_counter() - start < 0.5 and len(text) <= SHOWN_CHARS + 3


@pytest.mark.parametrize("value", ["x" * 10**6, 10**4000, list(range(10**5)), {str(i): i for i in range(10**4)},
                                   b"\x00" * 10**6, ("a",) * 10**5])
def test_huge_values_are_cut_and_long_text_says_its_length(value):
    text = shown(value)
    assert len(text) < 2 * SHOWN_CHARS
    if isinstance(value, (str, bytes)):
        assert f"({len(value):,} characters)" in text


def test_short_values_are_their_repr_and_a_broken_repr_is_the_type_name():
    class Broken:
        def __repr__(self):
            raise RuntimeError("no")

    assert shown("abc") == "'abc'" and shown(1e39) == "1e+39" and shown({"a": [1, 2]}) == "{'a': [1, 2]}"
    assert shown(Broken()).startswith("<Broken")
