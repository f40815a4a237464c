"""The partition rule, the holdout, load_data and the shipped MNIST."""

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


# --- load_data, holdout, and what the wrappers keep working -------------------------------------


def test_load_data_gives_mnist_with_its_meta_and_the_first_n():
    d = data.load_data(DatasetConfig(train_size=300, test_size=50), 0)
    assert (len(d.train), len(d.test)) == (300, 50) and isinstance(d.train, data.Split)
    assert (d.meta.task, d.meta.classes, d.meta.input_shape, d.meta.vocab) == ("classify", 10, (1, 28, 28), None)
    x, y = d.train[torch.tensor([4, 2])]  # fancy-indexable, as the worker uses it
    assert x.shape == (2, 1, 28, 28) and torch.equal(y, d.train.y[torch.tensor([4, 2])])
    old = data.load_split(DatasetConfig(train_size=300), "train", 0)
    assert torch.equal(old.x, d.train.x) and data.split_size(DatasetConfig(train_size=300), "train") == 300


def test_the_wrappers_serve_any_dataset_as_tensors(tmp_path):
    (tmp_path / "t.csv").write_text("f,label\n" + "".join(f"{i},{i % 2}\n" for i in range(50)))
    cfg = DatasetConfig(name="csv", path=str(tmp_path / "t.csv"), label_column="label")
    assert data.split_size(cfg, "train") == 45 and data.split_size(cfg, "test") == 5
    shard = data.partition(45, 2, 0)[0]
    part = data.load_split(cfg, "train", 0, indices=shard)
    assert torch.equal(part.x, data.load_data(cfg, 0).train.x[shard])


def test_mnist_runs_never_import_torchvision():
    import subprocess
    import sys

    code = ("import sys, torch; from smolcluster import data, prefetch, augment; from smolcluster.config import DatasetConfig; "
            "d = data.load_data(DatasetConfig(train_size=64, test_size=64), 0); "
            "list(prefetch.batches(d.train, [torch.arange(8)])); "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("size, fraction", [(30000, 0.1), (7, 0.5), (10, 0.01), (5, 0.0)])
def test_holdout_is_deterministic_disjoint_and_covers_the_shard(size, fraction):
    shard = data.partition(size * 2, 2, seed=3)[1]
    train, val = data.holdout(shard, fraction, seed=3, worker_id=2)
    again = data.holdout(shard, fraction, seed=3, worker_id=2)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert len(val) == (0 if fraction == 0 else max(1, round(size * fraction)))
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == sorted(shard.tolist())
    assert len(train) == data.train_shard_size(size * 2, 2, fraction)
    if fraction:
        assert not torch.equal(val, data.holdout(shard, fraction, seed=3, worker_id=1)[1])


def test_holdout_follows_its_documented_rule():
    import random

    shard = torch.tensor([50, 10, 40, 20, 30, 60, 0, 70, 80, 90])
    rng = random.Random("smolcluster-holdout:9:3")
    draws = [rng.random() for _ in range(10)]
    perm = sorted(range(10), key=lambda i: draws[i])
    train, val = data.holdout(shard, 0.2, seed=9, worker_id=3)
    assert val.tolist() == shard[sorted(perm[:2])].tolist() and train.tolist() == shard[sorted(perm[2:])].tolist()


def test_steps_per_epoch_counts_only_the_samples_trained_on():
    assert data.steps_per_epoch(60000, 2, 32, validation_split=0.1) == 844  # 27000 / 32 = 843.75
    with pytest.raises(data.DataError, match="leaves nothing to train on"):
        data.holdout(torch.tensor([1]), 0.5, 0, 1)
