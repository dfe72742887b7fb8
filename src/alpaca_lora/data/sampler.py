"""Which records go into which micro-batch: a pure function of (seed, epoch), so resume is exact.

The work is in numpy over one index array, so an epoch of a million records takes a fraction of a
second and no Python list of every index; :class:`MicroBatches` cuts a micro-batch out on access.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import torch

MEGA_BATCH = 50  # micro-batches per length-sorted group (group_by_length)


class MicroBatches(Sequence[list[int]]):
    """The micro-batches of one epoch: item ``k`` is the list of record indices of micro-batch ``k``.

    A read-only sequence over one index array: ``len``, indexing (a ``list`` of Python ints), slicing
    (a ``list`` of those), iteration and ``==`` with another sequence of batches, as a list of lists has.

    Args:
        order: Every record index once, in training order (int64, shape ``(N,)``).
        size: Records per micro-batch (the last one may be smaller).

    """

    def __init__(self, order: np.ndarray, size: int) -> None:
        self.order, self.size = order, size

    def __len__(self) -> int:
        """Return the number of micro-batches, ``ceil(N / size)``."""
        return -(-len(self.order) // self.size)

    @overload
    def __getitem__(self, index: int) -> list[int]: ...

    @overload
    def __getitem__(self, index: slice) -> list[list[int]]: ...

    def __getitem__(self, index: int | slice) -> list[int] | list[list[int]]:
        """Return micro-batch ``index`` as a list of ints, or a list of them for a slice."""
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        k = operator.index(index)
        k += len(self) if k < 0 else 0
        if not 0 <= k < len(self):
            raise IndexError(f"micro-batch {index} of {len(self)}")
        return self.order[k * self.size : (k + 1) * self.size].tolist()

    def __eq__(self, other: Any) -> bool:
        """Whether ``other`` holds the same micro-batches (another MicroBatches or a list of lists)."""
        if isinstance(other, MicroBatches) and other.size == self.size:
            return bool(np.array_equal(self.order, other.order))
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == list(b) for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal by content, like a list

    def __repr__(self) -> str:
        """Return e.g. ``MicroBatches(250 micro-batches of 4 records)``."""
        return f"MicroBatches({len(self)} micro-batches of {self.size} records)"


def epoch_batches(
    lengths: Sequence[int] | np.ndarray, micro_batch_size: int, seed: int, epoch: int, group_by_length: bool = False
) -> MicroBatches:
    """Return the micro-batches (lists of record indices) of one epoch.

    The order is a seeded permutation that depends only on ``seed`` and ``epoch``, so a resumed
    run can recompute exactly the batches it has not trained on yet. With ``group_by_length`` the
    permutation is cut into mega-batches of 50 micro-batches, each sorted by length (longest
    first, ties in permutation order), which cuts padding while keeping batches shuffled across the epoch.

    Args:
        lengths: Token length of every record: a list, or a numpy array (cheaper for many records).
        micro_batch_size: Records per micro-batch (the last one may be smaller).
        seed: Run seed.
        epoch: Zero-based epoch index.
        group_by_length: Put records of similar length together.

    Returns:
        ``ceil(len(lengths) / micro_batch_size)`` lists of indices covering every record once.

    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).numpy()  # (N,) int64
    if group_by_length:
        negative = -np.asarray(lengths, dtype=np.int64)[order]  # (N,) in permutation order
        mega = np.arange(len(order)) // (micro_batch_size * MEGA_BATCH)  # (N,) mega-batch of each position
        # lexsort sorts by the last key first and is stable: by mega-batch, then longest first, ties kept in
        # permutation order, exactly what a stable sort of each mega-batch by -length gives.
        order = order[np.lexsort((negative, mega))]
    return MicroBatches(order, micro_batch_size)


def steps_per_epoch(num_records: int, micro_batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (a last partial accumulation still makes a step)."""
    return math.ceil(math.ceil(num_records / micro_batch_size) / accumulation)
