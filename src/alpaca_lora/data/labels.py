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
