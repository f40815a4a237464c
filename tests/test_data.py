"""The partition rule and the shipped MNIST."""

from __future__ import annotations

import hashlib
import gzip

import pytest
import torch

from smolcluster import data
from smolcluster.config import DatasetConfig


@pytest.mark.parametrize("n, workers", [(60000, 2), (60000, 3), (1001, 4), (7, 7), (10, 3)])
def test_partitions_are_disjoint_equal_and_cover_all_but_the_remainder(n, workers):
    shards = data.partition(n, workers, seed=42)
    assert len(shards) == workers
    assert {len(s) for s in shards} == {n // workers}
    union = torch.cat(shards)
    assert len(set(union.tolist())) == len(union) == n - n % workers
    assert set(union.tolist()) <= set(range(n))


def test_partition_depends_on_seed_only_and_is_stable():
    a, b, c = data.partition(1000, 2, 1), data.partition(1000, 2, 1), data.partition(1000, 2, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_partition_rule_matches_its_documentation():
    """The docstring's rule, re-derived with nothing but the standard library."""
    import random

    rng = random.Random("smolcluster-partition:7")
    draws = [rng.random() for _ in range(10)]
    perm = sorted(range(10), key=lambda i: draws[i])
    shards = data.partition(10, 3, seed=7)
    assert [s.tolist() for s in shards] == [perm[0:3], perm[3:6], perm[6:9]]


def test_epoch_order_is_a_permutation_that_changes_with_epoch_and_worker():
    orders = {(e, k): data.epoch_order(100, 42, e, k) for e in (0, 1) for k in (1, 2)}
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(100))
    assert len({tuple(o.tolist()) for o in orders.values()}) == 4


def test_steps_per_epoch_keeps_the_last_partial_batch():
    assert data.steps_per_epoch(60000, 2, 32) == 938  # 30000 / 32 = 937.5
    assert data.steps_per_epoch(512, 2, 16) == 16


def test_shipped_mnist_is_the_real_thing():
    cfg = DatasetConfig()
    root = data.mnist_root(cfg)
    expected = {"train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
                "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637"}
    for name, md5 in expected.items():
        assert hashlib.md5(gzip.open(root / name).read()).hexdigest() == md5
    test = data.load_split(cfg, "test", 0)
    assert test.x.shape == (10000, 1, 28, 28)
    counts = torch.bincount(test.y, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(float(test.x.mean())) < 0.1  # normalised
    assert data.split_size(cfg, "train") == 60000


def test_loading_a_subset_keeps_only_those_samples():
    cfg = DatasetConfig(test_size=100)
    full = data.load_split(cfg, "test", 0)
    idx = torch.tensor([5, 0, 99])
    sub = data.load_split(cfg, "test", 0, indices=idx)
    assert torch.equal(sub.x, full.x[idx]) and torch.equal(sub.y, full.y[idx])


def test_missing_mnist_says_where_it_looked(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.load_split(DatasetConfig(root=str(tmp_path)), "test", 0)


def test_synthetic_data_is_deterministic_and_shaped_like_mnist():
    a = data.load_split(DatasetConfig(name="synthetic"), "train", 3)
    b = data.load_split(DatasetConfig(name="synthetic"), "train", 3)
    assert a.x.shape == (4096, 1, 28, 28) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
