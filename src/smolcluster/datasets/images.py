"""image_folder: one sub-folder of images per class, as torchvision's `datasets.ImageFolder` reads it.

Keys: `path` (the folder; classes are its sub-folders' names in sorted order, index = position),
`test_path` (a folder laid out the same way; its classes must be among the training ones) or else
`test_fraction` (a seeded split, see data.py), `image_size` (resize: one number for a square, or
[height, width]; default: as the files are, and then they must all have one size), `grayscale`
(one channel; default three, RGB), `memory_mb`.

Each image becomes float32 (C, H, W) scaled to [-1, 1] ((pixel / 255 - 0.5) / 0.5: fixed, so it is
the same whether decoded up front or later, and needs no pass over the data). Decoded up front into
one tensor (a `Split`) when all of them take at most `memory_mb` MiB (default 1024: about 87,000
RGB images of 64x64, or 1.3M of MNIST's size); otherwise `Images` decodes each one when asked,
which the training loop does in a background thread, two batches ahead (prefetch.py).

torchvision is imported here only, when an image_folder is loaded: MNIST runs never import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from smolcluster.config import DatasetConfig
from smolcluster.datasets import Data, DataMeta, Split, file_path, first
from smolcluster.errors import DataFileError


class Images(Dataset):
    """Sample i decoded from its file when asked: (x float32 (C, H, W), y int)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable[[Any], torch.Tensor],
                 shape: tuple[int, ...], mode: str) -> None:
        self.samples, self.transform, self.shape, self.mode = samples, transform, shape, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, y = self.samples[i]
        x = decode(path, self.transform, self.mode)
        if tuple(x.shape) != self.shape:
            raise DataFileError(f"{path}: decodes to {tuple(x.shape)}, the first image to {self.shape}; "
                                "set dataset.image_size to resize them all to one size")
        return x, y

    def subset(self, indices: torch.Tensor) -> Images:
        return Images([self.samples[i] for i in indices.tolist()], self.transform, self.shape, self.mode)


def decode(path: str, transform: Callable[[Any], torch.Tensor], mode: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return transform(img.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken files
        raise DataFileError(f"{path}: not a readable image ({e})") from None


class Transform:
    """PIL image -> float32 (C, H, W) in [-1, 1], resized if asked. transforms.v2's functional
    kernels called directly: the same numbers as a v2.Compose of ToImage, Resize, ToDtype and
    Normalize, at half its cost per image (Compose's dispatch dominates for small images)."""

    def __init__(self, hw: tuple[int, int] | None, channels: int) -> None:
        self.hw, self.half = hw, [0.5] * channels

    def __call__(self, img: Any) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        x = F.pil_to_tensor(img)
        if self.hw is not None:
            x = F.resize(x, list(self.hw), antialias=True)
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.half, self.half)


def transform_for(cfg: DatasetConfig) -> Transform:
    return Transform(cfg.image_hw, 1 if cfg.grayscale else 3)


def scan(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, (file, class index) of every image) of `folder`, in ImageFolder's sorted order;
    with `classes`, indices are positions in that list (a test folder's, by the training classes)."""
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise DataFileError(f"{folder}: not a folder (expected one sub-folder of images per class)")
    try:
        found = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as e:  # no class folders, or a class folder with no images
        raise DataFileError(f"{folder}: {e}") from None
    if classes is None:
        return found.classes, found.samples
    unknown = [c for c in found.classes if c not in classes]
    if unknown:
        raise DataFileError(f"{folder / unknown[0]}: class {unknown[0]!r} is not among the training classes {classes}")
    return classes, [(p, classes.index(found.classes[y])) for p, y in found.samples]


def in_memory(images: Images) -> Split:
    x = torch.empty((len(images), *images.shape))
    for i in range(len(images)):
        x[i] = images[i][0]
    return Split(x, torch.tensor([y for _, y in images.samples], dtype=torch.int64))


def load(cfg: DatasetConfig, seed: int) -> Data:
    assert cfg.path is not None  # DatasetConfig checks it
    transform, mode = transform_for(cfg), "L" if cfg.grayscale else "RGB"
    classes, samples = scan(file_path(cfg.root, cfg.path))
    shape = tuple(decode(samples[0][0], transform, mode).shape)
    train = Images(samples, transform, shape, mode)
    if cfg.test_path:
        test = Images(scan(file_path(cfg.root, cfg.test_path), classes)[1], transform, shape, mode)
    else:
        from smolcluster.data import split_test

        keep, held = split_test(len(train), cfg.test_fraction, seed)
        train, test = train.subset(keep), train.subset(held)
    train, test = first(train, cfg.train_size), first(test, cfg.test_size)  # before decoding them all
    nbytes = (len(train) + len(test)) * torch.Size(shape).numel() * 4
    meta = DataMeta("classify", len(classes), shape)
    if nbytes <= cfg.memory_mb * 2**20:
        return Data(in_memory(train), in_memory(test), meta)
    return Data(train, test, meta)
