"""partition.py: every rule is deterministic, its shards disjoint, and non-IID ones skewed as asked."""

from __future__ import annotations

import pytest
import torch

from smolcluster.config import load_config
from smolcluster.datasets import Split
from smolcluster.errors import ConfigError, DataError
from smolcluster.partition import by_label, dirichlet, histogram, labels_of, layout, partition, shares


def _labels(n: int = 3000, classes: int = 10) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(0))


def _disjoint(shards: list[torch.Tensor], n: int) -> None:
    everything = torch.cat(shards)
    assert len(everything.unique()) == len(everything), "a sample is in two shards"
    assert everything.min() >= 0 and everything.max() < n


@pytest.mark.parametrize("rule", ["dirichlet-0.1", "dirichlet-1", "dirichlet-100", "shards-2", "shares"])
def test_each_rule_is_deterministic_disjoint_and_seed_dependent(rule):
    labels = _labels()

    def make(seed: int) -> list[torch.Tensor]:
        if rule.startswith("dirichlet"):
            return dirichlet(labels, 4, float(rule.split("-")[1]), seed, min_size=16)
        if rule.startswith("shards"):
            return by_label(labels, 4, 2, seed)
        return shares(len(labels), [2, 1, 1, 0.5], seed)

    a, b, other = make(42), make(42), make(43)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, other))
    _disjoint(a, len(labels))
    assert len(a) == 4 and min(len(s) for s in a) >= 16


def test_small_alpha_concentrates_each_worker_on_few_classes_and_large_alpha_spreads_them():
    labels = _labels(6000)

    def top_class_share(alpha: float) -> float:
        shards = dirichlet(labels, 4, alpha, 42, min_size=16)
        return sum(float(torch.bincount(labels[s], minlength=10).max()) / len(s) for s in shards) / 4

    # IID: each class is ~10% of a shard; alpha 0.1 gives each class mostly to one worker
    assert top_class_share(0.1) > 0.3 > 0.15 > top_class_share(100.0)


def test_shards_give_each_worker_about_labels_per_worker_classes():
    labels = _labels(4000, classes=4)  # ~1000 a class: 8 pieces of 500 lie within one or two classes each
    for shard in by_label(labels, 4, 2, 42):
        top2 = torch.bincount(labels[shard], minlength=4).sort(descending=True).values[:2].sum()
        assert top2 >= 0.8 * len(shard)
    assert sum(len(s) for s in by_label(labels, 4, 2, 42)) == 4000


def test_shares_size_the_shards_and_scale_the_batches_in_sync_and_the_local_steps_in_local_modes():
    train = Split(torch.zeros(1200, 3), _labels(1200))
    cfg = load_config(overrides=["cluster.num_workers=3", "dataset.name=synthetic", "dataset.shares=[2, 1, 1]",
                                 "training.batch_size=10"])
    plan = layout(cfg, train, "classify")
    assert [len(s) for s in plan.shards] == [600, 300, 300]
    assert plan.batches == [15, 8, 8] and plan.local_steps == [1, 1, 1]
    assert plan.steps_per_epoch == 39  # ceil(1200 / 31)
    local = layout(cfg.replace("training", algorithm="local_sgd", local_steps=4), train, "classify")
    assert local.batches == [10, 10, 10] and local.local_steps == [6, 3, 3]


def test_equal_iid_shards_are_the_documented_rule():
    from smolcluster.data import partition as iid

    train = Split(torch.zeros(1000, 3), _labels(1000))
    cfg = load_config(overrides=["cluster.num_workers=3", "dataset.name=synthetic"])
    plan = layout(cfg, train, "classify")
    assert all(torch.equal(a, b) for a, b in zip(plan.shards, iid(1000, 3, 42)))
    assert plan.batches == [32] * 3 and plan.steps_per_epoch == 11  # ceil(333 / 32)


@pytest.mark.parametrize("overrides, says", [
    (["dataset.shares=[1, 1]"], "dataset.shares: 2 shares for 3 workers"),
    (["dataset.partition=dirichlet", "dataset.shares=[1, 1, 1]"], "shares: sizes the shards of the iid partition"),
    (["dataset.shares=[1, 0, 1]"], "shares: expected a list of positive numbers"),
    (["dataset.alpha=0"], "alpha: expected a number > 0"),
])
def test_bad_partition_keys_are_config_errors_naming_the_key(overrides, says):
    train = Split(torch.zeros(300, 3), _labels(300))
    with pytest.raises(ConfigError, match=says):
        cfg = load_config(overrides=["cluster.num_workers=3", "dataset.name=synthetic", *overrides])
        partition(cfg.dataset, train, 3, 42, "classify")


def test_a_label_partition_of_a_language_models_data_is_refused():
    cfg = load_config(overrides=["dataset.name=synthetic", "dataset.partition=shards"])
    with pytest.raises(ConfigError, match="dataset.partition: shards splits by class label"):
        partition(cfg.dataset, Split(torch.zeros(10, 3), torch.zeros(10, dtype=torch.int64)), 2, 42, "lm")


def test_an_alpha_too_small_for_the_workers_is_a_clear_error():
    with pytest.raises(DataError, match="raise alpha or use fewer workers"):
        dirichlet(_labels(100, classes=2), 8, 0.01, 42, min_size=16)


def test_labels_come_from_memory_or_item_by_item_and_histograms_skip_absent_classes():
    from torch.utils.data import Subset

    split = Split(torch.zeros(5, 2), torch.tensor([3, 1, 3, 3, 0]))
    assert torch.equal(labels_of(Subset(split, [0, 2, 4])), torch.tensor([3, 3, 0]))

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int):
            return torch.zeros(2), i % 2

    assert labels_of(Items()).tolist() == [0, 1, 0]
    assert histogram(torch.tensor([3, 1, 3, 3, 0]), 5) == "0:1 1:1 3:3"
