"""MNIST from the IDX files shipped in data/mnist (no torchvision, no network), and `synthetic`:
MNIST-shaped noise around ten class prototypes, learnable in a few steps, for fast tests."""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import torch

from smolcluster.config import REPO_ROOT, DatasetConfig
from smolcluster.datasets import Data, DataMeta, Split
from smolcluster.errors import DataError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SYNTHETIC_SIZES = {"train": 4096, "test": 1024}
META = DataMeta(task="classify", classes=10, input_shape=(1, 28, 28))


def mnist_root(cfg: DatasetConfig) -> Path:
    """The configured root, else $SMOLCLUSTER_DATA, else the repository's data/mnist."""
    if cfg.root:
        return Path(cfg.root)
    if os.environ.get("SMOLCLUSTER_DATA"):
        return Path(os.environ["SMOLCLUSTER_DATA"])
    return REPO_ROOT / "data" / "mnist"


def read_idx(path: Path, magic: int) -> tuple[tuple[int, ...], bytes]:
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
    """Images as float32 (n, 1, 28, 28), normalised; labels int64; only `indices` if given."""
    img_name, lbl_name = MNIST_FILES[split]
    (n, rows, cols), pixels = read_idx(root / img_name, 2051)
    (m,), labels = read_idx(root / lbl_name, 2049)
    if n != m:
        raise DataError(f"{root}: {n} {split} images but {m} labels")
    n = min(n, limit) if limit else n
    x = torch.frombuffer(bytearray(pixels[: n * rows * cols]), dtype=torch.uint8).view(n, 1, rows, cols)
    y = torch.frombuffer(bytearray(labels[:n]), dtype=torch.uint8).long()
    if indices is not None:  # before the float conversion: a worker converts only its shard
        x, y = x[indices], y[indices]
    return Split(x.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD), y)


def mnist_size(cfg: DatasetConfig, split: str) -> int:
    """Samples in a split (after train_size/test_size), reading only the labels file's header."""
    limit = cfg.train_size if split == "train" else cfg.test_size
    (full,), _ = read_idx(mnist_root(cfg) / MNIST_FILES[split][1], 2049)
    return min(full, limit) if limit else full


def synthetic(split: str, n: int, seed: int) -> Split:
    """Ten noisy class prototypes shaped like MNIST: learnable in a few steps, for fast tests."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, 28, 28, generator=g)
    g.manual_seed(seed * 2 + (1 if split == "train" else 2))
    y = torch.randint(0, 10, (n,), generator=g)
    x = prototypes[y] + 1.5 * torch.randn(n, 1, 28, 28, generator=g)
    return Split(x, y)


def load_split(cfg: DatasetConfig, split: str, seed: int, indices: torch.Tensor | None = None) -> Split:
    """One split of MNIST or synthetic, its first train_size/test_size samples, or those at `indices`."""
    limit = cfg.train_size if split == "train" else cfg.test_size
    if cfg.name == "synthetic":
        data = synthetic(split, limit or SYNTHETIC_SIZES[split], seed)
        return data if indices is None else data.subset(indices)
    return load_mnist(mnist_root(cfg), split, limit, indices)


def load(cfg: DatasetConfig, seed: int) -> Data:
    return Data(load_split(cfg, "train", seed), load_split(cfg, "test", seed), META)
