"""Datasets and the deterministic partition rule every machine computes for itself.

The partition rule (public, and the same on any machine, Python version or torch build):

1. Draw `n` numbers from Python's `random.Random(f"smolcluster-partition:{seed}")` with
   `.random()` (Python guarantees this sequence for a given seed) and stably argsort them: that
   is the dataset permutation.
2. Every worker gets `n // num_workers` samples: worker k (1-based) takes positions
   `(k-1)*s .. k*s-1` of the permutation. The last `n % num_workers` positions are left out
   (the remainder: fewer than `num_workers` samples).
3. Each epoch, worker k visits its shard in the order given by the same kind of draw from
   `random.Random(f"smolcluster-epoch:{seed}:{epoch}:{k}")`, in batches of `batch_size`; the last
   batch of an epoch may be smaller (its gradient is weighted by its size, so nothing is lost).
"""

from __future__ import annotations

import gzip
import math
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from smolcluster.config import REPO_ROOT, DatasetConfig
from smolcluster.errors import DataError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SYNTHETIC_SIZES = {"train": 4096, "test": 1024}


@dataclass(slots=True)
class Split:
    """Images as float32 (n, 1, 28, 28), normalised; labels as int64 (n,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def mnist_root(cfg: DatasetConfig) -> Path:
    """The configured root, else $SMOLCLUSTER_DATA, else the repository's data/mnist."""
    if cfg.root:
        return Path(cfg.root)
    if os.environ.get("SMOLCLUSTER_DATA"):
        return Path(os.environ["SMOLCLUSTER_DATA"])
    return REPO_ROOT / "data" / "mnist"


def _read_idx(path: Path, magic: int) -> tuple[tuple[int, ...], bytes]:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(
            f"{path} not found: MNIST ships in the repository's data/mnist; set dataset.root "
            "(or $SMOLCLUSTER_DATA) if you keep it elsewhere"
        ) from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from None
    ndim = 3 if magic == 2051 else 1
    head = 4 + 4 * ndim
    if len(raw) < head or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path}: not an IDX file with magic {magic}")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    if len(raw) - head != math.prod(dims):
        raise DataError(f"{path}: header says {dims} but holds {len(raw) - head} bytes")
    return dims, raw[head:]


def load_mnist(root: Path, split: str, limit: int = 0, indices: torch.Tensor | None = None) -> Split:
    """Parse the IDX files directly (no torchvision, no network); keep only `indices` if given."""
    img_name, lbl_name = MNIST_FILES[split]
    (n, rows, cols), pixels = _read_idx(root / img_name, 2051)
    (m,), labels = _read_idx(root / lbl_name, 2049)
    if n != m:
        raise DataError(f"{root}: {n} {split} images but {m} labels")
    n = min(n, limit) if limit else n
    x = torch.frombuffer(bytearray(pixels[: n * rows * cols]), dtype=torch.uint8).view(n, 1, rows, cols)
    y = torch.frombuffer(bytearray(labels[:n]), dtype=torch.uint8).long()
    if indices is not None:
        x, y = x[indices], y[indices]
    return Split(x.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD), y)


def synthetic(split: str, n: int, seed: int) -> Split:
    """Ten noisy class prototypes shaped like MNIST: learnable in a few steps, for fast tests."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, 28, 28, generator=g)
    g.manual_seed(seed * 2 + (1 if split == "train" else 2))
    y = torch.randint(0, 10, (n,), generator=g)
    x = prototypes[y] + 1.5 * torch.randn(n, 1, 28, 28, generator=g)
    return Split(x, y)


def load_split(cfg: DatasetConfig, split: str, seed: int, indices: torch.Tensor | None = None) -> Split:
    """The train or test split the config names, optionally only the samples at `indices`."""
    limit = cfg.train_size if split == "train" else cfg.test_size
    if cfg.name == "synthetic":
        data = synthetic(split, limit or SYNTHETIC_SIZES[split], seed)
        return data if indices is None else Split(data.x[indices], data.y[indices])
    return load_mnist(mnist_root(cfg), split, limit, indices)


def split_size(cfg: DatasetConfig, split: str) -> int:
    """Number of samples in a split, without loading the images."""
    limit = cfg.train_size if split == "train" else cfg.test_size
    if cfg.name == "synthetic":
        return limit or SYNTHETIC_SIZES[split]
    (full,), _ = _read_idx(mnist_root(cfg) / MNIST_FILES[split][1], 2049)
    return min(full, limit) if limit else full


def _permutation(n: int, key: str) -> torch.Tensor:
    rng = random.Random(key)
    draws = torch.tensor([rng.random() for _ in range(n)], dtype=torch.float64)
    return torch.argsort(draws, stable=True)


def shard_size(n: int, num_workers: int) -> int:
    return n // num_workers


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


def steps_per_epoch(n: int, num_workers: int, batch_size: int) -> int:
    return math.ceil(shard_size(n, num_workers) / batch_size)
