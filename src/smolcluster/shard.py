"""A worker's part of the data: its training samples, its held-out validation samples, and the
order it draws batches in.

Both backends' workers read their data through a `Shard`, so worker K of a `ps` run and rank K-1
of a `torch` run train on the same samples in the same order: that is what makes the two
backends give the same parameters.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from loguru import logger
from torch import nn

from smolcluster import data
from smolcluster.augment import augment_batch
from smolcluster.config import Config
from smolcluster.partition import Layout, histogram, labels_of, layout
from smolcluster.prefetch import batches
from smolcluster.schedule import Schedule
from smolcluster.train import LossFn, metrics


class Shard:
    def __init__(self, cfg: Config, worker_id: int, source: Any = None, keep_test: bool = False) -> None:
        """`source`: a Job's own data (api.py); `keep_test`: also keep the evaluation subset of the
        test split (the torch backend's rank 0 evaluates; a `ps` worker never does)."""
        c, t = cfg.cluster, cfg.training
        self.cfg, self.id = cfg, worker_id
        loaded = data.load_data(cfg.dataset, c.seed, source)
        self.meta = loaded.meta
        self.layout: Layout = layout(cfg, loaded.train, self.meta.task)
        mine, held = data.holdout(self.layout.shards[worker_id - 1], cfg.dataset.validation_split, c.seed, worker_id)
        self.train = data.take(loaded.train, mine)
        self.val = data.eval_subset(data.take(loaded.train, held), t.eval_samples, c.seed) if len(held) else None
        self.test = data.eval_subset(loaded.test, t.eval_samples, c.seed) if keep_test else None
        del loaded  # only this worker's shard (and the test subset, if asked) stays in memory
        k = worker_id - 1
        self.schedule = Schedule(len(self.train), self.layout.batches[k], self.layout.local_steps[k])
        """Which samples each draw (step, or local step) takes; training.balance changes it mid-run."""
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._next = (-1, -1, 0)
        """(epoch, position, batch size) of the batch `_batches` yields next."""
        self._log()

    def _log(self) -> None:
        """What this worker trains on: how many samples, and (classes) how many of each label."""
        t, rule, s = self.cfg.training, self.cfg.dataset.partition, self.schedule
        what = f"worker {self.id}'s shard ({rule}): {len(self.train)} training samples, batch {s.batch(0)}"
        if t.algorithm != "sync":
            what += f", {s.local_steps(0)} local steps per round"
        cheap = any(hasattr(self.train, a) for a in ("y", "targets")) or rule != "iid"
        if self.meta.task == "classify" and cheap and len(self.train):
            what += f"; labels {histogram(labels_of(self.train), self.meta.classes)}"
        logger.info(what)

    def batch(self, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of draw `draw` (schedule.py); the epoch's order is the partition rule's; data
        not held in memory is read a couple of batches ahead by prefetch.batches, off the step's
        critical path."""
        c = self.cfg.cluster
        (epoch, at), size = self.schedule.position(draw), self.schedule.batch(draw)
        if self._batches is None or self._next != (epoch, at, size):
            self.close()
            order = data.epoch_order(len(self.train), c.seed, epoch, self.id)[at:].split(size)
            self._batches = batches(self.train, list(order))
        x, y = next(self._batches)
        self._next = (epoch, at + len(y), size)  # past the epoch's end: the next draw starts a new order
        return augment_batch(x, self.cfg.dataset, c.seed, self.id, epoch, draw), y

    def close(self) -> None:
        """Stop reading ahead (a resync or the end of training)."""
        if self._batches is not None:
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()
        self._batches, self._next = None, (-1, -1, 0)

    def validate(self, model: nn.Module, loss: LossFn, step: int) -> dict[str, float]:
        """This worker's own validation split (dataset.validation_split of its shard): log and W&B."""
        if self.val is None:
            return {}
        result = metrics(model, self.val, self.meta.task, loss)
        shown = ", ".join(f"{k} {v:.4f}" if k != "accuracy" else f"accuracy {v:.2f}%" for k, v in result.items())
        logger.info(f"step {step + 1}: validation {shown} ({len(self.val)} samples of worker {self.id}'s shard)")
        return {f"val/{k}": v for k, v in result.items()}

    def seed_step(self, draw: int) -> None:
        """Dropout's masks: this worker's own (not every worker's the same), and the same in a rerun."""
        torch.manual_seed((self.cfg.cluster.seed * 1_000_003 + self.id * 10_007 + draw) % 2**63)
