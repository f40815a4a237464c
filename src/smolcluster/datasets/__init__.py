"""The one shape every dataset takes; the built-in loaders live one per module beside this file.

`smolcluster.data.load_data(cfg, seed)` returns a `Data`:

- `train`, `test`: map-style `torch.utils.data.Dataset`s; item `i` is `(x, y)`, `len()` their size.
- `meta`: a `DataMeta` (task, classes, one sample's input shape, an LM's vocabulary, and the
  identity the handshake compares).

A dataset that holds its samples as tensors also has `batch(indices) -> (x, y)` (one fancy index,
no per-item Python) and `subset(indices)`; `Split` (images, tables) and `text.Windows` do. The
training loop takes that path (`smolcluster.prefetch.batches`); any other dataset is read item by
item in a background thread, a couple of batches ahead.

Built-in names (`dataset.name`) and where they are loaded:

    MNIST, synthetic     mnist.py   in memory
    csv                  table.py   in memory
    image_folder         images.py  in memory up to dataset.memory_mb, else read per item
    text                 text.py    in memory (character windows over one token tensor)
    package.module:fn    custom.py  whatever fn returns
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset


@dataclass(slots=True, eq=False)
class Split(Dataset):
    """Samples held as tensors: x (n, ...) and y (n,) int64. `split[indices]` is a batch."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]

    def subset(self, indices: torch.Tensor) -> Split:
        return Split(self.x[indices], self.y[indices])


@dataclass(frozen=True, slots=True)
class DataMeta:
    """What the model and the handshake need to know about a dataset, without reading it."""

    task: Literal["classify", "lm"]
    """classify: y is a class index per sample; lm: y is the next token at every position of x."""
    classes: int
    """Number of classes; for "lm" the vocabulary size."""
    input_shape: tuple[int, ...]
    """One sample's x shape, e.g. (1, 28, 28) or (context,)."""
    vocab: str | None = None
    """lm: the characters, the index of each being its token id; else None."""
    identity: dict[str, Any] = field(default_factory=dict)
    """JSON-able: train and test sizes plus a digest of a sample of the data (or dataset.version)."""


@dataclass(slots=True)
class Data:
    train: Dataset
    test: Dataset
    meta: DataMeta



def fetch(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples at `indices` as one (x, y) batch: one fancy index in memory, else item by item."""
    if hasattr(dataset, "batch"):
        return dataset.batch(indices)
    from torch.utils.data import default_collate

    x, y = default_collate([dataset[i] for i in indices.tolist()])
    return x, y


def take(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """The samples at `indices`, in that order: a copy of the tensors in memory, else a view."""
    if hasattr(dataset, "subset"):
        return dataset.subset(indices)
    from torch.utils.data import Subset

    return Subset(dataset, indices.tolist())


def first(dataset: Dataset, n: int) -> Dataset:
    """The first `n` samples (0, or more than there are: all of them)."""
    return dataset if not n or n >= len(dataset) else take(dataset, torch.arange(n))


def file_path(root: str | None, path: str) -> Path:
    """A dataset file named in the config: relative paths are taken from dataset.root when set
    (root is each machine's own, outside the handshake), else from the current directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or not root else Path(root).expanduser() / p
