"""Hostile adapters and generate() arguments: seeded damage to a trained adapter folder, property tests.

Every damaged adapter folder given to ``generate`` and ``merge`` must either work (a string; a merged
folder whose weights are all finite and complete) or raise one of our own errors (``AlpacaLoraError``),
quickly: never another exception, never NaN weights in an export, never an answer from NaN weights.
The damage is seeded (``random.Random(seed)``) and the hypothesis runs derandomized, so every run
tries the same inputs; ``_count`` records how many of each kind (printed in pytest's summary).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from alpaca_lora import AlpacaLoraError, ConfigError, ModelError, generate
from alpaca_lora.export.merge import merge
from alpaca_lora.train.recipe import finetune
from conftest import SHORT_RECORDS, InputTally, save_tiny_llama

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TIME_LIMIT_S = 20.0  # per call; a refusal takes milliseconds, a load of the tiny base and peft about a second
WEIGHTS = "adapter_model.safetensors"
_count = InputTally("hostile-adapter inputs tried")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter folder from finetune (2 steps, full precision): the folder users hand to generate/merge."""
    out = tmp_path_factory.mktemp("hostile-adapter") / "adapter"
    finetune(tiny_model_dir, SHORT_RECORDS[:4], out, max_steps=2, batch_size=4, micro_batch_size=4, val_set_size=0,
             learning_rate=3e-2, lora_dropout=0.0, gradient_checkpointing=False, cutoff_len=64, quantization=None,
             compute_dtype="float32", warmup_ratio=0.0)
    return out


# ---- seeded damage -----------------------------------------------------------------------------------

JSON_VALUES = [None, True, False, 0, -1, 1, 2, 4, 16, 10**20, 1.5, -0.5, float("nan"), float("inf"), "", "x",
               "LORA", "q_proj", "all-linear", ".*", "(", "none", [], ["q_proj"], ["nope"], [1], ["q_proj", 5],
               {}, {"a": 1}, {".*": 4}, {"q_proj": "x"}, [[0, 100]]]
DTYPES = ["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X9", ""]


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _tensor_names(folder: Path) -> list[str]:
    return sorted(k for k in _header(folder / WEIGHTS)[0] if k != "__metadata__")


def _json_file(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _dump(folder: Path, name: str, value: object) -> None:
    (folder / name).write_text(json.dumps(value))  # NaN/Infinity are written as JSON's non-standard literals


def damage_truncate(rng: random.Random, folder: Path) -> set[str]:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: rng.randrange(len(data))])
    return set()


def damage_flip_header(rng: random.Random, folder: Path) -> set[str]:
    data = bytearray((folder / WEIGHTS).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(8 + n)] ^= 1 << rng.randrange(8)
    (folder / WEIGHTS).write_bytes(bytes(data))
    return set()


def damage_flip_data(rng: random.Random, folder: Path) -> set[str]:
    """Flip bits in tensor data: may make NaN/inf (must be refused) or just other numbers (may load)."""
    data = bytearray((folder / WEIGHTS).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    for _ in range(rng.randint(1, 6)):
        data[rng.randrange(8 + n, len(data))] ^= 1 << rng.randrange(8)
    (folder / WEIGHTS).write_bytes(bytes(data))
    return set()


def damage_header_fields(rng: random.Random, folder: Path) -> set[str]:
    """Change a declared dtype, shape or byte range in the header (the data stays as it was)."""
    header, data = _header(folder / WEIGHTS)
    name = rng.choice([k for k in header if k != "__metadata__"])
    meta = header[name]
    what = rng.choice(["dtype", "shape", "offsets", "meta"])
    if what == "dtype":
        meta["dtype"] = rng.choice(DTYPES)
    elif what == "shape":
        meta["shape"] = rng.choice([[], [0], [meta["shape"][1], meta["shape"][0]], [math.prod(meta["shape"])],
                                    [*meta["shape"], 1], [-1, 4], ["a"], None, [2**40, 2**40]])
    elif what == "offsets":
        begin, end = meta["data_offsets"]
        meta["data_offsets"] = rng.choice([[end, begin], [begin, end + 8], [0, 4], [-4, end], [begin], None])
    else:
        header[name] = rng.choice(JSON_VALUES)
    _write_header(folder / WEIGHTS, header, data)
    return set()


def damage_tensor_values(rng: random.Random, folder: Path) -> set[str]:
    """Replace a tensor by NaN/inf/huge values, zeros, another shape, dtype or rank."""
    state = load_file(str(folder / WEIGHTS))
    name = rng.choice(sorted(state))
    t = state[name]
    how = rng.choice(["nan", "inf", "-inf", "one nan", "zeros", "huge", "transposed", "flat", "extra dim", "fp16",
                      "bf16", "wider", "narrower", "empty"])
    flags = {"non-finite"} if how in ("nan", "inf", "-inf", "one nan") else set()
    if how in ("nan", "inf", "-inf"):
        state[name] = torch.full_like(t, float(how))
    elif how == "one nan":
        state[name] = t.clone().reshape(-1).index_fill_(0, torch.tensor([rng.randrange(t.numel())]),
                                                         float("nan")).reshape(t.shape)
    elif how == "zeros":
        state[name] = torch.zeros_like(t)
    elif how == "huge":
        state[name] = t * 1e30
    elif how == "transposed":
        state[name] = t.T.contiguous()
    elif how == "flat":
        state[name] = t.reshape(-1).contiguous()
    elif how == "extra dim":
        state[name] = t.unsqueeze(0).contiguous()
    elif how in ("fp16", "bf16"):
        state[name] = t.to(torch.float16 if how == "fp16" else torch.bfloat16)
    elif how == "wider":
        state[name] = torch.cat([t, t], dim=rng.randrange(2)).contiguous()
    elif how == "narrower":
        state[name] = t[: max(1, t.shape[0] // 2)].contiguous()
    else:
        state[name] = torch.empty(0)
    save_file(state, str(folder / WEIGHTS))
    return flags


def damage_tensor_names(rng: random.Random, folder: Path) -> set[str]:
    """Rename, drop, add or duplicate tensors."""
    state = load_file(str(folder / WEIGHTS))
    name = rng.choice(sorted(state))
    how = rng.choice(["rename module", "drop prefix", "adapter name", "drop", "add", "duplicate to layer 9",
                      "swap A and B"])
    t = state.pop(name) if how != "add" else state[name]
    if how == "rename module":
        state[name.replace("q_proj", "gate_proj").replace("k_proj", "up_proj").replace("v_proj", "x_proj")
              .replace("o_proj", "down_proj")] = t
    elif how == "drop prefix":
        state[name.removeprefix("base_model.model.")] = t
    elif how == "adapter name":
        state[name.replace(".weight", ".default.weight")] = t
    elif how == "add":
        state["base_model.model.model.norm.lora_A.weight"] = torch.ones(2, 64)
    elif how == "duplicate to layer 9":
        state[name] = t
        state[name.replace("layers.0.", "layers.9.").replace("layers.1.", "layers.9.")] = t.clone()
    elif how == "swap A and B":
        partner = name.replace("lora_A", "lora_X").replace("lora_B", "lora_A").replace("lora_X", "lora_B")
        state[partner], state[name] = t, state[partner]
    if state:
        save_file(state, str(folder / WEIGHTS))
    else:
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", 8) + b"{}      ")
    return set()


def damage_untrained(rng: random.Random, folder: Path) -> set[str]:
    """Every lora_B zero: an adapter saved at step 0. Must work, with a warning."""
    state = load_file(str(folder / WEIGHTS))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}, str(folder / WEIGHTS))
    return {"untrained"}


def damage_config_field(rng: random.Random, folder: Path) -> set[str]:
    """Set one or two adapter_config.json fields (or new ones) to random JSON values, or delete them."""
    config = _json_file(folder, "adapter_config.json")
    for _ in range(rng.randint(1, 2)):
        key = rng.choice([*sorted(config), "r", "lora_alpha", "target_modules", "peft_type", "rank_pattern",
                          "alpha_pattern", "unknown_field"])
        if rng.random() < 0.15:
            config.pop(key, None)
        else:
            config[key] = rng.choice(JSON_VALUES)
    _dump(folder, "adapter_config.json", config)
    return set()


def damage_config_file(rng: random.Random, folder: Path) -> set[str]:
    """Replace adapter_config.json by another JSON value, random bytes or a truncation."""
    how = rng.choice(["value", "bytes", "truncated", "empty"])
    path = folder / "adapter_config.json"
    if how == "value":
        _dump(folder, "adapter_config.json", rng.choice(JSON_VALUES))
    elif how == "bytes":
        path.write_bytes(rng.randbytes(rng.randint(1, 200)))
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
    else:
        path.write_bytes(b"")
    return set()


def damage_fingerprint(rng: random.Random, folder: Path) -> set[str]:
    """Corrupt fingerprint.json: another top-level value, or random values for its fields."""
    fp = _json_file(folder, "fingerprint.json")
    how = rng.choice(["value", "base_model", "base field", "data"])
    if how == "value":
        fp = rng.choice(JSON_VALUES)
    elif how == "base_model":
        fp["base_model"] = rng.choice(JSON_VALUES)
    elif how == "base field":
        fp["base_model"][rng.choice(sorted(fp["base_model"]))] = rng.choice(JSON_VALUES)
    else:
        fp["data"] = rng.choice(JSON_VALUES)
    _dump(folder, "fingerprint.json", fp)
    return set()


def damage_template(rng: random.Random, folder: Path) -> set[str]:
    """Corrupt prompt_template.json: another value, a field of another type, a field dropped."""
    template = _json_file(folder, "prompt_template.json")
    how = rng.choice(["value", "field", "drop"])
    if how == "value":
        template = rng.choice(JSON_VALUES)
    elif how == "field":
        template[rng.choice(sorted(template))] = rng.choice(JSON_VALUES)
    else:
        template.pop(rng.choice(sorted(template)))
    _dump(folder, "prompt_template.json", template)
    return set()


def damage_delete(rng: random.Random, folder: Path) -> set[str]:
    """Delete one file of the folder (weights, config, records, template, tokenizer files)."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    (folder / rng.choice(files)).unlink()
    return set()


def damage_run_records(rng: random.Random, folder: Path) -> set[str]:
    """Corrupt the run's own records (finetune_config.json, train_results.json): they must not break a load."""
    name = rng.choice(["finetune_config.json", "train_results.json"])
    if rng.random() < 0.5:
        _dump(folder, name, rng.choice(JSON_VALUES))
    else:
        record = _json_file(folder, name)
        record[rng.choice(sorted(record))] = rng.choice(JSON_VALUES)
        _dump(folder, name, record)
    return set()


DAMAGE = {f.__name__.removeprefix("damage_"): f for f in (
    damage_truncate, damage_flip_header, damage_flip_data, damage_header_fields, damage_tensor_values,
    damage_tensor_names, damage_untrained, damage_config_field, damage_config_file, damage_fingerprint,
    damage_template, damage_delete, damage_run_records)}
SEEDS = {"config_field": 24, "tensor_values": 12, "tensor_names": 10, "header_fields": 10}
"""Seeds per kind of damage (6 for kinds not named): more where the damage has more forms."""
CASES = [(kind, seed) for kind in DAMAGE for seed in range(SEEDS.get(kind, 6))]


def _damaged_copy(trained: Path, dest: Path, kind: str, seed: int) -> set[str]:
    shutil.copytree(trained, dest, ignore=shutil.ignore_patterns("checkpoint-*", "loss.png", "metrics.jsonl"))
    return DAMAGE[kind](random.Random(f"{kind}-{seed}"), dest)


def _merged_is_sound(out: Path, base: Path) -> None:
    weights = load_file(str(out / "model.safetensors"))
    reference = load_file(str(base / "model.safetensors"))
    assert sorted(weights) == sorted(reference), "the export is missing tensors"
    for name, t in weights.items():
        assert t.shape == reference[name].shape and t.numel() > 0, name
        assert bool(torch.isfinite(t).all()), f"{name} holds NaN or inf in the export"


def _run(call, kind: str, flags: set[str]) -> object:
    """Run ``call``; it may work or raise our error, quickly; a non-finite adapter must not work."""
    start = time.perf_counter()
    try:
        result = call()
    except AlpacaLoraError as exc:
        result = exc
    except Exception as exc:  # noqa: BLE001 - the point of the test: report which foreign error escaped
        pytest.fail(f"{kind}: {type(exc).__module__}.{type(exc).__name__} escaped: {str(exc)[:500]}")
    assert time.perf_counter() - start < TIME_LIMIT_S, f"{kind}: {time.perf_counter() - start:.1f} s"
    if "non-finite" in flags:
        assert isinstance(result, AlpacaLoraError), f"{kind}: an adapter holding NaN/inf was used"
        assert "NaN or infinite" in str(result) or "damaged" in str(result), str(result)[:300]
    if "untrained" in flags:
        assert not isinstance(result, Exception), f"{kind}: an untrained adapter must work: {result}"
    if isinstance(result, AlpacaLoraError):
        assert len(str(result)) < 3000, "a message quoting the input must stay bounded"
    return result


def _set_config(**fields):
    def change(folder: Path) -> None:
        _dump(folder, "adapter_config.json", {**_json_file(folder, "adapter_config.json"), **fields})
    return change


def _set_file(name: str, text: str):
    def change(folder: Path) -> None:
        (folder / name).write_text(text)
    return change


def _set_tensors(edit):
    def change(folder: Path) -> None:
        save_file(edit(load_file(str(folder / WEIGHTS))), str(folder / WEIGHTS))
    return change


NAMED = {  # the damage issue #19 names, each with what the error must say
    "config is a list": (_set_file("adapter_config.json", "[1, 2]"), "JSON object"),
    "config is a string": (_set_file("adapter_config.json", '"LORA"'), "JSON object"),
    "config is a number": (_set_file("adapter_config.json", "16"), "JSON object"),
    "fingerprint is a list": (_set_file("fingerprint.json", "[]"), "JSON object"),
    "fingerprint is a string": (_set_file("fingerprint.json", '"base"'), "JSON object"),
    "fingerprint is a number": (_set_file("fingerprint.json", "1.5"), "JSON object"),
    "fingerprint's base_model is a list": (_set_file("fingerprint.json", '{"base_model": [1]}'), "not a JSON object"),
    "r is a string": (_set_config(r="16"), "r='16'"),
    "target_modules is a number": (_set_config(target_modules=3), "target_modules=3"),
    "lora_alpha is NaN": (_set_config(lora_alpha=float("nan")), "lora_alpha=nan"),
    "rank 16 weights, r=8": (_set_config(r=8), "do not match r=8"),
    "q_proj named, weights for more": (_set_config(target_modules=["q_proj"]), "does not select"),
    "weights for a layer the base lacks": (_set_tensors(lambda s: {k.replace("layers.1.", "layers.5."): v
                                                                  for k, v in s.items()}), "does not have"),
    "an unknown tensor": (_set_tensors(lambda s: {**s, "base_model.model.model.norm.weight": torch.ones(64)}),
                          "not LoRA A/B"),
    "a lora_B without its lora_A": (_set_tensors(lambda s: {k: v for k, v in s.items()
                                                            if "layers.0.self_attn.k_proj.lora_A" not in k}),
                                    "not its partner"),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_damage_is_a_model_error_naming_the_file(trained, tmp_path, name):
    change, match = NAMED[name]
    folder = tmp_path / "adapter"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    change(folder)
    for call in (lambda: generate(folder, "Hi.", max_new_tokens=2, compute_dtype="float32"),
                 lambda: merge(folder, tmp_path / "merged", verify=False)):
        _count("adapter: named damage")
        with pytest.raises(ModelError, match=match) as info:
            call()
        assert str(folder) in str(info.value)


LORA_FIELDS = sorted(f.name for f in dataclasses.fields(LoraConfig))


@pytest.mark.parametrize("value", [0, {"a": 1}], ids=["zero", "object"])
@pytest.mark.parametrize("field", LORA_FIELDS)
def test_every_config_field_with_a_hostile_value(trained, tiny_model_dir, tmp_path, field, value):
    """Each LoraConfig field (this sweep turned up megatron_config, monteclora_config, trainable_token_indices=0)."""
    folder = tmp_path / "adapter"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    _dump(folder, "adapter_config.json", {**_json_file(folder, "adapter_config.json"), field: value})
    _count("adapter: config field sweep")
    kind = f"{field}={value!r}"
    text = _run(lambda: generate(folder, "Hi.", max_new_tokens=2, compute_dtype="float32"), kind, set())
    out = _run(lambda: merge(folder, tmp_path / "merged", dtype="float32", verify=False), kind, set())
    assert isinstance(text, (str, AlpacaLoraError))
    if not isinstance(out, Exception):
        _merged_is_sound(out, tiny_model_dir)


@pytest.mark.parametrize(("kind", "seed"), CASES)
def test_damaged_adapter_folders(trained, tiny_model_dir, tmp_path, caplog, kind, seed):
    folder = tmp_path / "adapter"
    flags = _damaged_copy(trained, folder, kind, seed)
    _count(f"adapter: {kind}")
    with caplog.at_level(logging.WARNING, logger="alpaca_lora"):
        text = _run(lambda: generate(folder, "Name the color of the sky.", max_new_tokens=2,
                                     compute_dtype="float32"), kind, flags)
        out = _run(lambda: merge(folder, tmp_path / "merged", dtype="float32", verify=seed % 4 == 0), kind,
                   flags - {"untrained"})
    if not isinstance(text, Exception):
        assert isinstance(text, str)
    if not isinstance(out, Exception):
        _merged_is_sound(out, tiny_model_dir)
    for call, result in (("generate", text), ("merge", out)):
        _count(f"outcome of {call}: {type(result).__name__ if isinstance(result, Exception) else 'worked'}")
    if "untrained" in flags:  # generate answers with a warning; merge refuses to export the base as a fine-tune
        assert sum("no-op" in r.getMessage() for r in caplog.records) >= 1
        assert isinstance(out, ModelError) and "untrained" in str(out)


# ---- property tests of generate() arguments -----------------------------------------------------


@pytest.fixture(scope="module")
def short_model(smol_tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama with a 64-token context, so every answer is short whatever max_new_tokens says."""
    return save_tiny_llama(tmp_path_factory.mktemp("hostile-short"), smol_tokenizer, max_position_embeddings=64)


wild = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([10**6, 2**63, -(2**63)]),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-300, 1e-7, 1e300]),
                 st.text(max_size=4), st.lists(st.integers(-2, 60_000), max_size=2), st.just({"a": 1}))
beams = st.one_of(st.integers(-2, 3), st.sampled_from([True, 2.0, "2", None]))  # a huge beam count would only OOM
ARGUMENTS = {name: wild for name in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                     "repetition_penalty", "batch_size", "stream")}
GEN_KWARGS = ["no_repeat_ngram_size", "length_penalty", "min_new_tokens", "typical_p", "min_p", "epsilon_cutoff",
              "eta_cutoff", "renormalize_logits", "remove_invalid_values", "pad_token_id", "eos_token_id",
              "bos_token_id", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "forced_bos_token_id",
              "forced_eos_token_id", "penalty_alpha", "num_beam_groups", "diversity_penalty", "stop_strings",
              "sequence_bias", "max_length", "min_length", "encoder_repetition_penalty", "max_time", "guidance_scale",
              "exponential_decay_length_penalty", "token_healing", "low_memory", "num_return_sequences", "use_cache",
              "early_stopping", "return_dict_in_generate", "not_a_setting"]


def _answer(result: object) -> object:
    """The text of a result: a stream is consumed (its pieces must be strings)."""
    if isinstance(result, (str, list)):
        return result
    pieces = list(result)
    assert all(isinstance(p, str) for p in pieces)
    return "".join(pieces)


def _generate_or_config_error(folder: Path, instruction: object, inp: object, kwargs: dict) -> None:
    try:
        result = _answer(generate(folder, instruction, inp, compute_dtype="float32", **kwargs))
    except ConfigError:
        return
    if isinstance(instruction, list):
        assert isinstance(result, list) and len(result) == len(instruction)
        assert all(isinstance(t, str) for t in result)
    else:
        assert isinstance(result, str)


@PROPERTY
@given(args=st.fixed_dictionaries({}, optional={**ARGUMENTS, "num_beams": beams}))
def test_generate_arguments_are_a_config_error_or_an_answer(short_model, args):
    _count("generate: arguments")
    _generate_or_config_error(short_model, "Name a color.", None, args)


@PROPERTY
@given(extra=st.dictionaries(st.sampled_from(GEN_KWARGS), wild, max_size=3), sample=st.booleans())
def test_generate_gen_kwargs_are_a_config_error_or_an_answer(short_model, extra, sample):
    _count("generate: gen_kwargs")
    _generate_or_config_error(short_model, "Name a color.", None, {"max_new_tokens": 4, "do_sample": sample, **extra})


any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # lone surrogates included


@PROPERTY
@given(instruction=st.one_of(any_text, st.lists(any_text, max_size=3), st.integers(), st.none()),
       inp=st.one_of(st.none(), any_text, st.lists(st.one_of(st.none(), any_text), max_size=3)))
def test_generate_texts_are_a_config_error_or_an_answer(short_model, instruction, inp):
    _count("generate: texts")
    _generate_or_config_error(short_model, instruction, inp, {"max_new_tokens": 2})


@pytest.mark.parametrize("size", [1_000, 100_000])
def test_long_prompts_are_refused_by_the_context_bound(short_model, size):
    _count("generate: long prompts")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        generate(short_model, "Summarise.", "word " * size, compute_dtype="float32")
    assert time.perf_counter() - start < TIME_LIMIT_S
