"""A user's own data, outside the package: what `dataset.name: mydata:...` and `smolcluster.Job` load."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def blobs(n: int = 1024, features: int = 20, classes: int = 4, seed: int = 0, as_dataset: bool = False):
    """Gaussian blobs around `classes` centres: (train, test) as (x, y) tensor pairs, or as Datasets."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, features, generator=g)
    y = torch.randint(0, classes, (n + n // 4,), generator=g)
    x = centres[y] + torch.randn(len(y), features, generator=g)
    train, test = (x[:n], y[:n]), (x[n:], y[n:])
    if as_dataset:
        return TensorDataset(*train), TensorDataset(*test)
    return train, test
