"""New tokens: added to the tokenizer, given embedding rows, and trained as those rows only.

``FinetuneConfig.add_tokens`` (a domain's words, markers) and ``special_tokens`` (a chat format's
markers, kept whole and skipped by ``skip_special_tokens``) grow the vocabulary:

1. :func:`add_to_tokenizer` adds them; tokens the vocabulary already holds are skipped and reported.
2. :func:`init_new_rows` grows the input embedding (and an untied ``lm_head``) to the tokenizer and
   sets each new row to the mean of the existing rows, as Stanford Alpaca's
   ``smart_tokenizer_and_embedding_resize`` does: a new token starts as an average token, not as noise.
3. :func:`peft_settings` tells peft to train those rows alone beside LoRA
   (``LoraConfig.trainable_token_indices``; a tied ``lm_head`` follows the embedding), so the adapter
   holds only the new rows (``trainable_tokens_delta``); or, with ``new_token_training="full"``, the
   whole embedding and output layer (``modules_to_save``).

Loading such an adapter unmerged needs the base grown to the adapter's tokenizer first
(:func:`grow_to_tokenizer`); ``merge()`` writes the grown matrices and ``vocab_size``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class NewTokens:
    """What :func:`add_to_tokenizer` did.

    Attributes:
        ids: The ids of the tokens added, in order (regular ones first, then special ones).
        skipped: Tokens already in the vocabulary (nothing to add; their rows are trained as before: not at all).
        old_size: The tokenizer's length before.

    """

    ids: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    old_size: int = 0

    def summary(self) -> str:
        """One line for the preflight summary."""
        text = f"{len(self.ids)} added (ids {self.ids[0]}..{self.ids[-1]})" if self.ids else "none added"
        if self.skipped:
            shown_ = ", ".join(repr(t) for t in self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            text += f"; {len(self.skipped)} already in the vocabulary, skipped: {shown_}"
        return text


def add_to_tokenizer(tokenizer: Any, add_tokens: list[str] | None, special_tokens: list[str] | None) -> NewTokens:
    """Add ``add_tokens`` (regular) and ``special_tokens`` to ``tokenizer`` in place; report what was skipped."""
    result = NewTokens(old_size=len(tokenizer))
    vocab = tokenizer.get_vocab()
    regular = [t for t in add_tokens or [] if t not in vocab]
    special = [t for t in special_tokens or [] if t not in vocab]
    result.skipped = [t for t in [*(add_tokens or []), *(special_tokens or [])] if t in vocab]
    if regular:
        tokenizer.add_tokens(regular)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    result.ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in [*regular, *special]]
    if result.skipped:
        logger.warning("new tokens already in the vocabulary, skipped: %s", result.skipped)
    return result


@torch.no_grad()
def init_new_rows(model: Any, tokenizer: Any, new: NewTokens) -> None:
    """Grow the embedding (and an untied output layer) to ``tokenizer``; set the new rows to the mean row."""
    if not new.ids:
        return
    grow_to_tokenizer(model, tokenizer)
    layers = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not layers[0].weight:
        layers.append(head)
    ids = torch.tensor(new.ids)
    for layer in layers:
        w = layer.weight
        known = w[: min(new.old_size, int(ids.min()))]  # the rows of the tokens there were before
        w[ids.to(w.device)] = known.float().mean(0).to(w.dtype)


def grow_to_tokenizer(model: Any, tokenizer: Any) -> bool:
    """Resize the model's embedding rows to the tokenizer's length when it is longer; whether it did."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return True


def peft_settings(model: Any, new: NewTokens, mode: str = "rows") -> dict[str, Any]:
    """The ``LoraConfig`` fields that train ``new``'s rows: {} when there are none.

    ``mode="rows"``: ``trainable_token_indices`` for the embedding and an untied output layer (a tied one
    follows the embedding). ``mode="full"``: ``modules_to_save`` with those layers whole, the tie kept
    (``ensure_weight_tying``).
    """
    if not new.ids:
        return {}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is embedding.weight
    layers = [embedding] + ([] if tied else [head])
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules() if any(m is layer for layer in layers)}
    if mode == "full":
        return {"modules_to_save": [names[layer] for layer in layers], "ensure_weight_tying": tied}
    return {"trainable_token_indices": {names[layer]: list(new.ids) for layer in layers}}
