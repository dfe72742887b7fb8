from alpaca_lora.data.sampler import epoch_batches, steps_per_epoch


def test_epoch_covers_every_record_once_and_is_deterministic():
    lengths = list(range(103))
    batches = epoch_batches(lengths, 4, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == lengths
    assert len(batches) == 26 and len(batches[-1]) == 3
    assert batches == epoch_batches(lengths, 4, seed=3, epoch=0)
    assert batches != epoch_batches(lengths, 4, seed=3, epoch=1)
    assert batches != epoch_batches(lengths, 4, seed=4, epoch=0)


def test_group_by_length_reduces_padding():
    lengths = [(i * 37) % 500 + 1 for i in range(400)]

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    plain = epoch_batches(lengths, 8, seed=0, epoch=0)
    grouped = epoch_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert padded(grouped) < 0.7 * padded(plain)


def test_steps_walk_epochs_like_the_trainer():
    """fit() takes step k of an epoch as micro-batches [k*accum, (k+1)*accum) of that epoch."""
    lengths = [5] * 10
    assert steps_per_epoch(10, 2, 2) == 3  # 5 micro-batches -> 3 steps (last one partial)
    batches = epoch_batches(lengths, 2, seed=0, epoch=0)
    seen = []
    for step in range(3):
        epoch, k = divmod(step, steps_per_epoch(10, 2, 2))
        assert epoch == 0
        seen.extend(i for b in batches[k * 2 : (k + 1) * 2] for i in b)
    assert sorted(seen) == list(range(10))
    assert divmod(3, steps_per_epoch(10, 2, 2))[0] == 1
