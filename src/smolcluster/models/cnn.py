"""CNN: 3x3 conv (-BatchNorm) -ReLU -2x2 max-pool stages, then (dropout and) the MLP classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from smolcluster.models.mlp import layers

if TYPE_CHECKING:
    from smolcluster.config import ModelConfig


def build(cfg: ModelConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """Images (C, H, W) -> cfg.channels stages -> hidden -> out.

    With `batchnorm` each conv is followed by BatchNorm2d (its running statistics are buffers,
    see models.buffers); with `dropout` the flattened features and each hidden layer are dropped
    out before the next Linear. Both add modules only when asked for, so a plain CNN keeps the
    parameter names (and, from one seed, the weights) it always had."""
    stages: list[nn.Module] = []
    channels, h, w = input_shape
    for c in cfg.channels:
        stages.append(nn.Conv2d(channels, c, 3, padding=1))
        if cfg.batchnorm:
            stages.append(nn.BatchNorm2d(c))
        stages += [nn.ReLU(), nn.MaxPool2d(2)]
        channels, h, w = c, h // 2, w // 2
    head: list[nn.Module] = [nn.Flatten()]
    if cfg.dropout:
        head.append(nn.Dropout(cfg.dropout))
    return nn.Sequential(*stages, *head, *layers([channels * h * w, *cfg.hidden_sizes, cfg.out], cfg.dropout))
