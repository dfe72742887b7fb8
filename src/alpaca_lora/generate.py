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
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alpaca_lora import artifacts as art
from alpaca_lora.data import tokenize_prompt
from alpaca_lora.errors import ConfigError, ModelError
from alpaca_lora.model import checkpointing_paused
from alpaca_lora.prompts import PromptTemplate, get_template

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
        max_new_tokens: Most tokens generated per response.
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
        ConfigError: Bad generation settings, mismatched ``input`` list, or a missing tokenizer.
        ModelError: A folder that cannot be loaded, or an adapter whose base is unavailable.

    Example:
        >>> generate("merged", "Name three primary colors.")  # doctest: +SKIP
        'Red, blue and yellow.'

    """
    batch = isinstance(instruction, (list, tuple))
    records = _records(instruction, input, batch)
    kwargs = _generation_kwargs(max_new_tokens, do_sample, temperature, top_p, top_k, num_beams,
                                repetition_penalty, gen_kwargs)
    if stream and batch:
        raise ConfigError("stream=True answers one instruction; pass a string, or stream=False for a list")
    if stream and num_beams > 1:
        raise ConfigError("stream=True needs num_beams=1: beam search only knows its text at the end")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: must be a positive int")
    model, tok, folder_template = _resolve(model_or_dir, tokenizer, quantization, compute_dtype, base_model)
    tmpl = get_template(template) if template is not None else folder_template
    prompts = [tokenize_prompt(tmpl.render(i, x or None), tok) for i, x in records]
    eos = _eos_ids(model, tok)
    kwargs.setdefault("eos_token_id", eos)  # gen_kwargs may name other stop ids
    kwargs.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else eos[0])
    if stream:
        return _stream(model, tok, prompts[0], kwargs)
    texts = _generate_batches(model, tok, prompts, kwargs, batch_size)
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
        return [(instruction, input)]
    inputs = [None] * len(instruction) if input is None else input
    if not isinstance(inputs, (list, tuple)) or len(inputs) != len(instruction):
        raise ConfigError(f"for {len(instruction)} instructions, input must be None or a list of "
                          f"{len(instruction)} strings/None; got {type(input).__name__}"
                          + (f" of length {len(input)}" if isinstance(input, (list, tuple)) else ""))
    for i, (ins, x) in enumerate(zip(instruction, inputs, strict=True)):
        if not isinstance(ins, str) or not isinstance(x, (str, type(None))):
            raise ConfigError(f"item {i}: instruction must be a string and input a string or None")
    return list(zip(instruction, inputs, strict=True))


def _generation_kwargs(max_new_tokens: int, do_sample: bool, temperature: float | None, top_p: float | None,
                       top_k: int | None, num_beams: int, repetition_penalty: float | None,
                       extra: dict[str, Any]) -> dict[str, Any]:
    """Validate the settings and return them all explicitly, so nothing falls back to a model default."""
    from transformers import GenerationConfig

    problems = []
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        problems.append(f"num_beams={num_beams!r}: must be an int >= 1")
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    if not do_sample and any(v is not None for v in sampling.values()):
        given = {k: v for k, v in sampling.items() if v is not None}
        problems.append(f"{given} only act when sampling; pass do_sample=True (or drop them for greedy decoding)")
    if temperature is not None and not temperature > 0:
        problems.append(f"temperature={temperature!r}: must be > 0 (use do_sample=False for greedy decoding)")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top_p={top_p!r}: must be in (0, 1]")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        problems.append(f"top_k={top_k!r}: must be an int >= 0 (0 disables it)")
    if repetition_penalty is not None and not repetition_penalty > 0:
        problems.append(f"repetition_penalty={repetition_penalty!r}: must be > 0 (1.0 is off)")
    if extra.get("num_return_sequences", 1) != 1:
        problems.append("num_return_sequences must be 1: generate() returns one text per instruction")
    known = GenerationConfig().to_dict()
    for name in (n for n in extra if n not in known):
        close = difflib.get_close_matches(name, list(known), n=3)
        problems.append(f"{name!r} is not a generation setting" + (f"; did you mean {close}?" if close else ""))
    if problems:
        raise ConfigError("invalid generate() arguments:\n  - " + "\n  - ".join(problems))
    return {**extra, "max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams,
            "temperature": 1.0 if temperature is None else temperature, "top_p": 1.0 if top_p is None else top_p,
            "top_k": 50 if top_k is None else top_k,
            "repetition_penalty": 1.0 if repetition_penalty is None else repetition_penalty, "use_cache": True}


# ---- models ----------------------------------------------------------------------------------------


def _resolve(model_or_dir: Any, tokenizer: Any, quantization: str | None, compute_dtype: str,
             base_model: str | Path | None) -> tuple[Any, Any, PromptTemplate]:
    """Return ``(model, tokenizer, template)`` for a folder (cached) or a loaded model."""
    if isinstance(model_or_dir, (str, Path)):
        folder = Path(model_or_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ModelError(f"{model_or_dir} is not a folder; pass a merged or adapter folder, or a loaded model")
        model, tok, tmpl = _load_folder(str(folder), quantization, compute_dtype,
                                        None if base_model is None else str(base_model), _stamp(folder))
        return model, (tokenizer if tokenizer is not None else tok), tmpl
    if not hasattr(model_or_dir, "generate"):
        raise ConfigError(f"model_or_dir must be a folder path or a loaded causal LM, got {type(model_or_dir)}")
    folder = _model_folder(model_or_dir)
    if tokenizer is None:
        if folder is None or not (folder / "tokenizer_config.json").is_file():
            raise ConfigError("a loaded model needs tokenizer=: its folder is unknown or holds no tokenizer")
        from alpaca_lora.model import load_tokenizer

        tokenizer = load_tokenizer(folder)
    return model_or_dir, tokenizer, _folder_template(folder)


def _model_folder(model: Any) -> Path | None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(inner, "name_or_path", None) or getattr(getattr(inner, "config", None), "_name_or_path", None)
    return art.resolve_local(name) if name else None


def _folder_template(folder: Path | None) -> PromptTemplate:
    saved = folder / art.TEMPLATE_FILE if folder is not None else None
    return get_template(saved if saved is not None and saved.is_file() else "alpaca")


def _stamp(folder: Path) -> tuple[int, ...]:
    """Modification times of the weight and config files, so a rewritten folder is reloaded."""
    files = sorted(folder.glob("*.safetensors")) + [folder / art.ADAPTER_CONFIG, folder / "config.json"]
    return tuple(f.stat().st_mtime_ns for f in files if f.is_file())


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_folder(folder: str, quantization: str | None, compute_dtype: str, base_model: str | None,
                 stamp: tuple[int, ...]) -> tuple[Any, Any, PromptTemplate]:
    """Load a merged/plain model folder or an adapter folder on its base (cached by path and settings)."""
    from alpaca_lora.model import load_model, load_tokenizer

    path = Path(folder)
    if art.is_run_folder(path):
        from peft import PeftModel

        if not (path / art.ADAPTER_WEIGHTS).is_file():  # peft would fall back to a pickled adapter_model.bin
            pickles = [p.name for p in art.pickle_files(path)]
            raise ModelError(f"{path} holds no {art.ADAPTER_WEIGHTS}" + (f" (only {pickles})" if pickles else "")
                             + "; only safetensors weights are loaded, since a pickle file can run code when "
                             "read. Re-save the adapter with save_pretrained(safe_serialization=True)")
        base = _adapter_base(path, base_model)
        model, _ = load_model(base, quantization, compute_dtype)
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(path if has_tokenizer else base)
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    elif (path / "config.json").is_file():
        model, tokenizer = load_model(path, quantization, compute_dtype)
    else:
        raise ModelError(f"{path} holds neither config.json (a model) nor {art.ADAPTER_CONFIG} (an adapter); "
                         "pass the output folder of merge() or finetune()")
    return model.eval(), tokenizer, _folder_template(path)


def _adapter_base(folder: Path, base_model: str | None) -> Path:
    """The base an adapter folder records (refused if it differs from the fingerprint), or ``base_model``."""
    _, base, diffs = art.resolve_adapter_base(folder, base_model)
    if diffs:
        raise ModelError(f"the base {base} is not the model the adapter in {folder} was trained on "
                         f"({'; '.join(diffs)}); pass the original as base_model=")
    return base


# ---- generation ------------------------------------------------------------------------------------


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


def _generate_batches(model: Any, tokenizer: Any, prompts: list[list[int]], kwargs: dict[str, Any],
                      batch_size: int) -> list[str]:
    # Longest first, so each batch holds prompts of similar length (less padding); order restored.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, str] = {}
    with _EvalMode(model), torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = _left_pad([prompts[i] for i in idx], kwargs["pad_token_id"], model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # (B, T + new)
            for i, row in zip(idx, out[:, ids.shape[1]:], strict=True):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [texts[i] for i in range(len(prompts))]


def _stream(model: Any, tokenizer: Any, prompt: list[int], kwargs: dict[str, Any]) -> Iterator[str]:
    """Yield text pieces while a background thread generates; pieces join to the stripped response."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids, mask = _left_pad([prompt], kwargs["pad_token_id"], model.device)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kwargs)
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
