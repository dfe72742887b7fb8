"""A transformers tokenizer as GGUF metadata: vocabulary, merges, special ids and the chat template.

Two vocabularies of the Llama family are written:

- byte-level BPE (Llama 3, SmolLM2; ``tokenizer.ggml.model = "gpt2"``): tokens and merges as in
  ``tokenizer.json``, with the pre-tokenizer named by llama.cpp's ``tokenizer.ggml.pre``. The name is
  read off the pre-tokenizer's structure (:data:`PRE_TOKENIZERS`); one llama.cpp does not know is refused,
  because llama.cpp would split text another way and the model would read other tokens than in training.
- SentencePiece-style BPE with byte fallback (Llama 2; ``"llama"``): tokens with scores that rank the
  merges (llama.cpp merges the highest-scored pair first) and ``<0xNN>`` byte tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpaca_lora.errors import ModelError, shown

logger = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types

# tokenizer.json pre-tokenizers (as a structural key) -> llama.cpp's tokenizer.ggml.pre
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {
    "bytelevel": "gpt-2",
    "digits+bytelevel": "smollm",
    f"split:{LLAMA3_SPLIT}+bytelevel-noregex": "llama-bpe",
}


@dataclass
class Vocab:
    """The tokenizer as GGUF holds it."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/eot -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None


def read_vocab(tokenizer: Any, vocab_size: int, chat_template: str | None, where: Path) -> Vocab:
    """The GGUF form of ``tokenizer`` (a fast transformers tokenizer) for an embedding of ``vocab_size`` rows.

    Rows beyond the tokenizer's tokens (embeddings padded to a multiple of 64) get unused ``[PAD<i>]``
    tokens, as llama.cpp expects one token per row.

    Raises:
        ModelError: A slow tokenizer, a vocabulary larger than the embedding, an unsupported tokenizer
            model or pre-tokenizer.

    """
    from alpaca_lora.data.chat import end_of_turn_ids

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"the tokenizer in {where} is not a fast tokenizer (no tokenizer.json); GGUF export reads "
                         "tokenizer.json. Save the tokenizer with transformers' AutoTokenizer (use_fast=True)")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    n = len(tokenizer)
    if n > vocab_size:
        raise ModelError(f"the tokenizer in {where} has {n} tokens but the embedding only {vocab_size} rows; the "
                         "tokenizer does not belong to these weights")
    if model.get("type") != "BPE":
        raise ModelError(f"the tokenizer in {where} is a {shown(model.get('type'))} model; GGUF export writes BPE "
                         "vocabularies (byte-level as in Llama 3 and SmolLM2, or with byte fallback as in Llama 2)")
    spm = bool(model.get("byte_fallback"))
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    if any(t is None for t in tokens):
        raise ModelError(f"the tokenizer in {where} has gaps in its token ids; it cannot be written as GGUF")
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    types = [_token_type(t, added, spm, tokenizer.unk_token) for t in tokens]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [UNUSED] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    vocab = Vocab(
        model="llama" if spm else "gpt2", pre=None if spm else _pre_name(data, where), tokens=tokens, types=types,
        scores=_merge_scores(tokens, merges) if spm else None, merges=[] if spm else merges,
        add_bos=len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id,
        add_eos=len(ids) > len(plain) and ids[-1] == tokenizer.eos_token_id,
        add_space_prefix=spm and _prepends_space(data), chat_template=chat_template)
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{key}_token_id", None)
        if isinstance(value, int):
            vocab.special[key] = value
    eot = end_of_turn_ids(tokenizer, chat_template) if chat_template else []
    if eot and eot[0] != vocab.special.get("eos"):
        vocab.special["eot"] = eot[0]
    return vocab


def _token_type(token: str, added: dict[str, bool], spm: bool, unk: str | None) -> int:
    if token in added:
        return CONTROL if added[token] else USER_DEFINED
    if token == unk:
        return UNKNOWN
    if spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return BYTE
    return NORMAL


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Scores that make llama.cpp's SentencePiece merge order the BPE merge order (first merge scores highest)."""
    rank = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), i)
    return [-float(rank[t]) - 1.0 if t in rank else 0.0 for t in tokens]


def _prepends_space(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts '▁' before the text (a Prepend normalizer or a Metaspace that prepends)."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text


def _pre_name(data: dict[str, Any], where: Path) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer of ``tokenizer.json``; unknown ones are refused."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    keys = []
    for p in parts:
        kind = p.get("type")
        if kind == "ByteLevel":
            keys.append("bytelevel" if p.get("use_regex", True) else "bytelevel-noregex")
        elif kind == "Digits" and p.get("individual_digits"):
            keys.append("digits")
        elif kind == "Split" and isinstance(p.get("pattern"), dict) and "Regex" in p["pattern"]:
            keys.append(f"split:{p['pattern']['Regex']}")
        else:
            keys.append(json.dumps(p, sort_keys=True))
    key = "+".join(keys)
    if key not in PRE_TOKENIZERS:
        raise ModelError(f"the pre-tokenizer of the tokenizer in {where} ({shown(key, 200)}) is not one GGUF export "
                         f"knows how llama.cpp reproduces (GPT-2, SmolLM, Llama 3); llama.cpp would split text "
                         "differently from training. Convert this model with llama.cpp's convert_hf_to_gguf.py")
    return PRE_TOKENIZERS[key]


def add_vocab(writer: Any, vocab: Vocab) -> None:
    """Write ``vocab`` into a ``gguf.GGUFWriter`` (before its header is written)."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for key, value in vocab.special.items():
        adders[key](value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
