"""The numpy sampler draws exactly the batches of the list-based one it replaced, and scales to a million records."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from alpaca_lora.data.sampler import MicroBatches, epoch_batches


def reference_batches(lengths, micro_batch_size, seed, epoch, group_by_length=False):
    """The sampler as it was: Python lists and a stable sort of each mega-batch by -length."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        mega = micro_batch_size * 50
        grouped = []
        for start in range(0, len(order), mega):
            grouped.extend(sorted(order[start : start + mega], key=lambda i: -lengths[i]))
        order = grouped
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize(("n", "size"), [(0, 4), (1, 4), (7, 1), (103, 4), (1000, 3), (5003, 8)])
def test_the_same_batches_as_the_list_sampler(n, size, group):
    rng = np.random.default_rng(n + size)
    # few distinct lengths: many ties, which must keep the permutation's order as the stable sort did
    for lengths in (rng.integers(1, 9, n).tolist(), rng.integers(1, 4000, n).tolist()):
        for seed, epoch in ((0, 0), (3, 1), (42, 7)):
            expected = reference_batches(lengths, size, seed, epoch, group)
            for given in (lengths, np.asarray(lengths, dtype=np.int32)):
                batches = epoch_batches(given, size, seed, epoch, group)
                assert len(batches) == len(expected)
                assert list(batches) == expected and batches == expected
                assert all(type(i) is int for b in batches for i in b)  # Python ints: Dataset indexing, JSON


def test_batches_act_as_the_list_of_lists_the_trainer_slices():
    lengths = list(range(1, 104))
    batches = epoch_batches(lengths, 4, seed=3, epoch=0, group_by_length=True)
    expected = reference_batches(lengths, 4, 3, 0, True)
    assert batches[2:5] == expected[2:5] and batches[-1] == expected[-1] and batches[::7] == expected[::7]
    assert batches[np.int64(1)] == expected[1]
    with pytest.raises(IndexError):
        batches[len(expected)]
    assert sum(lengths[i] for b in batches[:3] for i in b) == sum(lengths[i] for b in expected[:3] for i in b)
    assert batches == epoch_batches(lengths, 4, seed=3, epoch=0, group_by_length=True)
    assert epoch_batches(lengths, 4, seed=3, epoch=0) != epoch_batches(lengths, 4, seed=3, epoch=1)
    assert isinstance(batches, MicroBatches) and repr(batches) == "MicroBatches(26 micro-batches of 4 records)"


def test_a_million_records_in_well_under_a_second_without_a_list_of_every_index():
    lengths = np.random.default_rng(0).integers(1, 2048, 1_000_000, dtype=np.int64)
    epoch_batches(lengths[:1000], 8, seed=0, epoch=0, group_by_length=True)  # warm up torch and numpy
    for group in (False, True):
        tracemalloc.start()
        start = time.perf_counter()
        batches = epoch_batches(lengths, 8, seed=1, epoch=2, group_by_length=group)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < 0.6, f"{elapsed:.2f} s"
        # A list of a million ints alone takes 8 MB of pointers plus 28 MB of ints; numpy's arrays (a few
        # 8 MB ones at once) are traced too, so the bound tells them apart only by the Python objects.
        assert peak < 40e6, f"{peak / 1e6:.0f} MB traced"
        assert len(batches) == 125_000 and len(batches[0]) == 8 and len(batches[-1]) == 8
        assert isinstance(batches.order, np.ndarray) and len(batches.order) == 1_000_000
        if group:  # longest first inside each mega-batch of 400 records
            head = lengths[batches.order[:400]]
            assert (np.diff(head) <= 0).all()
