"""batches(): in memory it is plain indexing; otherwise a background thread reads ahead, and must
yield exactly the same batches, raise a reading error where it belongs, and stop when closed."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.utils.data import Dataset

from smolcluster import data
from smolcluster.prefetch import Prefetcher, batches


class ItemByItem(Dataset):
    """A Split's samples without batch(): read one __getitem__ at a time, as a user's dataset is."""

    def __init__(self, split: data.Split, fail_at: int = -1, delay: float = 0.0) -> None:
        self.split, self.fail_at, self.delay, self.reads = split, fail_at, delay, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise OSError(f"sample {i} is unreadable")
        self.reads += 1
        time.sleep(self.delay)
        return self.split.x[i], int(self.split.y[i])


@pytest.fixture(scope="module")
def split() -> data.Split:
    return data.load_data(data.DatasetConfig(name="synthetic", train_size=256, test_size=8), 0).train


def order(n: int, batch: int) -> list[torch.Tensor]:
    return list(data.epoch_order(n, 0, 0, 1).split(batch))


def test_in_memory_batches_are_plain_indexing(split):
    got = list(batches(split, order(len(split), 50)))
    assert not isinstance(batches(split, []), Prefetcher)
    for (x, y), idx in zip(got, order(len(split), 50), strict=True):
        assert torch.equal(x, split.x[idx]) and torch.equal(y, split.y[idx])


def test_prefetched_batches_equal_the_in_memory_ones(split):
    expected = list(batches(split, order(len(split), 50)))
    got = batches(ItemByItem(split), order(len(split), 50))
    assert isinstance(got, Prefetcher)
    got = list(got)
    assert len(got) == len(expected) == 6  # the last one smaller
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey) and y.dtype == torch.int64


def test_a_reading_error_is_raised_at_its_batch(split):
    it = batches(ItemByItem(split, fail_at=int(order(len(split), 50)[1][3])), order(len(split), 50))
    next(it)
    with pytest.raises(OSError, match="unreadable"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_it_reads_at_most_a_few_batches_ahead_and_stops_when_closed(split):
    slow = ItemByItem(split, delay=0.001)
    it = batches(slow, order(len(split), 10), ahead=2)
    next(it)
    time.sleep(0.3)
    assert slow.reads <= 10 * (1 + 2 + 1)  # the one taken, two queued, one being read
    it.close()
    deadline = time.monotonic() + 2
    while any(t.name == "smolcluster-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "smolcluster-prefetch" for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(it)


def test_dropping_the_iterator_stops_its_thread(split):
    import gc

    it = batches(ItemByItem(split), order(len(split), 10))
    next(it)
    del it
    gc.collect()
    deadline = time.monotonic() + 2
    while any(t.name == "smolcluster-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "smolcluster-prefetch" for t in threading.enumerate())
