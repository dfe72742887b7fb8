"""Check generate()'s arguments before anything is loaded, and the token ids its settings name.

Every setting is checked for type and range (transformers 5 declares no types for most of them), so a
bad one is a ``ConfigError`` naming it, never a failure deep inside decoding or a silently ignored value.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from alpaca_lora.data.prompts import PromptTemplate
from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.model.dtypes import DTYPES

QUANTIZATIONS = (None, "nf4", "fp4", "int8")
"""How generate() may load a folder's weights."""
COMPUTE_DTYPES = ("auto", *DTYPES)
MAX_BEAMS = 64  # beam search holds num_beams copies of every prompt's cache; past this it is a typo or a memory bomb
"""The compute dtypes generate() accepts."""


def instruction_records(instruction: Any, input: Any, batch: bool) -> list[tuple[str, str | None]]:  # noqa: A002
    """``(instruction, input)`` pairs of one instruction or a list, their types and text checked."""
    if not batch:
        if not isinstance(instruction, str) or not isinstance(input, (str, type(None))):
            raise ConfigError("instruction must be a string (or a list of strings) and input a string or None; "
                              f"got {type(instruction).__name__} and {type(input).__name__}")
        _check_text({"instruction": instruction, "input": input})
        return [(instruction, input)]
    inputs = [None] * len(instruction) if input is None else input
    if not isinstance(inputs, (list, tuple)) or len(inputs) != len(instruction):
        raise ConfigError(f"for {len(instruction)} instructions, input must be None or a list of "
                          f"{len(instruction)} strings/None; got {type(input).__name__}"
                          + (f" of length {len(input)}" if isinstance(input, (list, tuple)) else ""))
    for i, (ins, x) in enumerate(zip(instruction, inputs, strict=True)):
        if not isinstance(ins, str) or not isinstance(x, (str, type(None))):
            raise ConfigError(f"item {i}: instruction must be a string and input a string or None")
        _check_text({f"item {i} instruction": ins, f"item {i} input": x})
    return list(zip(instruction, inputs, strict=True))


def _check_text(texts: dict[str, str | None]) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (e.g. from a bad JSON escape) has no UTF-8 form."""
    for what, text in texts.items():
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(f"the {what} holds a lone surrogate {text[exc.start]!r} at character {exc.start}, which "
                              "is not valid Unicode text; repair the source text (decode it with errors='replace', "
                              "or drop the character)") from None


def check_options(stream: Any, batch: bool, num_beams: int, batch_size: Any, template: Any, quantization: Any,
                   compute_dtype: Any, base_model: Any) -> None:
    """Refuse option values of the wrong type or range, before anything is loaded."""
    if not isinstance(stream, bool):
        raise ConfigError(f"stream={shown(stream)}: must be True or False")
    if stream and batch:
        raise ConfigError("stream=True answers one instruction; pass a string, or stream=False for a list")
    if stream and num_beams > 1:
        raise ConfigError("stream=True needs num_beams=1: beam search only knows its text at the end")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={shown(batch_size)}: must be a positive int")
    if not (quantization is None or isinstance(quantization, str)) or quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization={shown(quantization)}: must be one of {list(QUANTIZATIONS)}")
    if not isinstance(compute_dtype, str) or compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype={shown(compute_dtype)}: must be one of {list(COMPUTE_DTYPES)}")
    if not (base_model is None or isinstance(base_model, (str, Path))):
        raise ConfigError(f"base_model={shown(base_model)}: must be a folder path, a Hub id or None")
    if not (template is None or isinstance(template, (str, Path, dict, PromptTemplate))):
        raise ConfigError(f"template={shown(template)}: must be a template name, a JSON file, a dict or a "
                          "PromptTemplate")


def generation_kwargs(max_new_tokens: int, do_sample: bool, temperature: float | None, top_p: float | None,
                       top_k: int | None, num_beams: int, repetition_penalty: float | None,
                       extra: dict[str, Any]) -> dict[str, Any]:
    """Validate the settings and return them all explicitly, so nothing falls back to a model default."""
    from transformers import GenerationConfig

    problems = []
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        problems.append(f"max_new_tokens={shown(max_new_tokens)}: must be an int >= 1")
    if not is_int(num_beams) or not 1 <= num_beams <= MAX_BEAMS:
        problems.append(f"num_beams={shown(num_beams)}: must be an int from 1 to {MAX_BEAMS} (beam search keeps "
                        "that many copies of each prompt and its cache in memory; 1 decodes greedily, 4 is common)")
    if not isinstance(do_sample, bool):
        problems.append(f"do_sample={shown(do_sample)}: must be True or False")
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    if do_sample is False and any(v is not None for v in sampling.values()):
        given = {k: v for k, v in sampling.items() if v is not None}
        problems.append(f"{shown(given)} only act when sampling; pass do_sample=True (or drop them for greedy "
                        "decoding)")
    if temperature is not None and not (_is_number(temperature) and temperature >= _SMALLEST):
        problems.append(f"temperature={shown(temperature)}: must be a finite number >= {_SMALLEST:g} (smaller ones "
                        "divide the logits past float32's range; use do_sample=False for greedy decoding)")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        problems.append(f"top_p={shown(top_p)}: must be a number in (0, 1]")
    if top_k is not None and not (is_int(top_k) and top_k >= 0):
        problems.append(f"top_k={shown(top_k)}: must be an int >= 0 (0 disables it)")
    if repetition_penalty is not None and not (_is_number(repetition_penalty) and repetition_penalty >= _SMALLEST):
        problems.append(f"repetition_penalty={shown(repetition_penalty)}: must be a finite number >= {_SMALLEST:g} "
                        "(1.0 is off)")
    if extra.get("num_return_sequences", 1) != 1:
        problems.append("num_return_sequences must be 1: generate() returns one text per instruction")
    known = GenerationConfig().to_dict()
    for name in (n for n in extra if n not in known):
        close = difflib.get_close_matches(name, list(known), n=3)
        problems.append(f"{shown(name)} is not a generation setting" + (f"; did you mean {close}?" if close else ""))
    problems += [f"{n}={shown(v)}: must be {_SETTINGS[n][1]}" for n, v in extra.items()
                 if n in _SETTINGS and v is not None and not _SETTINGS[n][0](v)]
    if extra.get("return_dict_in_generate"):
        problems.append("return_dict_in_generate=True: generate() returns text; call model.generate for scores")
    problems += [f"{n}={shown(extra[n])} asks for {what}, which transformers now runs from code downloaded from "
                 f"the Hub (custom_generate); alpaca_lora never runs downloaded code: drop {n}"
                 for n, (what, off) in _HUB_CODE.items() if extra.get(n, off) not in (None, off)]
    if extra.get("low_memory"):
        problems.append("low_memory=True: transformers' beam search no longer supports it; drop it")
    if problems:
        raise ConfigError("invalid generate() arguments:\n  - " + "\n  - ".join(problems))
    numbers = {n: float(v) for n, v in extra.items() if n in _SETTINGS and _SETTINGS[n][0] is not _COUNT[0]
               and _is_number(v)}  # transformers wants floats: repetition_penalty=2 fails deep inside it
    settings = {**extra, **numbers, "max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams,
                "temperature": 1.0 if temperature is None else float(temperature),
                "top_p": 1.0 if top_p is None else float(top_p), "top_k": 50 if top_k is None else top_k,
                "repetition_penalty": 1.0 if repetition_penalty is None else float(repetition_penalty),
                "use_cache": True}
    try:  # the checks transformers makes itself (e.g. a negative no_repeat_ngram_size), before any model loads
        GenerationConfig(**settings).validate()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid generate() arguments: {shown(str(exc), 300)}") from None
    return settings


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real number that is finite (an int too large for a float is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _in(low: float, high: float, *, closed_high: bool) -> Any:
    return lambda v: _is_number(v) and low <= v and (v <= high if closed_high else v < high)


_COUNT = (lambda v: is_int(v) and v >= 0, "an int >= 0")
_BOOL = (lambda v: isinstance(v, bool), "True or False")
_SETTINGS: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(("max_length", "min_length", "min_new_tokens", "no_repeat_ngram_size",
                     "encoder_no_repeat_ngram_size", "num_beam_groups", "prompt_lookup_num_tokens"), _COUNT),
    **dict.fromkeys(("length_penalty", "guidance_scale"), (_is_number, "a finite number")),
    **dict.fromkeys(("diversity_penalty", "penalty_alpha", "max_time"), (_in(0, math.inf, closed_high=False),
                                                                         "a finite number >= 0")),
    "encoder_repetition_penalty": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "typical_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "exponential_decay_length_penalty": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and is_int(v[0])
                                         and v[0] >= 0 and _is_number(v[1]), "a pair (start index, decay factor)"),
    "stop_strings": (lambda v: bool(v) and all(isinstance(t, str) and t for t in ([v] if isinstance(v, str) else v))
                     if isinstance(v, (str, list)) else False, "a string or a list of non-empty strings"),
    "min_p": (_in(0, 1, closed_high=True), "a number in [0, 1]"),
    **dict.fromkeys(("epsilon_cutoff", "eta_cutoff"), (_in(0, 1, closed_high=False), "a number in [0, 1)")),
    **dict.fromkeys(("use_cache", "renormalize_logits", "remove_invalid_values", "output_scores", "output_logits",
                     "return_dict_in_generate", "output_attentions", "output_hidden_states", "low_memory",
                     "token_healing"), _BOOL),
}
"""Checks of the numeric and boolean ``gen_kwargs`` (transformers 5 declares no types for them)."""
_HUB_CODE = {"penalty_alpha": ("contrastive search", 0), "dola_layers": ("DoLa decoding", None),
             "num_beam_groups": ("group beam search", 1), "diversity_penalty": ("group beam search", 0),
             "constraints": ("constrained beam search", None), "force_words_ids": ("constrained beam search", None)}
"""Settings whose decoding transformers 5 moved to Hub code, with the value that leaves it off."""
_SMALLEST = 1e-6
"""Least temperature and repetition penalty: logits divided by less can overflow float32 (inf, then NaN)."""
_ID_SETTINGS = {**dict.fromkeys(("pad_token_id", "bos_token_id", "decoder_start_token_id", "forced_bos_token_id",
                                  "forced_eos_token_id"), (0, "a token id")),
                "eos_token_id": (1, "a token id or a list of them"),
                **dict.fromkeys(("suppress_tokens", "begin_suppress_tokens"), (1, "a list of token ids")),
                "bad_words_ids": (2, "a list of non-empty lists of token ids")}
"""Settings that hold token ids: (nesting, what); every id must be in the model's vocabulary."""


def _token_ids(value: Any, depth: int, name: str) -> list[Any] | None:
    """The ids of a setting nested ``depth`` lists deep (eos_token_id: an id or a list), or None if not so shaped."""
    if is_int(value) and (depth == 0 or name == "eos_token_id"):
        return [value]
    if not depth or not isinstance(value, (list, tuple)) or (depth == 2 and not value):
        return None
    parts = [_token_ids(v, depth - 1, name) for v in value]
    return None if any(p is None or (depth == 2 and not p) for p in parts) else [i for p in parts for i in p]


def check_token_ids(kwargs: dict[str, Any], given: dict[str, Any], vocab: int | None) -> None:
    """Token ids in the settings must be ids of the model's vocabulary (a pad id past it fails inside the embedding)."""
    bias = kwargs.get("sequence_bias")
    if bias is not None and not (isinstance(bias, dict) and all(
            isinstance(k, tuple) and k and all(is_int(t) and 0 <= t < (vocab or t + 1) for t in k) and _is_number(b)
            for k, b in bias.items())):
        raise ConfigError(f"sequence_bias={shown(bias)}: must map tuples of token ids in [0, {vocab}) to numbers")
    for name, (depth, kind) in _ID_SETTINGS.items():
        value = kwargs.get(name)
        ids = _token_ids(value, depth, name)
        if value is None or (ids is not None and all(0 <= t < (vocab or t + 1) for t in ids)):
            continue
        what = f"{name}={shown(value)}"
        if name in given:
            raise ConfigError(f"{what}: must be {kind} in [0, {vocab}), the model's vocabulary")
        raise ModelError(f"the tokenizer's (or the model's generation config's) {what} is outside the model's "
                         f"vocabulary of {vocab} ids: the tokenizer is not this model's; pass the one it was "
                         f"trained with, or {name}= explicitly")
