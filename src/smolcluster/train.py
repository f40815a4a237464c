"""The arithmetic every replica shares: optimizer, loss, evaluation.

Server, workers and the single-process reference in the tests all call these, so a difference
between them can only come from the wire, never from two copies of the training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smolcluster.config import TrainingConfig
from smolcluster.data import Split


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """The configured optimizer, with torch's fused kernel (3-4x faster on CPU than the per-tensor
    loop; the same bits on every replica of one machine type), or the per-tensor loop without it."""
    params = [p for p in model.parameters() if p.requires_grad]
    cls: type[torch.optim.Optimizer]
    if cfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.momentum}
    else:
        cls, kwargs = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW), {}
    kwargs.update(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # an old torch, or a device without fused kernels
        return cls(params, foreach=False, **kwargs)


def learning_rate(cfg: TrainingConfig, step: int, total_steps: int) -> float:
    """The learning rate of `step` (0-based) in a run of `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_step(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, step: int, total_steps: int) -> None:
    """Apply the gradients now in `.grad` with this step's learning rate (server and workers alike).

    With `max_grad_norm` the averaged gradient is clipped first; every replica holds the same
    average and runs the same code, so every replica clips it identically."""
    lr = learning_rate(cfg, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if cfg.max_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
    optimizer.step()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch (the server weights each worker's mean by its batch size)."""
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 2000) -> tuple[float, float]:
    """(mean loss, accuracy in %) over a whole split."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        x, y = split.x[start : start + batch_size], split.y[start : start + batch_size]
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = max(len(split), 1)
    return loss_sum / n, 100.0 * correct / n


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads; several processes on one machine otherwise fight over cores."""
    if threads > 0:
        torch.set_num_threads(threads)
