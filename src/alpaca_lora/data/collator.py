"""InstructionCollator: right-pads tokenized records into tensors; labels are padded by position.

Masking happens once, in :func:`alpaca_lora.data.prepare.tokenize_instruction`; this module only pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.errors import ModelError

_KEYS = ("input_ids", "attention_mask", "labels")


class InstructionCollator:
    """Pad a list of tokenized records into ``(B, T)`` ``torch.long`` tensors, on the right.

    ``T`` is the longest record rounded up to ``pad_to_multiple_of``. ``input_ids`` are padded with
    the tokenizer's pad id (its EOS id when it has no pad token), ``attention_mask`` with 0 and
    ``labels`` with -100. Padding is decided BY POSITION, never by comparing ids with the pad id: when
    the pad id equals the EOS id (SmolLM2, Llama-3 setups), comparing ids would mask every real EOS
    and the model would never learn to stop (transformers#23530, trl#976).

    Extra keys (such as ``length``) are ignored; a feature without ``attention_mask`` counts as all
    ones; ``labels`` must be given in every feature or in none (then the batch has no ``labels``).

    Example, with ``pad_id == eos_id == 2`` and ``pad_to_multiple_of=8``::

        features = [
            {"input_ids": [5, 6, 2], "labels": [-100, 6, 2], "attention_mask": [1, 1, 1]},
            {"input_ids": [5, 7, 8, 9, 2], "labels": [-100, -100, 8, 9, 2],
             "attention_mask": [1, 1, 1, 1, 1]},
        ]
        batch = InstructionCollator(tokenizer)(features)
        batch["input_ids"]       # (2, 8)
        # tensor([[5, 6, 2, 2, 2, 2, 2, 2],
        #         [5, 7, 8, 9, 2, 2, 2, 2]])
        batch["attention_mask"]  # (2, 8)
        # tensor([[1, 1, 1, 0, 0, 0, 0, 0],
        #         [1, 1, 1, 1, 1, 0, 0, 0]])
        batch["labels"]          # (2, 8): each real EOS (2) keeps its label, every pad is -100
        # tensor([[-100,    6,    2, -100, -100, -100, -100, -100],
        #         [-100, -100,    8,    9,    2, -100, -100, -100]])

    Args:
        tokenizer: Supplies ``pad_token_id`` (or ``eos_token_id`` as the fallback).
        pad_to_multiple_of: Round the padded length up to a multiple of this (8 suits tensor cores);
            None pads to the longest record only.
        label_pad_token_id: Label of padding positions (ignored by the loss).

    Raises:
        ModelError: The tokenizer has neither a pad nor an EOS token.
        ValueError: ``pad_to_multiple_of`` is not a positive int or None.

    """

    def __init__(
        self, tokenizer: Any, pad_to_multiple_of: int | None = 8, label_pad_token_id: int = IGNORE_INDEX
    ) -> None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(tokenizer, "eos_token_id", None)
        if pad_id is None:
            raise ModelError(
                "the tokenizer has neither a pad token nor an EOS token to pad with; set one, e.g. "
                "tokenizer.pad_token = tokenizer.unk_token"
            )
        m = pad_to_multiple_of
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r}: must be a positive int or None")
        self.pad_token_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_token_id = label_pad_token_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad ``features`` (dicts of equal-length id lists or 1-D tensors) into ``(B, T)`` tensors."""
        if not features:
            raise ValueError("cannot collate an empty list of features")
        with_labels = ["labels" in f for f in features]
        if any(with_labels) and not all(with_labels):
            raise ValueError("some features have 'labels' and some do not; give labels to all or none")
        rows = [self._columns(i, f) for i, f in enumerate(features)]
        longest = max(len(r[0]) for r in rows)
        m = self.pad_to_multiple_of
        width = -(-longest // m) * m if m else longest
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),  # (B, T)
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),  # (B, T)
            "labels": torch.full((len(rows), width), self.label_pad_token_id, dtype=torch.long),  # (B, T)
        }
        for b, columns in enumerate(rows):
            n = len(columns[0])
            for key, values in zip(_KEYS, columns, strict=True):
                batch[key][b, :n] = values  # positions >= n stay padding, whatever their ids
        if not with_labels[0]:
            del batch["labels"]
        return batch

    @staticmethod
    def _columns(index: int, feature: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "input_ids" not in feature:
            raise ValueError(f"feature {index} has no 'input_ids' (keys: {sorted(feature)})")
        ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(feature.get("attention_mask", [1] * len(ids)), dtype=torch.long)
        labels = torch.as_tensor(feature.get("labels", ids), dtype=torch.long)
        if not ids.ndim == mask.ndim == labels.ndim == 1:
            raise ValueError(f"feature {index}: input_ids, attention_mask and labels must be flat int lists")
        if not len(ids) == len(mask) == len(labels):
            raise ValueError(
                f"feature {index} has input_ids of length {len(ids)}, attention_mask of length {len(mask)} "
                f"and labels of length {len(labels)}; they must be equal (tokenize with tokenize_instruction)"
            )
        return ids, mask, labels
