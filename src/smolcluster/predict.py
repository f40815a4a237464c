"""`smolcluster predict` and `serve-model`: a saved classifier's top classes for images or test-set samples.

An image of any size becomes what an MNIST model was trained on: grey, 28 x 28 (resized with
antialiasing), a light digit on a dark ground (a picture whose mean is light is inverted, as a
drawing on paper is), normalised like the dataset. Images are read by Pillow (torchvision's
dependency), which refuses decompression bombs; more than MAX_FILE_BYTES is refused unread.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from smolcluster.errors import ConfigError, DataFileError

MAX_FILE_BYTES = 20 << 20


def load_classifier(path: Path) -> tuple[torch.nn.Module, tuple[int, ...], dict[str, str]]:
    """A saved classifier, the shape of one input and the file's metadata (a text model has no
    classes: ConfigError). A file from before shapes were recorded held an MNIST model."""
    from smolcluster.results import data_meta, load_model

    model, _, meta = load_model(path)
    saved = data_meta(path, meta)
    if saved is not None and saved.task != "classify":
        raise ConfigError(f"{path}: a {saved.task} model has no classes to predict (try `smolcluster sample`)")
    model.eval()
    return model, tuple(saved.input_shape) if saved is not None else (1, 28, 28), meta


def require_grey_images(shape: tuple[int, ...], name: str) -> None:
    """Only a model of 1 x H x W inputs can be shown a picture."""
    if len(shape) != 3 or shape[0] != 1:
        raise DataFileError(f"{name}: predict reads images for grey-image models (1 x H x W inputs); "
                            f"this model takes {list(shape)} (use --index)")


def image_input(source: Path | bytes, shape: tuple[int, ...], name: str | None = None) -> torch.Tensor:
    """One image, a file or its bytes (an upload), as a (1, *shape) MNIST-normalised float tensor."""
    from PIL import Image, UnidentifiedImageError

    from smolcluster.datasets.mnist import MNIST_MEAN, MNIST_STD

    name = name or (str(source) if isinstance(source, Path) else "image")
    require_grey_images(shape, name)
    try:
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        if size > MAX_FILE_BYTES:
            raise DataFileError(f"{name}: larger than {MAX_FILE_BYTES >> 20} MiB")
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            grey = img.convert("L").resize((shape[2], shape[1]), Image.Resampling.LANCZOS)
            pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
    except DataFileError:
        raise
    # Pillow reports a broken file as any of these, depending on the format and where it breaks.
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError, EOFError) as e:
        raise DataFileError(f"{name}: not an image Pillow can read ({str(e)[:200]})") from None
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
