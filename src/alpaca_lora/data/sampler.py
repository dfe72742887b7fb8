"""Which records go into which micro-batch: a pure function of (seed, epoch), so resume is exact."""

from __future__ import annotations

import math

import torch


def epoch_batches(
    lengths: list[int], micro_batch_size: int, seed: int, epoch: int, group_by_length: bool = False
) -> list[list[int]]:
    """Return the micro-batches (lists of record indices) of one epoch.

    The order is a seeded permutation that depends only on ``seed`` and ``epoch``, so a resumed
    run can recompute exactly the batches it has not trained on yet. With ``group_by_length`` the
    permutation is cut into mega-batches of 50 micro-batches, each sorted by length (longest
    first), which cuts padding while keeping batches shuffled across the epoch.

    Args:
        lengths: Token length of every record.
        micro_batch_size: Records per micro-batch (the last one may be smaller).
        seed: Run seed.
        epoch: Zero-based epoch index.
        group_by_length: Put records of similar length together.

    Returns:
        ``ceil(len(lengths) / micro_batch_size)`` lists of indices covering every record once.

    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        mega = micro_batch_size * 50
        grouped: list[int] = []
        for start in range(0, len(order), mega):
            grouped.extend(sorted(order[start : start + mega], key=lambda i: -lengths[i]))
        order = grouped
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def steps_per_epoch(num_records: int, micro_batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (a last partial accumulation still makes a step)."""
    return math.ceil(math.ceil(num_records / micro_batch_size) / accumulation)
