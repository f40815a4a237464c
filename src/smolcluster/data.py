"""Loading a dataset, and the deterministic rules every machine computes for itself.

`load_data(cfg, seed)` gives a `Data` (train and test Datasets plus `DataMeta`); the datasets
themselves are in `smolcluster/datasets/`. The rules below work on sample indices, so they apply
to any dataset (for `text`, the indices are the windows' start positions).

The partition rule (public, and the same on any machine, Python version or torch build):

1. Draw `n` numbers from Python's `random.Random(f"smolcluster-partition:{seed}")` with
   `.random()` (Python guarantees this sequence for a given seed) and stably argsort them: that
   is the dataset permutation.
2. Every worker gets `n // num_workers` samples: worker k (1-based) takes positions
   `(k-1)*s .. k*s-1` of the permutation. The last `n % num_workers` positions are left out
   (the remainder: fewer than `num_workers` samples).
3. With `dataset.validation_split` f > 0, worker k holds out `v = max(1, round(s * f))` samples of
   its shard for validation: the shard positions at the first `v` places of the permutation drawn
   as in 1. from `random.Random(f"smolcluster-holdout:{seed}:{k}")` over `s` items. It trains on
   the other `s - v` (train and validation each in shard order; every worker holds out as many).
4. Each epoch, worker k visits its training samples in the order given by the same kind of draw
   from `random.Random(f"smolcluster-epoch:{seed}:{epoch}:{k}")`, in batches of `batch_size`; the
   last batch of an epoch may be smaller (its gradient is weighted by its size, so nothing is lost).

A file without a separate test file (csv, image_folder; `dataset.test_fraction` f) is split the
same way: of its `n` samples, those at the first `max(1, round(n * f))` places of the permutation
drawn from `random.Random(f"smolcluster-test:{seed}")` are the test set, the rest the training
set, both in file order. `dataset.train_size` / `test_size` then keep the first N of each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import random
from typing import Any

import torch
from torch.utils.data import Dataset

from smolcluster.config import DatasetConfig
from smolcluster.datasets import Data, DataMeta, Split, fetch, first, take
from smolcluster.datasets.mnist import MNIST_FILES, SYNTHETIC_SIZES, load_mnist, mnist_root, mnist_size, synthetic
from smolcluster.errors import DataError

__all__ = [
    "Data", "DataMeta", "Split", "DataError", "load_data", "take", "fetch", "identity", "split_test", "holdout",
    "partition", "epoch_order", "steps_per_epoch", "train_shard_size", "load_split", "split_size",
    "MNIST_FILES", "load_mnist", "mnist_root", "synthetic",
]

LOADERS = {"MNIST": "mnist", "synthetic": "mnist", "csv": "table", "image_folder": "images", "text": "text"}
"""Built-in dataset name -> its module in smolcluster.datasets; anything else is an import path."""
IDENTITY_ITEMS = 64
"""Samples of each split whose bytes go into the identity digest."""
IDENTITY_ALL = 4096
"""A split this small goes into the digest whole (milliseconds), so one changed row is noticed."""


def load_data(cfg: DatasetConfig, seed: int, source: Any = None) -> Data:
    """The dataset `cfg` names (or a Job's `source`: what an import-path dataset may return, or a
    callable returning it): train and test (their first train_size / test_size samples) and meta."""
    if source is not None:
        from smolcluster.datasets import custom

        loaded = custom.coerce(source() if callable(source) else source, "Job.data")
    else:
        module = importlib.import_module(f"smolcluster.datasets.{LOADERS.get(cfg.name, 'custom')}")
        loaded = module.load(cfg, seed)
    train, test = first(loaded.train, cfg.train_size), first(loaded.test, cfg.test_size)
    if not len(train) or not len(test):
        raise DataError(f"dataset {cfg.name}: {len(train)} training and {len(test)} test samples; it needs both")
    meta = dataclasses.replace(loaded.meta, identity=identity(train, test, loaded.meta, seed, cfg.version))
    return Data(train, test, meta)


def identity(train: Dataset, test: Dataset, meta: DataMeta, seed: int, version: str | None = None) -> dict:
    """What the handshake compares: the sizes, and `version` or a sha256 of the meta and the bytes
    of IDENTITY_ITEMS samples of each split chosen by `seed` (milliseconds, however large the data)."""
    out: dict = {"train": len(train), "test": len(test)}
    if version is not None:
        return {**out, "version": version}
    h = hashlib.sha256(json.dumps([meta.task, meta.classes, list(meta.input_shape), meta.vocab]).encode())
    for name, ds in (("train", train), ("test", test)):
        picks = (range(len(ds)) if len(ds) <= IDENTITY_ALL else  # a small dataset: all of it
                 random.Random(f"smolcluster-identity:{seed}:{name}").sample(range(len(ds)), IDENTITY_ITEMS))
        for t in fetch(ds, torch.tensor(sorted(picks), dtype=torch.int64)):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {**out, "sha256": h.hexdigest()}


def _permutation(n: int, key: str) -> torch.Tensor:
    rng = random.Random(key)
    draws = torch.tensor([rng.random() for _ in range(n)], dtype=torch.float64)
    return torch.argsort(draws, stable=True)


def held_out(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, round(n * fraction))


def _cut_off(n: int, count: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rest, first `count` of the permutation drawn from `key`), each ascending."""
    perm = _permutation(n, key)
    return perm[count:].sort().values, perm[:count].sort().values


def split_test(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices of a file of `n` samples without a test file; see the module docstring."""
    count = held_out(n, fraction)
    if count >= n:
        raise DataError(f"cannot split {n} samples into training and test (test_fraction {fraction})")
    return _cut_off(n, count, f"smolcluster-test:{seed}")


def holdout(shard: torch.Tensor, fraction: float, seed: int, worker_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) dataset indices of worker `worker_id`'s shard: disjoint, together the shard."""
    count = held_out(len(shard), fraction)
    if count >= len(shard) > 0:
        raise DataError(f"validation_split {fraction} of a shard of {len(shard)} leaves nothing to train on")
    rest, held = _cut_off(len(shard), count, f"smolcluster-holdout:{seed}:{worker_id}")
    return shard[rest], shard[held]


def eval_subset(dataset: Dataset, samples: int, seed: int) -> Dataset:
    """At most `samples` of `dataset` (0: all), the same ones on every machine and at every
    evaluation: a text set has a million windows, and evaluating all of them every time would
    cost more than the training it measures."""
    if not samples or samples >= len(dataset):
        return dataset
    picks = random.Random(f"smolcluster-eval:{seed}").sample(range(len(dataset)), samples)
    return take(dataset, torch.tensor(sorted(picks), dtype=torch.int64))


def shard_size(n: int, num_workers: int) -> int:
    return n // num_workers


def train_shard_size(n: int, num_workers: int, validation_split: float = 0.0) -> int:
    """Samples each worker trains on: its shard less what `holdout` keeps for validation."""
    s = shard_size(n, num_workers)
    return s - held_out(s, validation_split)


def partition(n: int, num_workers: int, seed: int) -> list[torch.Tensor]:
    """Indices of each worker's shard (list position k-1 is worker k); see the module docstring."""
    if num_workers < 1 or n < num_workers:
        raise DataError(f"cannot split {n} samples over {num_workers} workers")
    perm = _permutation(n, f"smolcluster-partition:{seed}")
    s = shard_size(n, num_workers)
    return [perm[k * s : (k + 1) * s] for k in range(num_workers)]


def epoch_order(size: int, seed: int, epoch: int, worker_id: int) -> torch.Tensor:
    """Worker `worker_id`'s visiting order of its shard positions in `epoch`."""
    return _permutation(size, f"smolcluster-epoch:{seed}:{epoch}:{worker_id}")


def steps_per_epoch(n: int, num_workers: int, batch_size: int, validation_split: float = 0.0) -> int:
    return math.ceil(train_shard_size(n, num_workers, validation_split) / batch_size)


# --- one split as in-memory tensors: for eval, the benchmark's workload and the tests ----------


def load_split(cfg: DatasetConfig, split: str, seed: int, indices: torch.Tensor | None = None) -> Split:
    """The train or test split as in-memory tensors, optionally only the samples at `indices`."""
    if cfg.name in ("MNIST", "synthetic"):  # without the other split, and only the shard as floats
        from smolcluster.datasets import mnist

        return mnist.load_split(cfg, split, seed, indices)
    ds = getattr(load_data(cfg, seed), split)
    if indices is not None:
        ds = take(ds, indices)
    return ds if isinstance(ds, Split) else Split(*fetch(ds, torch.arange(len(ds))))


def split_size(cfg: DatasetConfig, split: str) -> int:
    """Number of samples in a split (MNIST and synthetic without loading the images)."""
    if cfg.name == "MNIST":
        return mnist_size(cfg, split)
    if cfg.name == "synthetic":
        return (cfg.train_size if split == "train" else cfg.test_size) or SYNTHETIC_SIZES[split]
    return len(getattr(load_data(cfg, 0), split))


def sample(split: Split, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A couple of samples: what a device is tried on before training starts (replica.usable_replica)."""
    return fetch(split, torch.arange(min(n, len(split))))
