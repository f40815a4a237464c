"""Who trains on which samples: IID shards, shares of the data, and non-IID splits by label.

Every machine computes every worker's shard for itself, from the seed and (for the label-based
rules) the training labels, so the rules must be deterministic on any machine. Each returns the
shards as disjoint index tensors, worker k at list position k-1 (iid ones in permutation order,
label-based ones ascending). The rules, public like
the IID rule in data.py (whose permutation `_permutation` they reuse):

- `iid` (default): data.py's rule; with `dataset.shares` (w_1..w_N, normalised to sum 1) worker k
  takes `floor(n * w_k)` consecutive positions of the permutation instead of `n // N`.
- `dirichlet` (`dataset.alpha`): for each class c in ascending order, its sample indices in the
  order of the permutation drawn from `random.Random(f"smolcluster-dirichlet:{seed}:{try}:{c}")`
  are cut in N consecutive pieces with proportions g_k / Σg, where g_k are N draws of
  `random.Random(f"smolcluster-dirichlet-p:{seed}:{try}:{c}").gammavariate(alpha, 1)`; piece k
  goes to worker k (cut points rounded down). If a worker ends with fewer than `min_size` samples
  (a batch), `try` goes up by one and everything is drawn again (at most 100 tries). Small α:
  each worker sees few classes; large α: close to IID.
- `shards` (`dataset.labels_per_worker` L, McMahan et al.'s split): the indices sorted by label
  (ties in the order of the IID permutation) are cut into N*L equal consecutive pieces (the last
  `n mod N*L` left out); worker k takes pieces p[(k-1)L .. kL-1] of the permutation p of the piece
  numbers drawn from `random.Random(f"smolcluster-shards:{seed}")`. Each worker sees at most about
  L classes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from loguru import logger
from torch.utils.data import Dataset

from smolcluster.config import Config, DatasetConfig
from smolcluster.errors import ConfigError, DataError

MAX_TRIES = 100


def _permutation(n: int, key: str) -> torch.Tensor:
    from smolcluster.data import _permutation as permutation

    return permutation(n, key)


def shares(n: int, weights: Sequence[float], seed: int) -> list[torch.Tensor]:
    """IID shards of unequal sizes: worker k gets floor(n * w_k / Σw) samples."""
    total = float(sum(weights))
    perm = _permutation(n, f"smolcluster-partition:{seed}")
    out, at = [], 0
    for w in weights:
        size = int(n * w / total)
        out.append(perm[at : at + size])  # in permutation order, as the equal iid shards are
        at += size
    return out


def dirichlet(labels: torch.Tensor, workers: int, alpha: float, seed: int, min_size: int) -> list[torch.Tensor]:
    """Per class, proportions drawn from Dirichlet(alpha, ..., alpha) over the workers (module docstring)."""
    classes = sorted(int(c) for c in labels.unique())
    for attempt in range(MAX_TRIES):
        pieces: list[list[torch.Tensor]] = [[] for _ in range(workers)]
        for c in classes:
            idx = (labels == c).nonzero().flatten()
            idx = idx[_permutation(len(idx), f"smolcluster-dirichlet:{seed}:{attempt}:{c}")]
            rng = random.Random(f"smolcluster-dirichlet-p:{seed}:{attempt}:{c}")
            draws = [rng.gammavariate(alpha, 1.0) for _ in range(workers)]
            total = sum(draws) or 1.0
            cum, cuts = 0.0, [0]
            for g in draws:
                cum += g
                cuts.append(min(len(idx), int(len(idx) * cum / total)))
            cuts[-1] = len(idx)
            for k in range(workers):
                pieces[k].append(idx[cuts[k] : cuts[k + 1]])
        shards = [torch.cat(p).sort().values for p in pieces]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise DataError(f"dataset.alpha={alpha:g}: in {MAX_TRIES} draws some worker always got fewer than "
                    f"{min_size} samples (one batch); raise alpha or use fewer workers")


def by_label(labels: torch.Tensor, workers: int, per_worker: int, seed: int) -> list[torch.Tensor]:
    """McMahan et al.'s shards: sorted by label, cut in workers*per_worker pieces, dealt at random."""
    n, pieces = len(labels), workers * per_worker
    size = n // pieces
    if size < 1:
        raise DataError(f"dataset.labels_per_worker={per_worker}: {n} samples cannot make {pieces} pieces")
    perm = _permutation(n, f"smolcluster-partition:{seed}")
    rank = torch.empty(n, dtype=torch.int64)
    rank[perm] = torch.arange(n)
    ordered = (labels.to(torch.int64) * n + rank).argsort()  # by label, ties by permutation rank
    deal = _permutation(pieces, f"smolcluster-shards:{seed}").tolist()
    return [torch.cat([ordered[p * size : (p + 1) * size] for p in deal[k * per_worker : (k + 1) * per_worker]])
            .sort().values for k in range(workers)]


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Every sample's class label: from memory where the dataset holds them, else sample by sample."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    y = getattr(dataset, "y", None)
    if y is None:
        y = getattr(dataset, "targets", None)
    if y is not None:
        return torch.as_tensor(y, dtype=torch.int64).reshape(-1)
    logger.info(f"reading the labels of {len(dataset)} samples for the non-IID partition")  # type: ignore[arg-type]
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)  # type: ignore[arg-type]


def partition(cfg: DatasetConfig, train: Dataset, workers: int, seed: int, task: str,
              min_size: int = 1) -> list[torch.Tensor]:
    """Every worker's shard of `train` under `dataset.partition` (see the module docstring)."""
    from smolcluster.data import partition as iid

    n = len(train)  # type: ignore[arg-type]
    if cfg.shares is not None and len(cfg.shares) != workers:
        raise ConfigError(f"dataset.shares: {len(cfg.shares)} shares for {workers} workers (cluster.num_workers)")
    if cfg.partition == "iid":
        return iid(n, workers, seed) if cfg.shares is None else shares(n, cfg.shares, seed)
    if task != "classify":
        raise ConfigError(f"dataset.partition: {cfg.partition} splits by class label; this dataset's task "
                          f"is {task!r} (use iid)")
    labels = labels_of(train)
    if cfg.partition == "dirichlet":
        return dirichlet(labels, workers, cfg.alpha, seed, min_size)
    return by_label(labels, workers, cfg.labels_per_worker, seed)


def histogram(labels: torch.Tensor, classes: int) -> str:
    """'0:1234 1:20 ...': a shard's samples per class, for the log (classes it lacks left out)."""
    counts = torch.bincount(labels, minlength=classes).tolist()
    return " ".join(f"{c}:{k}" for c, k in enumerate(counts) if k)


@dataclass(frozen=True)
class Layout:
    """Who trains on what, and how much per exchange: computed alike by the server and every worker."""

    shards: list[torch.Tensor]
    """Each worker's samples (before it holds out its validation part)."""
    batches: list[int]
    """Each worker's batch size: batch_size, or scaled by its share (sync)."""
    local_steps: list[int]
    """Each worker's optimizer steps per round: 1 (sync), local_steps, or scaled by its share."""
    steps_per_epoch: int
    """Local steps in an epoch: as many as the workers take to see as many samples as their shards
    hold, at batch_size each (the rounds of an epoch, in the local modes, are this over local_steps)."""


def layout(cfg: Config, train: Dataset, task: str) -> Layout:
    """The partition, per-worker batch sizes and local steps, and the epoch's length for `cfg`."""
    from smolcluster.data import held_out

    c, t, d = cfg.cluster, cfg.training, cfg.dataset
    n = c.num_workers
    shards = partition(d, train, n, c.seed, task, min_size=t.batch_size)
    trains = [len(s) - held_out(len(s), d.validation_split) for s in shards]
    weights = [w / sum(d.shares) for w in d.shares] if d.shares else [1.0 / n] * n
    local = t.algorithm != "sync"
    batches = [t.batch_size if local or not d.shares else max(1, round(n * t.batch_size * w)) for w in weights]
    steps = [1 if not local else t.local_steps if not d.shares else max(1, round(n * t.local_steps * w))
             for w in weights]
    return Layout(shards, batches, steps, math.ceil(sum(trains) / sum(batches)))
