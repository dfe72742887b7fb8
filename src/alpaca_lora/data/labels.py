"""The label that takes no loss, and how many positions of a batch do take one."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Label of a position that takes no loss (prompt tokens, padding, a packed record's first token).

The value is PyTorch's ``cross_entropy`` default ``ignore_index`` and what transformers' models skip.
"""


def count_label_tokens(labels: torch.Tensor) -> int:
    """Positions of a ``(B, T)`` label batch that get a loss: ``labels[:, 1:] != IGNORE_INDEX``.

    Position t predicts token t+1, so the first label of each row is never a target (the causal shift
    drops it); this is the count the loss functions divide by.

    Args:
        labels: ``(B, T)`` label ids, :data:`IGNORE_INDEX` where no loss is taken.

    Returns:
        The number of label positions after the shift.

    """
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def record_label_tokens(labels: list[int]) -> int:
    """The positions of one tokenized record that get a loss: :func:`count_label_tokens` of a single row.

    Summed over a micro-batch's records this equals ``count_label_tokens`` of the collated batch,
    padded or packed (a packed record's first label is :data:`IGNORE_INDEX`).
    """
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)
