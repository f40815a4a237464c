"""`smolcluster predict`: a saved classifier's top classes for image files or test-set samples.

An image file of any size becomes what an MNIST model was trained on: grey, 28 x 28 (resized
with antialiasing), a light digit on a dark ground (a picture whose mean is light is inverted,
as a drawing on paper is), normalised like the dataset. Files are read by Pillow (torchvision's
dependency), which refuses decompression bombs; files over MAX_FILE_BYTES are refused unread.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smolcluster.errors import DataFileError

MAX_FILE_BYTES = 20 << 20


def image_input(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """One image file as a (1, *shape) MNIST-normalised float tensor."""
    from PIL import Image, UnidentifiedImageError

    from smolcluster.datasets.mnist import MNIST_MEAN, MNIST_STD

    if len(shape) != 3 or shape[0] != 1:
        raise DataFileError(f"{path}: predict reads images for grey-image models (1 x H x W inputs); "
                            f"this model takes {list(shape)} (use --index)")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataFileError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
        with Image.open(path) as img:
            grey = img.convert("L").resize((shape[2], shape[1]), Image.Resampling.LANCZOS)
            pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DataFileError(f"{path}: not an image Pillow can read ({str(e)[:200]})") from None
    x = pixels.float().div_(255.0).reshape(1, *shape)
    if float(x.mean()) > 0.5:  # dark ink on a light ground: MNIST is the other way round
        x = 1.0 - x
    return x.sub_(MNIST_MEAN).div_(MNIST_STD)


@torch.no_grad()
def top(model: torch.nn.Module, x: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k likeliest classes of one input, with their probabilities."""
    model.eval()
    probs = torch.softmax(model(x).reshape(-1), dim=0)
    values, classes = probs.topk(min(k, probs.numel()))
    return [(int(c), float(v)) for c, v in zip(classes, values)]


def line(name: str, ranked: list[tuple[int, float]], label: int | None = None) -> str:
    shown = ", ".join(f"{c} ({100 * p:.1f}%)" for c, p in ranked)
    return f"{name}: {shown}" + ("" if label is None else f"  [label {label}]")
