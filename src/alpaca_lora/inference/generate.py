"""generate(): answer instructions with a merged model, an adapter folder or a loaded model.

Prompts are rendered with the folder's own template and tokenized exactly as in training (the
prompt with the tokenizer's special tokens, no EOS). Batches are padded on the LEFT with an
attention mask (DESIGN mistake 5: training pads right, generation pads left), so every prompt ends
at the last column and batched greedy output equals one-by-one output. Only the new tokens are
decoded, and generation stops at EOS.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alpaca_lora import files
from alpaca_lora.data.prepare import tokenize_prompt
from alpaca_lora.data.prompts import PromptTemplate, get_template
from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.export import layout as art
from alpaca_lora.model.load import checkpointing_paused

logger = logging.getLogger(__name__)

_CACHE_SIZE = 2
_QUANTIZATIONS = (None, "nf4", "fp4", "int8")
_COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def generate(
    model_or_dir: str | Path | Any,
    instruction: str | list[str],
    input: str | list[str | None] | None = None,  # noqa: A002 - the Alpaca field name
    *,
    template: str | Path | dict[str, Any] | PromptTemplate | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    num_beams: int = 1,
    repetition_penalty: float | None = None,
    stream: bool = False,
    quantization: str | None = None,
    compute_dtype: str = "auto",
    base_model: str | Path | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    **gen_kwargs: Any,
) -> str | list[str] | Iterator[str]:
    """Generate the response to one instruction (a string) or to many (a list, answered in batches).

    Args:
        model_or_dir: A merged model folder (config.json + safetensors), an adapter folder written by
            :func:`alpaca_lora.finetune` (its recorded base is loaded and the adapter applied), or a
            loaded causal LM / ``PeftModel`` (then pass ``tokenizer=`` unless its folder has one).
            Folders are loaded once and cached (see :func:`clear_cache`).
        instruction: The instruction, or a list of them.
        input: Optional context: a string for one instruction, a list (same length, items may be
            None) for a list of instructions.
        template: Prompt template override; by default the folder's ``prompt_template.json``, and
            ``"alpaca"`` for a folder without one.
        max_new_tokens: Most tokens generated per response. The prompt and the response must fit the
            model's context (``config.max_position_embeddings``): a prompt that alone fills it is a
            ``ConfigError`` naming the item, and a ``max_new_tokens`` larger than the room left after a
            prompt is lowered to that room with a logged warning (a long answer cut at the context
            limit, as the model could not see past it anyway).
        do_sample: Sample instead of greedy (or beam) decoding. ``temperature``, ``top_p`` and
            ``top_k`` only act when sampling, so setting one without ``do_sample=True`` is an error
            rather than silently ignored (the alpaca-lora demo's bug).
        temperature: Sampling temperature (> 0); default 1.0 when sampling.
        top_p: Nucleus sampling mass in (0, 1]; default 1.0 (off) when sampling.
        top_k: Sample among the k most likely tokens; default 50 when sampling, 0 disables.
        num_beams: Beam search width; with ``do_sample=True`` this is beam sampling.
        repetition_penalty: > 1 discourages repeats; default 1.0 (off).
        stream: Return an iterator of text pieces as they are generated (one instruction, no beams);
            the pieces join to the text ``stream=False`` returns.
        quantization: How to load a folder's weights: None (default) full precision, which is what
            :func:`alpaca_lora.merge` exports and gives the same text for an adapter folder and its
            merged folder; "nf4", "fp4" or "int8" load the base quantized (for an adapter trained in
            4-bit, "nf4" reproduces the training forward exactly and needs ~4x less memory).
        compute_dtype: "auto" (bf16 on GPUs and bf16-capable CPUs, else fp32), "float32", "bfloat16"
            or "float16".
        base_model: For an adapter folder, the base to load instead of the recorded one.
        batch_size: Instructions per forward pass when a list is given.
        tokenizer: The tokenizer of a loaded model; never modified.
        **gen_kwargs: More ``transformers.GenerationConfig`` fields (e.g. ``no_repeat_ngram_size``).

    Returns:
        The response text (new tokens only, special tokens removed, stripped); a list for a list
        input; an iterator of text pieces with ``stream=True``.

    Raises:
        ConfigError: Bad generation settings (wrong types, out of range, token ids outside the
            vocabulary), a mismatched ``input`` list, text that is not valid Unicode (a lone
            surrogate), a prompt longer than the model's context, or a missing tokenizer.
        ModelError: A folder that cannot be loaded; a damaged adapter (its files, a rank or target
            modules that do not match its weights, NaN/inf values); an adapter whose base is
            unavailable or does not fit; a tokenizer whose ids do not fit the model.

    Example:
        >>> generate("merged", "Name three primary colors.")  # doctest: +SKIP
        'Red, blue and yellow.'

    """
    batch = isinstance(instruction, (list, tuple))
    records = _records(instruction, input, batch)
    kwargs = _generation_kwargs(max_new_tokens, do_sample, temperature, top_p, top_k, num_beams,
                                repetition_penalty, gen_kwargs)
    _check_options(stream, batch, num_beams, batch_size, template, quantization, compute_dtype, base_model)
    model, tok, folder = _resolve(model_or_dir, tokenizer, quantization, compute_dtype, base_model)
    tmpl = get_template(template) if template is not None else _folder_template(folder)
    prompts = [tokenize_prompt(tmpl.render(i, x or None), tok) for i, x in records]
    vocab = _vocab_size(model)
    limit = _check_prompts(prompts, vocab, _context(model), max_new_tokens, batch)
    eos = _eos_ids(model, tok)
    if kwargs.get("eos_token_id") is None:  # gen_kwargs may name other stop ids; None means unset
        kwargs["eos_token_id"] = eos
    if kwargs.get("pad_token_id") is None:
        kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    _check_token_ids(kwargs, gen_kwargs, vocab)
    if stream:
        return _stream(model, tok, prompts[0], kwargs, limit)
    texts = _generate_batches(model, tok, prompts, kwargs, batch_size, limit)
    return texts if batch else texts[0]


def clear_cache() -> None:
    """Drop the models :func:`generate` loaded from folders (frees their memory)."""
    _load_folder.cache_clear()


# ---- arguments -------------------------------------------------------------------------------------


def _records(instruction: Any, input: Any, batch: bool) -> list[tuple[str, str | None]]:  # noqa: A002
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


def _check_options(stream: Any, batch: bool, num_beams: int, batch_size: Any, template: Any, quantization: Any,
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
    if not (quantization is None or isinstance(quantization, str)) or quantization not in _QUANTIZATIONS:
        raise ConfigError(f"quantization={shown(quantization)}: must be one of {list(_QUANTIZATIONS)}")
    if not isinstance(compute_dtype, str) or compute_dtype not in _COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype={shown(compute_dtype)}: must be one of {list(_COMPUTE_DTYPES)}")
    if not (base_model is None or isinstance(base_model, (str, Path))):
        raise ConfigError(f"base_model={shown(base_model)}: must be a folder path, a Hub id or None")
    if not (template is None or isinstance(template, (str, Path, dict, PromptTemplate))):
        raise ConfigError(f"template={shown(template)}: must be a template name, a JSON file, a dict or a "
                          "PromptTemplate")


def _generation_kwargs(max_new_tokens: int, do_sample: bool, temperature: float | None, top_p: float | None,
                       top_k: int | None, num_beams: int, repetition_penalty: float | None,
                       extra: dict[str, Any]) -> dict[str, Any]:
    """Validate the settings and return them all explicitly, so nothing falls back to a model default."""
    from transformers import GenerationConfig

    problems = []
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        problems.append(f"max_new_tokens={shown(max_new_tokens)}: must be an int >= 1")
    if not _is_int(num_beams) or num_beams < 1:
        problems.append(f"num_beams={shown(num_beams)}: must be an int >= 1")
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
    if top_k is not None and not (_is_int(top_k) and top_k >= 0):
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


def _is_int(value: Any) -> bool:
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


_COUNT = (lambda v: _is_int(v) and v >= 0, "an int >= 0")
_BOOL = (lambda v: isinstance(v, bool), "True or False")
_SETTINGS: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(("max_length", "min_length", "min_new_tokens", "no_repeat_ngram_size",
                     "encoder_no_repeat_ngram_size", "num_beam_groups", "prompt_lookup_num_tokens"), _COUNT),
    **dict.fromkeys(("length_penalty", "guidance_scale"), (_is_number, "a finite number")),
    **dict.fromkeys(("diversity_penalty", "penalty_alpha", "max_time"), (_in(0, math.inf, closed_high=False),
                                                                         "a finite number >= 0")),
    "encoder_repetition_penalty": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "typical_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "exponential_decay_length_penalty": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and _is_int(v[0])
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


# ---- models ----------------------------------------------------------------------------------------


def _resolve(model_or_dir: Any, tokenizer: Any, quantization: str | None, compute_dtype: str,
             base_model: str | Path | None) -> tuple[Any, Any, Path | None]:
    """Return ``(model, tokenizer, its folder)`` for a folder (cached) or a loaded model."""
    if isinstance(model_or_dir, (str, Path)):
        folder = Path(model_or_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ModelError(f"{model_or_dir} is not a folder; pass a merged or adapter folder, or a loaded model")
        if base_model is not None and Path(base_model).expanduser().is_file():
            raise ModelError(f"base_model={str(base_model)!r} is a file; pass the folder that holds the base "
                             "model's config.json and safetensors weights")
        model, tok = _load_folder(str(folder), quantization, compute_dtype,
                                  None if base_model is None else str(base_model), _stamp(folder))
        return model, (tokenizer if tokenizer is not None else tok), folder
    if not hasattr(model_or_dir, "generate"):
        raise ConfigError(f"model_or_dir must be a folder path or a loaded causal LM, got {type(model_or_dir)}")
    folder = _model_folder(model_or_dir)
    if tokenizer is None:
        if folder is None or not (folder / "tokenizer_config.json").is_file():
            raise ConfigError("a loaded model needs tokenizer=: its folder is unknown or holds no tokenizer")
        from alpaca_lora.model.load import load_tokenizer

        tokenizer = load_tokenizer(folder)
    return model_or_dir, tokenizer, folder


def _model_folder(model: Any) -> Path | None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(inner, "name_or_path", None) or getattr(getattr(inner, "config", None), "_name_or_path", None)
    return art.resolve_local(name) if name else None


def _folder_template(folder: Path | None) -> PromptTemplate:
    """The template saved in ``folder``, or ``alpaca`` when it saved none; a damaged one is a ModelError."""
    saved = folder / art.TEMPLATE_FILE if folder is not None else None
    if saved is None or not saved.is_file():
        return get_template("alpaca")
    fix = f"restore it from the run that wrote {folder}, or pass template="
    try:
        return get_template(files.read_json(saved, fix=fix))
    except ConfigError as exc:
        raise ModelError(f"{saved} is not a usable prompt template ({exc}); {fix}") from None


def _stamp(folder: Path) -> tuple[int, ...]:
    """Modification times of the weight and config files, so a rewritten folder is reloaded."""
    found = sorted(folder.glob("*.safetensors")) + [folder / art.ADAPTER_CONFIG, folder / "config.json",
                                                    folder / art.FINGERPRINT_FILE]
    return tuple(f.stat().st_mtime_ns for f in found if f.is_file())


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_folder(folder: str, quantization: str | None, compute_dtype: str, base_model: str | None,
                 stamp: tuple[int, ...]) -> tuple[Any, Any]:
    """Load a merged/plain model folder or an adapter folder on its base (cached by path and settings).

    An adapter is read and checked before its base loads (files.read_lora_adapter: damaged files,
    ranks and targets that do not match the weights, NaN/inf values) and against the base before peft
    applies it (files.check_lora_fits), so peft never meets a damaged adapter.
    """
    from alpaca_lora.model.load import load_model, load_tokenizer

    path = Path(folder)
    if art.is_run_folder(path):
        from peft import PeftModel

        if not (path / art.ADAPTER_WEIGHTS).is_file():  # peft would fall back to a pickled adapter_model.bin
            pickles = [p.name for p in art.pickle_files(path)]
            raise ModelError(f"{path} holds no {art.ADAPTER_WEIGHTS}" + (f" (only {pickles})" if pickles else "")
                             + "; only safetensors weights are loaded, since a pickle file can run code when "
                             "read. Re-save the adapter with save_pretrained(safe_serialization=True)")
        adapter = files.read_lora_adapter(path / art.ADAPTER_CONFIG, path / art.ADAPTER_WEIGHTS)
        base = _adapter_base(path, base_model)
        model, _ = load_model(base, quantization, compute_dtype)
        files.check_lora_fits(adapter, _linear_shapes(model), base,
                              complete=(path / art.FINGERPRINT_FILE).is_file())  # trained on this very base
        if adapter.untrained:
            logger.warning("the adapter in %s is a no-op: its lora_B matrices are all zero (untrained, e.g. saved at "
                           "step 0), so generate() answers as the base model %s does", path, base)
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(path if has_tokenizer else base)
        try:  # checked above; what is left is an option only peft knows it cannot apply to this base
            model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, ImportError,
                re.error) as exc:
            raise ModelError(f"peft cannot apply the adapter in {path} to the base {base} ({type(exc).__name__}: "
                             f"{shown(str(exc))}); check {art.ADAPTER_CONFIG} against the base, or re-run "
                             "finetune") from None
    elif (path / "config.json").is_file():
        model, tokenizer = load_model(path, quantization, compute_dtype)
    else:
        raise ModelError(f"{path} holds neither config.json (a model) nor {art.ADAPTER_CONFIG} (an adapter); "
                         "pass the output folder of merge() or finetune()")
    return model.eval(), tokenizer


def _linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every linear layer (4-bit ones too), by module name."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)}


def _adapter_base(folder: Path, base_model: str | None) -> Path:
    """The base an adapter folder records (refused if it differs from the fingerprint), or ``base_model``."""
    _, base, diffs = art.resolve_adapter_base(folder, base_model)
    if diffs:
        raise ModelError(f"the base {base} is not the model the adapter in {folder} was trained on "
                         f"({'; '.join(diffs)}); pass the original as base_model=")
    return base


# ---- generation ------------------------------------------------------------------------------------


def _vocab_size(model: Any) -> int | None:
    """Rows of the input embedding: token ids at or above it would index past the table."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return rows if _is_int(rows) and rows > 0 else None


def _context(model: Any) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if its config says."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return limit if _is_int(limit) and limit > 0 else None


def _check_prompts(prompts: list[list[int]], vocab: int | None, limit: int | None, max_new_tokens: int,
                   batch: bool) -> int | None:
    """Refuse token ids the model has no embedding for and prompts that fill its context; warn on a clamped answer.

    Returns:
        The context limit the answers are bounded by (None when the config names none).

    """
    def item(i: int) -> str:
        return f"item {i}" if batch else "the instruction"

    for i, p in enumerate(prompts):
        if vocab is not None and p and max(p) >= vocab:
            raise ModelError(f"the tokenizer gives token id {max(p)} for {item(i)}, but the model's vocabulary has "
                             f"{vocab} ids: the tokenizer is not this model's; pass the one it was trained with")
        if limit is not None and len(p) >= limit:
            raise ConfigError(f"{item(i)}: the prompt (template, instruction and input) is {len(p):,} tokens, and the "
                              f"model's context holds {limit:,} (config.max_position_embeddings), leaving no room "
                              f"for a response; shorten the instruction or input to well under {limit:,} tokens")
    clamped = [i for i, p in enumerate(prompts) if limit is not None and len(p) + max_new_tokens > limit]
    if clamped:
        first = max(clamped, key=lambda i: len(prompts[i]))
        logger.warning("max_new_tokens=%d does not fit the model's context of %d tokens (max_position_embeddings) "
                       "after the %d-token prompt of %s: its answer stops after %d new tokens%s", max_new_tokens,
                       limit, len(prompts[first]), item(first), limit - len(prompts[first]),
                       f"; {len(clamped) - 1} more items are bounded likewise" if len(clamped) > 1 else "")
    return limit


def _token_ids(value: Any, depth: int, name: str) -> list[Any] | None:
    """The ids of a setting nested ``depth`` lists deep (eos_token_id: an id or a list), or None if not so shaped."""
    if _is_int(value) and (depth == 0 or name == "eos_token_id"):
        return [value]
    if not depth or not isinstance(value, (list, tuple)) or (depth == 2 and not value):
        return None
    parts = [_token_ids(v, depth - 1, name) for v in value]
    return None if any(p is None or (depth == 2 and not p) for p in parts) else [i for p in parts for i in p]


def _check_token_ids(kwargs: dict[str, Any], given: dict[str, Any], vocab: int | None) -> None:
    """Token ids in the settings must be ids of the model's vocabulary (a pad id past it fails inside the embedding)."""
    bias = kwargs.get("sequence_bias")
    if bias is not None and not (isinstance(bias, dict) and all(
            isinstance(k, tuple) and k and all(_is_int(t) and 0 <= t < (vocab or t + 1) for t in k) and _is_number(b)
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


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS from the tokenizer first, plus any extra stop ids in the model's generation config."""
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no EOS token, so generation could not stop; set tokenizer.eos_token")
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return [tokenizer.eos_token_id] + [e for e in extra if e != tokenizer.eos_token_id]


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad on the left so every prompt ends in the last column; the mask is 0 on padding."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)  # (B, T), (B, T)


class _EvalMode:
    """Put a model in eval mode for the duration, then restore its previous mode.

    A model in training with bitsandbytes 4-bit layers only has its dropout switched off: on the
    CPU, a 4-bit layer's first eval-mode forward repacks its weights in place, and training
    forwards after that read them wrongly.
    """

    def __init__(self, model: Any) -> None:
        self.model, self.was_training = model, model.training
        quantized = any(type(m).__name__ == "Linear4bit" for m in model.modules())
        self.only_dropout = model.training and quantized
        self.dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]

    def __enter__(self) -> None:
        if self.only_dropout:
            self.paused = checkpointing_paused(self.model)
            self.paused.__enter__()
            for m in self.dropouts:
                m.eval()
        else:
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.only_dropout:
            for m in self.dropouts:
                m.train()
            self.paused.__exit__(*exc)
        else:
            self.model.train(self.was_training)


def _batches(prompts: list[list[int]], batch_size: int, max_new_tokens: int, limit: int | None) -> Iterator[list[int]]:
    """Indices in batches, longest prompt first (similar lengths, less padding).

    A prompt whose answer the context cuts short runs alone with its own bound, so batched output
    still equals one-by-one output.
    """
    run: list[int] = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        if limit is not None and len(prompts[i]) + max_new_tokens > limit:
            yield [i]
            continue
        run.append(i)
        if len(run) == batch_size:
            yield run
            run = []
    if run:
        yield run


def _bounded(kwargs: dict[str, Any], width: int, limit: int | None) -> dict[str, Any]:
    """``kwargs`` with max_new_tokens lowered to what the context leaves after a prompt of ``width`` tokens."""
    room = kwargs["max_new_tokens"] if limit is None else min(kwargs["max_new_tokens"], limit - width)
    return {**kwargs, "max_new_tokens": room}


def _tokenizer_for(kwargs: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``{"tokenizer": tokenizer}`` for the settings transformers needs it for (stop strings, token healing)."""
    return {"tokenizer": tokenizer} if kwargs.get("stop_strings") or kwargs.get("token_healing") else {}


def _generate_batches(model: Any, tokenizer: Any, prompts: list[list[int]], kwargs: dict[str, Any],
                      batch_size: int, limit: int | None) -> list[str]:
    texts: dict[int, str] = {}
    with _EvalMode(model), torch.no_grad():
        for idx in _batches(prompts, batch_size, kwargs["max_new_tokens"], limit):
            ids, mask = _left_pad([prompts[i] for i in idx], kwargs["pad_token_id"], model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, **_tokenizer_for(kwargs, tokenizer),
                                 **_bounded(kwargs, ids.shape[1], limit))  # (B, T + new)
            for i, row in zip(idx, out[:, ids.shape[1]:], strict=True):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [texts[i] for i in range(len(prompts))]


def _stream(model: Any, tokenizer: Any, prompt: list[int], kwargs: dict[str, Any], limit: int | None) -> Iterator[str]:
    """Yield text pieces while a background thread generates; pieces join to the stripped response."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids, mask = _left_pad([prompt], kwargs["pad_token_id"], model.device)
    kwargs = _bounded(kwargs, ids.shape[1], limit)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kwargs,
                               **_tokenizer_for(kwargs, tokenizer))
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)
            streamer.end()

    with _EvalMode(model):
        thread = threading.Thread(target=run, name="alpaca_lora-generate", daemon=True)
        thread.start()
        try:
            yield from _strip_stream(streamer)
        finally:
            thread.join()
    if failure:
        raise failure[0]


def _strip_stream(pieces: Iterator[str]) -> Iterator[str]:
    """Drop leading whitespace and hold back trailing whitespace, as ``str.strip`` does on the whole."""
    started, pending = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        text = pending + piece
        body = text.rstrip()
        pending = text[len(body):]
        if body:
            yield body
