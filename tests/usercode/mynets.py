"""A user's own models, outside the package: what `model.type: mynets:...` and `smolcluster.Job` load."""

from __future__ import annotations

from torch import nn


def bn_net(width: int = 8, classes: int = 10) -> nn.Module:
    """A small conv net with BatchNorm: its running statistics are buffers, not gradients."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(width * 7 * 7, classes),
    )


def linear(inputs: int = 784, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes))


def mlp2(inputs: int = 20, hidden: int = 16, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes))
