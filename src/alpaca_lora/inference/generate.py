"""generate(): answer instructions with a merged model, an adapter folder or a loaded model.

Prompts are rendered with the folder's own template and tokenized exactly as in training (the
prompt with the tokenizer's special tokens, no EOS). Batches are padded on the LEFT with an
attention mask, since a right-padded prompt would continue after its padding (training pads right,
generation pads left), so every prompt ends at the last column and batched greedy output equals
one-by-one output. Only the new tokens are decoded, and generation stops at EOS.

Arguments are checked in :mod:`alpaca_lora.inference.arguments`, decoding runs in
:mod:`alpaca_lora.model.decoding`; this module loads (and caches) the model of a folder.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alpaca_lora import files
from alpaca_lora.data.prepare import tokenize_prompt
from alpaca_lora.data.prompts import PromptTemplate, get_template
from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.export import fingerprint
from alpaca_lora.export import layout as art
from alpaca_lora.inference.arguments import (
    check_options,
    check_token_ids,
    generation_kwargs,
    instruction_records,
    is_int,
)
from alpaca_lora.inference.conversation import chat_prompts, conversation_requests
from alpaca_lora.model import adapter_files
from alpaca_lora.model.decoding import generate_batches, stream_text

logger = logging.getLogger(__name__)

_CACHE_SIZE = 2


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
    chat_template: str | Path | None = None,
    **gen_kwargs: Any,
) -> str | list[str] | Iterator[str]:
    """Answer one instruction or conversation, or many (a list, answered in batches).

    Args:
        model_or_dir: A merged model folder (config.json + safetensors), an adapter folder written by
            :func:`alpaca_lora.finetune` (its recorded base is loaded and the adapter applied), or a
            loaded causal LM / ``PeftModel`` (then pass ``tokenizer=`` unless its folder has one).
            Folders are loaded once and cached (see :func:`clear_cache`).
        instruction: The instruction, or a list of them; or a conversation (a list of
            ``{"role", "content"}`` messages, answered as the assistant's next turn with the folder's
            chat template), or a list of conversations.
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
        chat_template: For conversations: the chat template override (a name, Jinja string or file); by
            default the tokenizer's own, which for a folder of :func:`alpaca_lora.finetune` or
            :func:`alpaca_lora.merge` is the one training rendered with.
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
        >>> generate("chat-merged", [{"role": "user", "content": "Hi!"}])  # doctest: +SKIP
        'Hello! How can I help you today?'

    """
    chats = conversation_requests(instruction, input)
    batch = chats[1] if chats is not None else isinstance(instruction, (list, tuple))
    records = instruction_records(instruction, input, batch) if chats is None else []
    kwargs = generation_kwargs(max_new_tokens, do_sample, temperature, top_p, top_k, num_beams,
                                repetition_penalty, gen_kwargs)
    check_options(stream, batch, num_beams, batch_size, template, quantization, compute_dtype, base_model)
    model, tok, folder = resolve_model(model_or_dir, tokenizer, quantization, compute_dtype, base_model)
    end_of_turn: list[int] = []
    if chats is not None:
        prompts, end_of_turn = chat_prompts(chats[0], tok, chat_template)
    else:
        tmpl = get_template(template) if template is not None else _folder_template(folder)
        prompts = [tokenize_prompt(tmpl.render(i, x or None), tok) for i, x in records]
    vocab = _vocab_size(model)
    limit = _check_prompts(prompts, vocab, _context(model), max_new_tokens, batch)
    eos = _eos_ids(model, tok)
    eos += [t for t in end_of_turn if t not in eos]  # a chat turn ends at <|im_end|> / <|eot_id|> too
    if kwargs.get("eos_token_id") is None:  # gen_kwargs may name other stop ids; None means unset
        kwargs["eos_token_id"] = eos
    if kwargs.get("pad_token_id") is None:
        kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    check_token_ids(kwargs, gen_kwargs, vocab)
    if stream:
        return stream_text(model, tok, prompts[0], kwargs, limit)
    texts = generate_batches(model, tok, prompts, kwargs, batch_size, limit)
    return texts if batch else texts[0]


def clear_cache() -> None:
    """Drop the models :func:`generate` loaded from folders (frees their memory)."""
    _load_folder.cache_clear()


# ---- models ----------------------------------------------------------------------------------------


def resolve_model(model_or_dir: Any, tokenizer: Any, quantization: str | None, compute_dtype: str,
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
    _check_adapter_finite(model_or_dir)
    folder = model_folder(model_or_dir)
    if tokenizer is None:
        if folder is None or not (folder / "tokenizer_config.json").is_file():
            raise ConfigError("a loaded model needs tokenizer=: its folder is unknown or holds no tokenizer")
        from alpaca_lora.model.load import load_tokenizer

        tokenizer = load_tokenizer(folder)
    return model_or_dir, tokenizer, folder


def _check_adapter_finite(model: Any) -> None:
    """Refuse a loaded model whose LoRA weights hold NaN or infinity (it would answer with garbage).

    Only the LoRA weights are read (small), as for an adapter folder; a base's own weights are the
    caller's.
    """
    named = getattr(model, "named_parameters", None)
    lora = {n: p.detach() for n, p in named() if "lora_" in n} if callable(named) else {}
    bad = files.non_finite(lora)
    if bad:
        raise ModelError(f"the loaded model's LoRA weights hold NaN or infinite values in {len(bad)} of "
                         f"{len(lora)} tensors ({shown(sorted(bad)[:3])}{' ...' if len(bad) > 3 else ''}): "
                         "training diverged, and it would answer with empty or garbage text. Load the last good "
                         "checkpoint-N/ folder of the run, or retrain with a lower learning_rate")


def model_folder(model: Any) -> Path | None:
    """The local folder a loaded model was read from (its saved template lives there), or None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(inner, "name_or_path", None) or getattr(getattr(inner, "config", None), "_name_or_path", None)
    return art.resolve_local(name) if name else None


def prompt_template(folder: Path | None, template: Any = None) -> PromptTemplate:
    """The template generate() renders prompts with: ``template`` if given, else the folder's own."""
    return get_template(template) if template is not None else _folder_template(folder)


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

    An adapter is read and checked before its base loads (adapter_files.read_lora_adapter: damaged files,
    ranks and targets that do not match the weights, NaN/inf values) and against the base before peft
    applies it (adapter_files.check_lora_fits), so peft never meets a damaged adapter.
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
        adapter = adapter_files.read_lora_adapter(path / art.ADAPTER_CONFIG, path / art.ADAPTER_WEIGHTS)
        base = _adapter_base(path, base_model)
        model, _ = load_model(base, quantization, compute_dtype)
        adapter_files.check_lora_fits(adapter, _linear_shapes(model), base,
                              complete=(path / art.FINGERPRINT_FILE).is_file())  # trained on this very base
        if adapter.untrained:
            logger.warning("the adapter in %s is a no-op: its lora_B matrices are all zero (untrained, e.g. saved at "
                           "step 0), so generate() answers as the base model %s does", path, base)
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(path if has_tokenizer else base)
        if adapter.config.trainable_token_indices or adapter.config.modules_to_save:  # new tokens' rows
            from alpaca_lora.model.new_tokens import grow_to_tokenizer

            grow_to_tokenizer(model, tokenizer)
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
    _, base, diffs = fingerprint.resolve_adapter_base(folder, base_model)
    if diffs:
        raise ModelError(f"the base {base} is not the model the adapter in {folder} was trained on "
                         f"({'; '.join(diffs)}); pass the original as base_model=")
    return base


# ---- prompts against the model ---------------------------------------------------------------------


def _vocab_size(model: Any) -> int | None:
    """Rows of the input embedding: token ids at or above it would index past the table."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return rows if is_int(rows) and rows > 0 else None


def _context(model: Any) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if its config says."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return limit if is_int(limit) and limit > 0 else None


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


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS from the tokenizer first, plus any extra stop ids in the model's generation config."""
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no EOS token, so generation could not stop; set tokenizer.eos_token")
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return [tokenizer.eos_token_id] + [e for e in extra if e != tokenizer.eos_token_id]
