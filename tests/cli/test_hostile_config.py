"""Hostile configuration: values from Python, YAML and JSON; fuzzed config files; a sweep of bad commands.

Every hostile value must give a config whose fields have their documented types (and which survives a
JSON and a YAML round trip), or a ``ConfigError`` with a bounded message. Every fuzzed config file must
load or raise ``ConfigError``, quickly. Every bad command line must exit with 2 (usage: a bad flag or
value) or 1 (a failure: a missing file or folder), with a short stderr and no traceback; none of them
loads a model or trains. The hypothesis runs are derandomized, so a run is reproducible and the suite
time is stable; ``pytest -s`` prints how many inputs each kind tried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import typing
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alpaca_lora.cli.main import main
from alpaca_lora.config import FinetuneConfig, field_names
from alpaca_lora.errors import ConfigError
from conftest import InputTally

PROPERTY = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HEAVY = settings(max_examples=30, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLI = settings(max_examples=60, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TIME_LIMIT_S = 5.0  # per input; the slowest honest case (a 1 MB file) parses in well under a second
MESSAGE_CHARS = 2000  # a message about one bad value
STDERR_CHARS = 6000  # the usage of `finetune` (1.5 KB) and one error line
FIELDS = field_names()
HINTS = typing.get_type_hints(FinetuneConfig)
_count = InputTally("hostile-config inputs tried")


# ---- what an accepted config must look like ----------------------------------------------------


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the documented type ``hint`` (bools are not ints; floats are finite)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (bool, int, str):
        return type(value) is hint
    if hint is float:
        return type(value) is int or (type(value) is float and math.isfinite(value))
    if origin is list:
        return type(value) is list and all(conforms(x, args[0]) for x in value)
    if origin is dict:
        return type(value) is dict and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    raise AssertionError(f"no rule for the type {hint}")


def check_accepted(cfg: FinetuneConfig, tmp_path: Path | None = None) -> None:
    """Every field has its documented type, and the config survives JSON (and YAML) round trips."""
    for f in dataclasses.fields(cfg):
        assert conforms(getattr(cfg, f.name), HINTS[f.name]), (f.name, getattr(cfg, f.name))
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict(), allow_nan=False))) == cfg
    if tmp_path is not None:
        assert FinetuneConfig.from_file(cfg.save(tmp_path / "round-trip.yaml")) == cfg


def accepted_or_config_error(build: typing.Callable[[], FinetuneConfig], *, limit: int = MESSAGE_CHARS,
                             tmp_path: Path | None = None) -> FinetuneConfig | None:
    """Run ``build``: a config that passes :func:`check_accepted`, or a ConfigError of at most ``limit`` chars."""
    start = time.perf_counter()
    try:
        cfg = build()
    except ConfigError as exc:
        message = str(exc)
        assert len(message) < limit, message[:500]
        assert "\n" not in message or message.startswith("invalid FinetuneConfig:"), message[:500]
        cfg = None
    else:
        check_accepted(cfg, tmp_path)
    assert time.perf_counter() - start < TIME_LIMIT_S
    return cfg


# ---- (a) hostile values from Python, YAML and JSON -------------------------------------------------

CUSTOM_TEMPLATE = {"prompt_input": "{instruction}\n{input}\nA:", "prompt_no_input": "{instruction}\nA:",
                   "response_split": "A:"}
PLAUSIBLE = [
    "nf4", "fp4", "int8", "cosine", "constant", "float32", "bfloat16", "onednn", "blas", "cpu", "cuda:1", "auto",
    "tensorboard", ["wandb", "none"], "all-linear", "attention", ["q_proj", "v_proj"], CUSTOM_TEMPLATE,
    "alpaca_short", {"question": "instruction"}, "checkpoint-5", 0.5, 0.0, 0.05, 1, 3, 8, 16, 64, 1e-4, 2.0, 200,
]
"""Valid values of some field, so the accepted path is walked too."""
SPECIAL = [
    math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e308, 10**9, 2**31, 2**32, 2**63, 10**400, -10**400, -1, 0,
    True, False, None, "", " ", "no", "yes", "true", "False", "none", "null", "nan", "inf", "1e-4", "8", "0x10",
    "\ud800", "cuda:", "cuda:-1", "x" * 100_000, [], [None], [""], ["q_proj", 5], {}, {"a": 1}, {1: "instruction"},
    {"q": "instruction", "a": "instruction"}, ("q_proj", "k_proj"), b"bytes", 3j, Fraction(1, 3), {"x"},
    {**CUSTOM_TEMPLATE, "response_split": "Z:"}, {"prompt_input": 5}, [[[]]], object(), Path("alpaca"),
]
"""NaN, infinities, huge ints, bools, text that looks like other types, lists, dicts, None, odd objects."""
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
HOSTILE = st.one_of(st.sampled_from(SPECIAL), st.sampled_from(PLAUSIBLE), json_like)


def _builds(field: str, value: Any) -> list[typing.Callable[[], FinetuneConfig]]:
    """The three ways a value reaches a config from Python: the constructor, replace() and from_dict()."""
    return [lambda: FinetuneConfig(**{field: value}), lambda: FinetuneConfig().replace(**{field: value}),
            lambda: FinetuneConfig.from_dict({field: value}, source="test")]


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_with_every_special_value(field):
    for value in SPECIAL + PLAUSIBLE:
        _count("python value, every field x special")
        for build in _builds(field, value):
            accepted_or_config_error(build)


@pytest.mark.parametrize("field", FIELDS)
@settings(max_examples=20, deadline=None, derandomize=True)
@given(value=HOSTILE)
def test_every_field_with_generated_values(field, value):
    _count("python value, every field x generated")
    for build in _builds(field, value):
        accepted_or_config_error(build)


@PROPERTY
@given(values=st.dictionaries(st.sampled_from(FIELDS), HOSTILE, max_size=6))
def test_python_values_several_fields_at_once(values):
    _count("python values, several fields")
    cfg = accepted_or_config_error(lambda: FinetuneConfig(**values), limit=MESSAGE_CHARS * max(1, len(values)))
    if cfg is None:
        try:
            FinetuneConfig(**values)
        except ConfigError as exc:
            assert all(len(line) < MESSAGE_CHARS for line in str(exc).splitlines())


@FUZZ
@given(field=st.sampled_from(FIELDS), value=st.one_of(json_like, st.sampled_from(
    [v for v in SPECIAL + PLAUSIBLE if isinstance(v, (type(None), bool, int, float, str, list, dict))])))
def test_yaml_and_json_files_of_hostile_values(tmp_path, field, value):
    _count("YAML/JSON file, dumped value")
    try:
        text = yaml.safe_dump({field: value})
    except yaml.YAMLError:  # a value YAML cannot write (a dict key YAML cannot represent)
        text = None
    if text is not None:
        (tmp_path / "cfg.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
        accepted_or_config_error(lambda: FinetuneConfig.from_file(tmp_path / "cfg.yaml"), tmp_path=tmp_path)
    try:
        data = json.dumps({field: value}).encode()  # NaN and Infinity as JSON's non-standard constants
    except (ValueError, TypeError):
        return
    (tmp_path / "cfg.json").write_bytes(data)
    accepted_or_config_error(lambda: FinetuneConfig.from_file(tmp_path / "cfg.json"), tmp_path=tmp_path)


YAML_SNIPPETS = [
    ".inf", "-.inf", ".nan", ".NaN", "~", "null", "yes", "no", "on", "off", "y", "n", "0x1F", "0o17", "017", "1_000",
    "1e999", "-1e999", "1e-4", "-0", "0.", ".5", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-13-45",
    "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]", "!!python/name:os.system",
    "!!python/object/apply:os.system ['true']", "*nope", "&a 5", "[1, [2, [3]]]", "{a: 1}", "{? [a] : 1}", "'text'",
    '"\\ud800"', '"\\x00"', '"\\x85"', "!!str 5", "!!float 1", "!!int '8'", "!!int 'x'", "!!float 'x'",
    "!!timestamp 'x'", "!!bool maybe", "!custom 1", "-", "[", "{", ": :", "|\n  block\n", ">\n  folded\n",
    "{<<: {a: 1}}", "'" + "x" * 5000 + "'", "9" * 5000, "%TAG", "---", "...", "? complex", "@reserved", "`tick",
    "[&a [1, *a]]", "\t5", "5 # comment", "'a' 'b'", "[1, 2,, 3]", "{a: 1, a: 2}", "!!null ''", "!!map []",
]
"""Raw YAML for one field's value: YAML 1.1 oddities, tags, aliases, broken syntax, huge scalars."""
JSON_SNIPPETS = [
    "NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, '"\\ud800"', '"\\u0000"', "true", "null",
    "1.0", "-0", "0.1e1", "[]", "{}", "[" * 100 + "]" * 100, '{"a": ' * 100 + "1" + "}" * 100, '"' + "x" * 5000 + '"',
    "[1, 2", "'single'", "tru", "01", "0x10", '"\\x41"', "[1,]", "{\"a\": 1,}", "1 2",
]
"""Raw JSON for one field's value: non-standard constants, huge numbers, escapes, deep nesting, broken syntax."""


@pytest.mark.parametrize("field", [*FIELDS, "lora_rank", "x" * 300])
def test_yaml_snippets_for_every_field(tmp_path, field):
    for snippet in YAML_SNIPPETS:
        _count("YAML file, every field x raw value")
        (tmp_path / "cfg.yml").write_text(f"{field}: {snippet}\n", encoding="utf-8")
        accepted_or_config_error(lambda: FinetuneConfig.from_file(tmp_path / "cfg.yml"), tmp_path=tmp_path)


@pytest.mark.parametrize("field", [*FIELDS, "lora_rank", ""])
def test_json_snippets_for_every_field(tmp_path, field):
    for snippet in JSON_SNIPPETS:
        _count("JSON file, every field x raw value")
        (tmp_path / "cfg.json").write_text(f'{{"{field}": {snippet}}}', encoding="utf-8")
        accepted_or_config_error(lambda: FinetuneConfig.from_file(tmp_path / "cfg.json"), tmp_path=tmp_path)


# ---- (b) fuzzed config files -----------------------------------------------------------------------

VALID = FinetuneConfig(batch_size=16, micro_batch_size=2, learning_rate=1e-5, num_epochs=1.5, max_steps=7, lora_r=8,
                       lora_target_modules=["q_proj", "v_proj"], quantization=None, val_set_size=0.1,
                       template=CUSTOM_TEMPLATE, column_map={"question": "instruction"}, report_to=["tensorboard"])
SUFFIXES = [".yaml", ".json"]


def _valid_bytes(suffix: str) -> bytes:
    data = VALID.to_dict()
    return (yaml.safe_dump(data, sort_keys=False) if suffix == ".yaml" else json.dumps(data, indent=2)).encode()


def _load_file(tmp_path: Path, data: bytes, suffix: str, kind: str) -> None:
    """A fuzzed file: a valid config or a ConfigError naming the file, quickly, each line bounded."""
    _count(kind)
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        cfg = FinetuneConfig.from_file(path)
    except ConfigError as exc:
        message = str(exc)
        assert str(path) in message or message.startswith("invalid FinetuneConfig"), message[:500]
        assert all(len(line) < MESSAGE_CHARS for line in message.splitlines()) and len(message) < 30_000
    else:
        check_accepted(cfg)
    assert time.perf_counter() - start < TIME_LIMIT_S, f"{kind}: {time.perf_counter() - start:.1f} s"


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=600))
def test_random_bytes(tmp_path, suffix, data):
    _load_file(tmp_path, data, suffix, "file: random bytes")


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), cut=st.floats(0, 1))
def test_truncated_files(tmp_path, suffix, cut):
    data = _valid_bytes(suffix)
    _load_file(tmp_path, data[: int(cut * len(data))], suffix, "file: truncated")


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), seed=st.integers(0, 2**32 - 1), edits=st.integers(1, 8))
def test_mutated_files(tmp_path, suffix, seed, edits):
    rng = random.Random(seed)
    data = bytearray(_valid_bytes(suffix))
    junk = [b"\x00", b"\xff", b"\xe9", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\r", b"\t", b"&a ", b"*a", b"!!", b"[",
            b"]", b"{", b"}", b":", b"-", b"'", b'"', b"#", b"\n", b"NaN", b".inf", b"9" * 400, b"~", b"<<: *a\n"]
    for _ in range(edits):
        at = rng.randrange(len(data) + 1)
        action = rng.randrange(4)
        if action == 0:
            data[at:at] = rng.choice(junk)
        elif action == 1 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif action == 2:
            del data[at: at + rng.randint(1, 20)]
        else:
            line = data[at: at + rng.randint(1, 80)]
            data[at:at] = line * rng.randint(1, 50)
    _load_file(tmp_path, bytes(data), suffix, "file: mutated")


@HEAVY
@given(suffix=st.sampled_from(SUFFIXES), depth=st.integers(1, 50_000),
       opener=st.sampled_from(["[", "{a: ", "- ", "{\"a\": "]), closed=st.booleans())
def test_deeply_nested_files(tmp_path, suffix, depth, opener, closed):
    closer = {"[": "]", "{a: ": "}", "- ": "", "{\"a\": ": "}"}[opener]
    body = opener * depth + "1" + (closer * depth if closed else "")
    if opener == "- ":  # block sequences nest by indentation
        body = "\n".join("  " * i + "-" for i in range(min(depth, 5000))) + " 1"
    text = f"template: {body}\n" if suffix == ".yaml" else f'{{"template": {body}}}'
    _load_file(tmp_path, text.encode(), suffix, "file: deep nesting")


@HEAVY
@given(suffix=st.sampled_from(SUFFIXES), key_len=st.integers(1, 2**20), keys=st.integers(0, 12_000))
def test_huge_keys_and_many_keys(tmp_path, suffix, key_len, keys):
    data = {"k" * key_len: 1, **{f"lora_r{i}": i for i in range(keys)}}
    raw = json.dumps(data).encode()  # JSON is YAML too: a flow mapping

    _load_file(tmp_path, raw, suffix, "file: huge/many keys")


@FUZZ
@given(levels=st.integers(1, 12), width=st.integers(2, 12), field=st.sampled_from(["template", "column_map", "x"]))
def test_alias_bombs_of_every_shape(tmp_path, levels, width, field):
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    text = "\n".join(lines) + f"\n{field}: *a{levels - 1}\n"
    _load_file(tmp_path, text.encode(), ".yaml", "file: alias bomb")


@pytest.mark.parametrize("name", ["folder", "empty", "fifo-like", "nul-path"])
def test_files_that_are_not_files(tmp_path, name):
    _count("file: not a file")
    if name == "folder":
        path: Any = tmp_path
    elif name == "empty":
        path = tmp_path / "empty.yaml"
        path.write_bytes(b"")
    elif name == "fifo-like":
        path = "/dev/zero"  # endless: must be refused after MAX_CONFIG_BYTES, not read forever
    else:
        path = str(tmp_path / "a\x00b.yaml")
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_file(path)
    assert len(str(info.value)) < MESSAGE_CHARS


# ---- (c) the command line -------------------------------------------------------------------------


def run(*args: Any) -> int:
    """Run the command in this process; argparse's own errors come back as their exit status."""
    try:
        return main(["--quiet", *map(str, args)])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Files and folders the sweep points at; nothing here is a model, so nothing loads or trains."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a folder\n")
    (root / "exists.gguf").write_text("an earlier export\n")
    (root / "data.json").write_text(json.dumps([{"instruction": "Add 2 and 3.", "output": "5"}]))
    (root / "notes.jsonl").write_text(json.dumps({"text": "my notes"}) + "\n")
    (root / "bad.json").write_text('[{"instruction": "x", "output": "y"},')
    (root / "list.yaml").write_text("- 1\n")
    (root / "unknown.yaml").write_text("lora_rank: 8\n")
    (root / "latin.yaml").write_bytes("report_to: 'café'\n".encode("latin-1"))
    (root / "nan.json").write_text('{"learning_rate": NaN}')
    lines = ["a: &a [" + ", ".join(['"x"'] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (root / "bomb.yaml").write_text("\n".join(lines) + "\ntemplate: *i\n")
    return root


def _sweep() -> list[tuple[str, tuple[str, ...], int]]:
    """(name, arguments with {r} for the sweep folder, expected exit status)."""
    ft = ("finetune", "--base_model", "{r}/empty", "--data")
    est = ("estimate", "--base_model", "{r}/empty")
    cases = [
        ("top level: no command", (), 2), ("top level: unknown command", ("bogus",), 2),
        ("top level: huge command", ("c" * 100_000,), 2), ("top level: only --debug", ("--debug",), 2),
        ("top level: help", ("--help", "x"), 0),
        ("finetune: no args", ("finetune",), 2), ("finetune: no data", ("finetune", "--base_model", "m"), 2),
        ("finetune: unknown flag", (*ft, "{r}/data.json", "--lora_rank", "8"), 2),
        ("finetune: dashed typo", (*ft, "{r}/data.json", "--micro-batchsize", "2"), 2),
        ("finetune: stray positional", (*ft, "{r}/data.json", "extra"), 2),
        ("finetune: int text", (*ft, "{r}/data.json", "--lora_r", "abc"), 2),
        ("finetune: int exponent", (*ft, "{r}/data.json", "--lora_r", "1e3"), 2),
        ("finetune: int huge", (*ft, "{r}/data.json", "--lora_r", "9" * 5000), 2),
        ("finetune: lora_r too big", (*ft, "{r}/data.json", "--lora_r", "1000000000"), 2),
        ("finetune: nan epochs", (*ft, "{r}/data.json", "--num_epochs", "nan"), 2),
        ("finetune: inf lr", (*ft, "{r}/data.json", "--learning_rate", "inf"), 2),
        ("finetune: bool maybe", (*ft, "{r}/data.json", "--train_on_inputs", "maybe"), 2),
        ("finetune: seed negative", (*ft, "{r}/data.json", "--seed", "-1"), 2),
        ("finetune: device tpu", (*ft, "{r}/data.json", "--device", "tpu"), 2),
        ("finetune: empty resume", (*ft, "{r}/data.json", "--resume_from_checkpoint", ""), 2),
        ("finetune: unknown template", (*ft, "{r}/data.json", "--template", "nope", "--output_dir", "{r}/o"), 2),
        ("finetune: config missing", (*ft, "{r}/data.json", "--config", "{r}/missing.yaml"), 2),
        ("finetune: config folder", (*ft, "{r}/data.json", "--config", "{r}/empty"), 2),
        ("finetune: config empty path", (*ft, "{r}/data.json", "--config", ""), 2),
        ("finetune: config bomb", (*ft, "{r}/data.json", "--config", "{r}/bomb.yaml"), 2),
        ("finetune: config latin-1", (*ft, "{r}/data.json", "--config", "{r}/latin.yaml"), 2),
        ("finetune: config list", (*ft, "{r}/data.json", "--config", "{r}/list.yaml"), 2),
        ("finetune: config unknown key", (*ft, "{r}/data.json", "--config", "{r}/unknown.yaml"), 2),
        ("finetune: config NaN", (*ft, "{r}/data.json", "--config", "{r}/nan.json"), 2),
        ("finetune: data missing", (*ft, "{r}/missing.json", "--output_dir", "{r}/o"), 1),
        ("finetune: data folder", (*ft, "{r}/empty", "--output_dir", "{r}/o"), 1),
        ("finetune: data broken", (*ft, "{r}/bad.json", "--output_dir", "{r}/o"), 1),
        ("finetune: data unknown suffix", (*ft, "{r}/file.txt", "--output_dir", "{r}/o"), 1),
        ("finetune: output_dir a file", (*ft, "{r}/data.json", "--output_dir", "{r}/file.txt"), 2),
        ("finetune: base a file", ("finetune", "--base_model", "{r}/file.txt", "--data", "{r}/data.json",
                                   "--output_dir", "{r}/o"), 1),
        ("finetune: base empty folder", (*ft, "{r}/data.json", "--output_dir", "{r}/o"), 1),
        ("merge: no args", ("merge",), 2), ("merge: one arg", ("merge", "{r}/empty"), 2),
        ("merge: adapter missing", ("merge", "{r}/missing", "{r}/m"), 1),
        ("merge: adapter a file", ("merge", "{r}/file.txt", "{r}/m"), 1),
        ("merge: adapter empty", ("merge", "{r}/empty", "{r}/m"), 1),
        ("merge: dtype float8", ("merge", "{r}/empty", "{r}/m", "--dtype", "float8"), 2),
        ("merge: shard size lots", ("merge", "{r}/empty", "{r}/m", "--max_shard_size", "lots"), 2),
        ("merge: huge shard size", ("merge", "{r}/empty", "{r}/m", "--max_shard_size", "9" * 100_000), 2),
        ("merge: verify maybe", ("merge", "{r}/empty", "{r}/m", "--verify", "maybe"), 2),
        ("merge: unknown flag", ("merge", "{r}/empty", "{r}/m", "--dtyp", "float32"), 2),
        ("eval: no args", ("eval",), 2), ("eval: one arg", ("eval", "{r}/empty"), 2),
        ("eval: model missing", ("eval", "{r}/missing", "{r}/data.json"), 1),
        ("eval: model empty", ("eval", "{r}/empty", "{r}/data.json"), 1),
        ("eval: data missing", ("eval", "{r}/empty", "{r}/missing.json"), 1),
        ("eval: data broken", ("eval", "{r}/empty", "{r}/bad.json"), 1),
        ("eval: unknown metric", ("eval", "{r}/empty", "{r}/data.json", "--metrics", "blue"), 2),
        ("eval: batch size zero", ("eval", "{r}/empty", "{r}/data.json", "--batch_size", "0"), 2),
        ("eval: batch size text", ("eval", "{r}/empty", "{r}/data.json", "--batch_size", "many"), 2),
        ("eval: huge limit", ("eval", "{r}/empty", "{r}/data.json", "--limit", "9" * 1000), 1),
        ("export-gguf: no args", ("export-gguf",), 2), ("export-gguf: one arg", ("export-gguf", "{r}/empty"), 2),
        ("export-gguf: folder missing", ("export-gguf", "{r}/missing", "{r}/m.gguf"), 1),
        ("export-gguf: folder a file", ("export-gguf", "{r}/file.txt", "{r}/m.gguf"), 1),
        ("export-gguf: folder empty", ("export-gguf", "{r}/empty", "{r}/m.gguf"), 1),
        ("export-gguf: not .gguf", ("export-gguf", "{r}/empty", "{r}/m.bin"), 2),
        ("export-gguf: output exists", ("export-gguf", "{r}/empty", "{r}/exists.gguf"), 2),
        ("export-gguf: quantization q3", ("export-gguf", "{r}/empty", "{r}/m.gguf", "--quantization", "q3"), 2),
        ("export-gguf: overwrite maybe", ("export-gguf", "{r}/empty", "{r}/m.gguf", "--overwrite", "maybe"), 2),
        ("export-gguf: adapter_only on a folder", ("export-gguf", "{r}/empty", "{r}/m.gguf", "--adapter_only"), 1),
        ("export-gguf: output in a missing folder", ("export-gguf", "{r}/empty", "{r}/no/m.gguf"), 2),
        ("generate: no args", ("generate",), 2), ("generate: no instruction", ("generate", "{r}/empty"), 2),
        ("generate: folder missing", ("generate", "{r}/missing", "Hi."), 1),
        ("generate: folder a file", ("generate", "{r}/file.txt", "Hi."), 1),
        ("generate: folder empty", ("generate", "{r}/empty", "Hi."), 1),
        ("generate: zero tokens", ("generate", "{r}/empty", "Hi.", "--max_new_tokens", "0"), 2),
        ("generate: hot temperature", ("generate", "{r}/empty", "Hi.", "--temperature", "hot"), 2),
        ("generate: temperature without sampling", ("generate", "{r}/empty", "Hi.", "--temperature", "0.7"), 2),
        ("generate: top_p 2", ("generate", "{r}/empty", "Hi.", "--do_sample", "--top_p", "2"), 2),
        ("generate: beams -1", ("generate", "{r}/empty", "Hi.", "--num_beams", "-1"), 2),
        ("generate: stream two", ("generate", "{r}/empty", "A.", "B.", "--stream"), 2),
        ("push: no args", ("push",), 2), ("push: token flag", ("push", "{r}/empty", "me/x", "--token", "t"), 2),
        ("push: folder missing", ("push", "{r}/missing", "me/x", "--dry_run"), 1),
        ("push: folder a file", ("push", "{r}/file.txt", "me/x", "--dry_run"), 1),
        ("push: folder empty", ("push", "{r}/empty", "me/x", "--dry_run"), 1),
        ("push: bad repo id", ("push", "{r}/empty", "not a repo!!", "--dry_run"), 2),
        ("push: private maybe", ("push", "{r}/empty", "me/x", "--private", "maybe"), 2),
        ("inspect: no args", ("inspect",), 2),
        ("inspect: data missing", ("inspect", "{r}/missing.json", "--base_model", "{r}/empty"), 1),
        ("inspect: data folder", ("inspect", "{r}/empty", "--base_model", "{r}/empty"), 1),
        ("inspect: base a file", ("inspect", "{r}/data.json", "--base_model", "{r}/file.txt"), 1),
        ("inspect: config bomb", ("inspect", "{r}/data.json", "--base_model", "{r}/empty", "--config",
                                  "{r}/bomb.yaml"), 2),
        ("inspect: cutoff text", ("inspect", "{r}/data.json", "--cutoff_len", "long"), 2),
        ("estimate: base missing", ("estimate", "--base_model", "{r}/missing"), 1),
        ("estimate: base a file", ("estimate", "--base_model", "{r}/file.txt"), 1),
        ("estimate: base empty", est, 1),
        ("estimate: gpu memory lots", (*est, "--gpu_memory", "lots"), 2),
        ("estimate: micro batch 0", (*est, "--micro_batch_size", "0"), 2),
        ("estimate: config bomb", (*est, "--config", "{r}/bomb.yaml"), 2),
        ("estimate: quantization nf5", (*est, "--quantization", "nf5"), 2),
        ("cache: unknown flag", ("cache", "--cleer"), 2),
        ("cache: dir a file", ("cache", "--dir", "{r}/file.txt"), 0),  # nothing cached there: 0 entries
        ("cache: clear a missing dir", ("cache", "--dir", "{r}/missing", "--clear"), 0),
        ("self-instruct: no args", ("self-instruct",), 2),
        ("self-instruct: seeds missing", ("self-instruct", "{r}/missing.jsonl", "{r}/empty", "{r}/o.jsonl"), 1),
        ("self-instruct: seeds broken", ("self-instruct", "{r}/bad.json", "{r}/empty", "{r}/o.jsonl"), 1),
        ("self-instruct: teacher missing", ("self-instruct", "{r}/data.json", "{r}/missing", "{r}/o.jsonl"), 2),
        ("self-instruct: teacher a file", ("self-instruct", "{r}/data.json", "{r}/file.txt", "{r}/o.jsonl"), 2),
        ("self-instruct: teacher unreachable", ("self-instruct", "{r}/data.json", "http://127.0.0.1:9/v1",
                                                "{r}/o.jsonl"), 1),
        ("self-instruct: output not jsonl", ("self-instruct", "{r}/data.json", "{r}/empty", "{r}/o.txt"), 2),
        ("self-instruct: output a folder", ("self-instruct", "{r}/data.json", "{r}/empty", "{r}/empty"), 2),
        ("self-instruct: output not records", ("self-instruct", "{r}/data.json", "{r}/empty", "{r}/notes.jsonl"), 1),
        ("self-instruct: zero wanted", ("self-instruct", "{r}/data.json", "{r}/empty", "{r}/o.jsonl",
                                        "--num_instructions", "0"), 2),
        ("self-instruct: hot temperature", ("self-instruct", "{r}/data.json", "{r}/empty", "{r}/o.jsonl",
                                            "--temperature", "hot"), 2),
        ("self-instruct: method magic", ("self-instruct", "{r}/data.json", "{r}/empty", "{r}/o.jsonl",
                                         "--method", "magic"), 2),
        ("self-instruct: blacklist text", ("self-instruct", "{r}/data.json", "{r}/empty", "{r}/o.jsonl",
                                           "--blacklist", "image"), 2),
        ("self-instruct: threshold 2", ("self-instruct", "{r}/data.json", "{r}/empty", "{r}/o.jsonl",
                                        "--similarity_threshold", "2"), 2),
        ("ui: folder missing", ("ui", "{r}/missing"), 2),
        ("ui: port text", ("ui", "{r}/empty", "--port", "http"), 2),
        ("ui: port 0", ("ui", "{r}/empty", "--port", "0"), 2),
        ("ui: unknown flag", ("ui", "{r}/empty", "--shared"), 2),
        ("demo: budget huge", ("demo", "--budget", "huge", "--output_dir", "{r}/demo"), 2),
        ("demo: n_train -1", ("demo", "--n_train", "-1", "--output_dir", "{r}/demo"), 2),
        ("demo: max_steps 0", ("demo", "--max_steps", "0", "--output_dir", "{r}/demo"), 2),
        ("demo: dtype fp8", ("demo", "--compute_dtype", "fp8", "--output_dir", "{r}/demo"), 2),
        ("demo: lr nan", ("demo", "--learning_rate", "nan", "--output_dir", "{r}/demo"), 2),
        ("demo: unknown flag", ("demo", "--budgets", "quick"), 2),
        ("demo: base missing", ("demo", "--base_model", "{r}/missing", "--output_dir", "{r}/demo", "--n_train", "16",
                                "--n_test", "8"), 1),
    ]
    return cases


SWEEP = _sweep()
KNOWN_GAPS = [
    pytest.param("merge: base name too long", ("merge", "{r}/empty", "{r}/m", "--base_model", "b" * 100_000), 2,
                 id="merge: base name too long"),
]
"""Invocations that once ended in a bare library exception (an OSError for a name too long for a path)."""


@pytest.mark.parametrize(("name", "args", "expected"), [*SWEEP, *KNOWN_GAPS],
                         ids=[c[0] for c in SWEEP] + [p.id for p in KNOWN_GAPS])
def test_cli_sweep(places, capsys, name, args, expected):
    _count(f"cli: {name.split(':')[0]}")
    start = time.perf_counter()
    code = run(*(a.format(r=places) for a in args))
    out, err = capsys.readouterr()
    assert code == expected, err[-2000:]
    assert "Traceback" not in err and len(err) < STDERR_CHARS and time.perf_counter() - start < 30
    if expected:
        last = err.strip().splitlines()[-1]
        assert last.startswith("alpaca-lora"), err[-500:]  # ends with the one-line cause
    if expected == 1:  # a failure is one of our errors, not a bare library exception
        assert not re.match(r"[A-Z]\w*(Error|Exception): ", last.split(": error: ", 1)[1]), last


FLAG_VALUES = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e999", "9" * 5000, "", "none", "null", "true", "no",
                     "[]", "{}", '["q_proj", 5]', '{"a": "instruction"}', "[" * 10_000, "x" * 100_000, "\ud800",
                     "--", "-", "=", "1.5", "1e-4", "cuda:0", "all-linear"]),
    st.text(max_size=30),
)


@CLI
@given(field=st.sampled_from(FIELDS), value=FLAG_VALUES, dashed=st.booleans(), inline=st.booleans())
def test_cli_flag_values_for_every_field(places, capsys, field, value, dashed, inline):
    """Any value of any config flag: a usage error (2), or accepted and then the empty base fails (1)."""
    _count("cli: flag value")
    flag = "--" + (field.replace("_", "-") if dashed else field)
    args = [f"{flag}={value}"] if inline else [flag, value]
    code = run("estimate", "--base_model", places / "empty", *args)
    _, err = capsys.readouterr()
    assert code in (1, 2), err[-2000:]
    assert "Traceback" not in err and len(err) < STDERR_CHARS


# ---- Ctrl-C while the command imports torch -------------------------------------------------------


def _command() -> list[str]:
    script = shutil.which("alpaca-lora", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                os.environ.get("PATH", "")]))
    return [script] if script else [sys.executable, "-m", "alpaca_lora"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_at_torch_import() -> tuple[int, list[str]]:
    """Run ``estimate --help``, send SIGINT when the first torch module is imported; (status, stderr lines)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    # The command gets the default SIGINT disposition: a suite started in the background (`cmd &` in a
    # script) ignores SIGINT, and an ignored signal stays ignored in every process it starts.
    proc = subprocess.Popen([*_command(), "estimate", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True, preexec_fn=_default_sigint)
    assert proc.stderr is not None
    with contextlib.suppress(OSError):  # a one-page pipe: the command cannot run far ahead of what is read
        fcntl.fcntl(proc.stderr.fileno(), 1031, 4096)  # F_SETPIPE_SZ (Linux)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip().startswith("torch"):
            proc.send_signal(signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=120)
    return proc.returncode, [ln for ln in "".join(seen).splitlines() + rest.splitlines()
                             if not ln.startswith("import time:")]


def test_ctrl_c_while_importing_exits_130_in_one_line():
    """SIGINT once the command has begun importing torch: status 130 and one line, no traceback.

    ``PYTHONPROFILEIMPORTTIME`` makes the interpreter print a line as each module import ends, so the
    signal is sent when the first torch module is imported, whatever the machine's speed. On a loaded
    machine the command can still finish before the signal lands (status 0, nothing to test): such a
    run is repeated, up to five times.
    """
    _count("cli: Ctrl-C at import")
    for _ in range(5):
        code, err = _interrupt_at_torch_import()
        if code != 0:
            break
    text = "\n".join(err)
    assert code == 130, text[-2000:]
    assert "Traceback" not in text and err == ["alpaca-lora: interrupted"], text[-2000:]


def test_the_sweep_covers_every_subcommand():
    from alpaca_lora.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {c[0].split(":")[0] for c in SWEEP} >= {*sub.choices, "top level"}
