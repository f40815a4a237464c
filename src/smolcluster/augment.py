"""Random rotation, shift and scale of training images, identical on every rerun.

`augment(x, seed, worker_id, epoch, step, ...)` transforms each sample of a batch (N, C, H, W)
with parameters of its own, drawn from a `torch.Generator` seeded from the first 8 bytes of
sha256(f"smolcluster-augment:{seed}:{worker_id}:{epoch}:{step}") (never torch's global generator,
so nothing else's draws move). For sample i, from four uniform draws u in [-1, 1): angle
u0 * degrees, shift (u1 * translate * W, u2 * translate * H) pixels, scale 1 + u3 * scale;
applied with torchvision's `transforms.v2.functional.affine` (bilinear), the area the image no
longer covers filled with the sample's smallest value (the background of MNIST's digits).

torchvision is imported when augmenting, never by a run without it.
"""

from __future__ import annotations

import hashlib

import torch

from smolcluster.config import DatasetConfig


def augment_seed(seed: int, worker_id: int, epoch: int, step: int) -> int:
    digest = hashlib.sha256(f"smolcluster-augment:{seed}:{worker_id}:{epoch}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes up to 2**63 - 1


def augment(x: torch.Tensor, seed: int, worker_id: int, epoch: int, step: int, *, degrees: float = 10.0,
            translate: float = 0.1, scale: float = 0.1) -> torch.Tensor:
    """A new batch: every image of `x` (N, C, H, W) rotated, shifted and scaled by its own draw."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    if x.dim() != 4:
        raise ValueError(f"augment expects images (N, C, H, W), got a batch of shape {tuple(x.shape)}")
    g = torch.Generator().manual_seed(augment_seed(seed, worker_id, epoch, step))
    u = (torch.rand(len(x), 4, generator=g, dtype=torch.float64) * 2 - 1).tolist()
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for i, (a, tx, ty, s) in enumerate(u):
        out[i] = F.affine(x[i], angle=a * degrees, translate=[tx * translate * w, ty * translate * h],
                          scale=1 + s * scale, shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR,
                          fill=float(x[i].min()))
    return out


def augment_batch(x: torch.Tensor, cfg: DatasetConfig, seed: int, worker_id: int, epoch: int, step: int) -> torch.Tensor:
    """`x` augmented as `cfg` says (dataset.augment and its sizes), or `x` itself when it is off."""
    if not cfg.augment:
        return x
    return augment(x, seed, worker_id, epoch, step, degrees=cfg.augment_degrees,
                   translate=cfg.augment_translate, scale=cfg.augment_scale)
