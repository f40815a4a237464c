"""The arithmetic every replica shares: optimizer, loss, evaluation.

Server, workers and the single-process reference in the tests all call these, so a difference
between them can only come from the wire, never from two copies of the training step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from smolcluster.config import TrainingConfig
from smolcluster.datasets import fetch
from smolcluster.errors import ConfigError

if TYPE_CHECKING:
    from smolcluster.data import Split


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """The configured optimizer (in the local modes: each worker's own, between exchanges)."""
    cls: type[torch.optim.Optimizer]
    if cfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.momentum}
    else:
        cls, kwargs = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW), {}
    return _fused(cls, model, cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **kwargs)


def build_outer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """What applies the averaged parameter change in the local modes, on every replica alike:
    plain SGD at lr 1 (local_sgd: the average change itself), or DiLoCo's outer SGD with Nesterov
    momentum, whose "gradient" is the average change."""
    if cfg.algorithm == "local_sgd":
        return _fused(torch.optim.SGD, model, "sgd", lr=1.0)
    m = cfg.outer_momentum
    return _fused(torch.optim.SGD, model, "sgd", lr=cfg.outer_lr, momentum=m, nesterov=m > 0)


def _fused(cls: type[torch.optim.Optimizer], model: nn.Module, name: str, **kwargs: object) -> torch.optim.Optimizer:
    """`cls` with torch's fused kernel (3-4x faster on CPU than the per-tensor loop; the same bits
    on every replica of one machine type), or the per-tensor loop where the device has none."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # an old torch, or a device without fused kernels
        from smolcluster.devices import once

        where = params[0].device.type if params else "cpu"
        once(f"fused-{name}", f"this torch has no fused {name} kernel on {where}: "
                              "using the per-tensor loop (the same numbers, slower)")
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


def apply_average(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, step: int, total_steps: int) -> None:
    """Apply what the server averaged (server and workers alike): the gradient, with this step's
    learning rate (sync); or the round's parameter change, with the outer optimizer (local modes)."""
    if cfg.algorithm == "sync":
        optimizer_step(optimizer, cfg, step, total_steps)
    else:
        optimizer.step()


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits, targets) -> the mean loss over the batch, a scalar."""


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every target: a batch of classes (B, C) vs (B,), or a language
    model's (B, T, V) vs (B, T), flattened (the server weights each worker's mean by its batch size)."""
    if logits.dim() > 2:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(logits, targets)



def make_loss(cfg: TrainingConfig) -> LossFn:
    """The loss `training.loss` names; an import path is resolved here, once (a ConfigError naming
    training.loss if it cannot be imported), and its result checked to be a scalar on every call."""
    if cfg.loss == "cross_entropy":
        return cross_entropy
    from smolcluster.models import import_callable

    user = import_callable(cfg.loss, "training.loss")

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = user(logits, targets)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            got = f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(f"training.loss: {cfg.loss} returned {got}, expected a scalar tensor (the mean loss)")
        return value

    return loss


@torch.no_grad()
def metrics(model: nn.Module, split: Split, task: str = "classify", loss: LossFn | None = None,
            batch_size: int = 0) -> dict[str, float]:
    """The model on a whole split: {"loss", "accuracy" (in %)} for 'classify', {"loss", "bpc"} for
    'lm' (bits per character: the mean loss per token / ln 2). The loss is the mean over every
    target; `loss` (default: cross-entropy) is a mean per batch, weighted here by the batch's
    targets. `batch_size`: samples per forward pass (default: 2000 images, or 64Ki tokens of text)."""
    if task not in ("classify", "lm"):
        raise ValueError(f"task: expected 'classify' or 'lm', got {task!r}")
    if not batch_size:
        batch_size = 2000 if task == "classify" else max(1, 65536 // max(1, split[0][1].numel() if len(split) else 1))
    from smolcluster.devices import batch_to

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        loss_sum, correct, targets = 0.0, 0, 0
        for idx in torch.arange(len(split)).split(batch_size):
            x, y = fetch(split, idx)  # any dataset: one fancy index in memory, else item by item
            x, y = batch_to(x, device), batch_to(y, device)
            logits = model(x)
            if loss is None:  # summed exactly, not a mean times a count
                flat = logits.reshape(-1, logits.shape[-1]) if logits.dim() > 2 else logits
                loss_sum += float(F.cross_entropy(flat, y.reshape(-1), reduction="sum"))
            else:
                loss_sum += float(loss(logits, y)) * y.numel()
            targets += y.numel()
            if task == "classify":
                correct += int((logits.argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    mean = loss_sum / max(targets, 1)
    if task == "lm":
        return {"loss": mean, "bpc": mean / math.log(2)}
    return {"loss": mean, "accuracy": 100.0 * correct / max(len(split), 1)}


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads; several processes on one machine otherwise fight over cores."""
    if threads > 0:
        torch.set_num_threads(threads)
