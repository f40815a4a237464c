"""The one training job every system in the benchmark runs: same config, model, data and optimizer.

Each system reads the same `--set` overrides through smolcluster's own `load_config`, builds the
model with `build_model`, takes worker k's shard and batches from the partition rule, and steps
the optimizer with `optimizer_step` (Adam, foreach=False, cosine schedule), exactly as a
smolcluster worker does. So the only difference between rows of the table is how gradients move.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from smolcluster import data
from smolcluster.config import Config, load_config
from smolcluster.models import build_model
from smolcluster.results import step_ms_stats
from smolcluster.train import build_optimizer, cross_entropy, optimizer_step, set_threads

__all__ = ["Shard", "StepTimer", "data_meta", "load", "step_ms_stats", "time_single", "train_step"]


def load(overrides: list[str]) -> Config:
    """The config every process of one measurement shares (the same `--set KEY=VALUE` list)."""
    return load_config(None, None, overrides)


@dataclass
class Shard:
    """Worker `worker_id` of `num_workers`: its samples and its batch order, as smolcluster's worker has them."""

    cfg: Config
    worker_id: int = 1
    num_workers: int = 1

    def __post_init__(self) -> None:
        c, d = self.cfg.cluster, self.cfg.dataset
        n_train = data.split_size(d, "train")
        indices = data.partition(n_train, self.num_workers, c.seed)[self.worker_id - 1]
        self.train = data.load_split(d, "train", c.seed, indices=indices)
        self.steps_per_epoch = data.steps_per_epoch(n_train, self.num_workers, self.cfg.training.batch_size)

    def batches(self, steps: int, device: str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) for steps 0..steps-1, epoch after epoch; copied to `device` as each is taken."""
        c, t = self.cfg.cluster, self.cfg.training
        order: list[torch.Tensor] = []
        for step in range(steps):
            if step % self.steps_per_epoch == 0:
                epoch = step // self.steps_per_epoch
                order = list(data.epoch_order(len(self.train), c.seed, epoch, self.worker_id).split(t.batch_size))
            idx = order[step % self.steps_per_epoch]
            x, y = self.train.x[idx], self.train.y[idx]
            yield (x, y) if device == "cpu" else (x.to(device), y.to(device))


def data_meta(cfg: Config) -> data.DataMeta | None:
    """What the model's sizes are taken from: None (build_model's default, MNIST's shape) for MNIST
    and synthetic, else the dataset's own description (a GPT's vocabulary and context, say)."""
    if cfg.dataset.name in ("MNIST", "synthetic"):
        return None
    return data.load_data(cfg.dataset, cfg.cluster.seed).meta


def model_and_optimizer(cfg: Config, device: str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model on `device` and its optimizer (built after the move, as a smolcluster replica's is)."""
    set_threads(cfg.training.threads)
    model = build_model(cfg.model, cfg.cluster.seed, data_meta(cfg))
    if device != "cpu":
        model.to(device)
    return model, build_optimizer(model, cfg.training)


def param_count(cfg: Config) -> int:
    model = build_model(cfg.model, cfg.cluster.seed, data_meta(cfg))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class StepTimer:
    """Seconds between consecutive `tick()`s: the step period as the coordinating process sees it.
    On a CUDA `device` each tick first waits for the GPU, so a step is counted when it is done."""

    def __init__(self, device: str = "cpu") -> None:
        self.times: list[float] = []
        self._cuda = device if device.startswith("cuda") else None
        self._last = time.perf_counter()

    def tick(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._cuda)
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, x: torch.Tensor,
               y: torch.Tensor, step: int, total: int) -> None:
    """Forward, backward and optimizer step, as smolcluster's worker does them (minus the wire)."""
    optimizer.zero_grad()
    cross_entropy(model(x), y).backward()
    optimizer_step(optimizer, cfg.training, step, total)


def time_single(cfg: Config, steps: int, device: str = "cpu") -> list[float]:
    """Seconds per step of plain single-process training on `device`."""
    model, optimizer = model_and_optimizer(cfg, device)
    batches = Shard(cfg).batches(steps, device)
    timer = StepTimer(device)
    for step, (x, y) in enumerate(batches):
        train_step(model, optimizer, cfg, x, y, step, steps)
        timer.tick()
    return timer.times
