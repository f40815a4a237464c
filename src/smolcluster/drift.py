"""How far a worker's replica is from the server's, from a few numbers each side computes alone.

On one kind of device every replica is bit-identical and a CRC says so. A CPU beside a GPU (or two
GPU models) round differently, so their replicas drift apart by float noise; the CRC then only
says "different", not "how different". So each checksum also carries a sketch: the parameters
(and float buffers) cut into K chunks, each chunk's dot product with a fixed pseudo-random ±1
vector. For two replicas a and b the chunks' differences have E[(s_a - s_b)²] = Σ (a_i - b_i)² over
the chunk, so the sum over chunks estimates ||a - b||² (a random projection, as in the
Johnson-Lindenstrauss lemma) from 64 floats instead of the model. The server divides by its own
||a|| and compares with `cluster.drift_tolerance`.

Computing it is one pass over the parameters plus the ±1 vector's generation, once per checksum
(every `checksum_steps` steps), in float32 with float64 totals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from smolcluster.flat import FlatModel
from smolcluster.wire import ProtocolError

CHUNKS = 64
"""Sketch length: the estimate's relative spread is about sqrt(2 / CHUNKS) (18%) when the drift is
spread over many parameters, and exact when it sits in one."""
_SALT = 0x5D1F7


@dataclass(frozen=True, slots=True)
class Digest:
    """One replica after one step: exact identity (crc), and where it is (sketch, norm)."""

    crc: int
    sketch: tuple[float, ...]
    norm: float

    def to_json(self) -> dict[str, Any]:
        return {"crc": self.crc, "sketch": list(self.sketch)}


def digest(flat: FlatModel, seed: int) -> Digest:
    """The replica's CRC, sketch and L2 norm (the parameters pulled from the GPU first, if on one)."""
    crc = flat.checksum()  # pulls
    parts = [flat.params, flat.buffers] if flat.nbuf else [flat.params]
    sketch: list[float] = []
    sq = 0.0
    for part, chunks in zip(parts, (CHUNKS, min(CHUNKS, flat.nbuf))):
        for k, piece in enumerate(torch.tensor_split(part, chunks)):
            g = torch.Generator().manual_seed(seed * 1_000_003 + _SALT + len(sketch) + k)
            signs = torch.randint(0, 2, (piece.numel(),), generator=g, dtype=torch.float32).mul_(2).sub_(1)
            sketch.append(float(torch.dot(piece, signs)))
            sq += float(torch.dot(piece, piece))
    return Digest(crc, tuple(sketch), math.sqrt(sq))


def sketch_length(nbuf: int) -> int:
    """Numbers in a digest's sketch: CHUNKS for the parameters, up to CHUNKS for the float buffers."""
    return CHUNKS + min(CHUNKS, nbuf)


def parse_sketch(body: dict[str, Any], length: int, peer: str) -> tuple[float, ...]:
    """A worker's sketch from its CHECKSUM frame: `length` numbers, or a ProtocolError naming it."""
    sketch = body.get("sketch")
    if not isinstance(sketch, list) or len(sketch) != length or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in sketch):
        raise ProtocolError(f"{peer}: checksum without a sketch of {length} numbers")
    return tuple(float(v) for v in sketch)


def relative_drift(ours: Digest, theirs: tuple[float, ...]) -> float:
    """||theirs - ours|| / ||ours||, estimated; infinite if their sketch holds NaN or infinity."""
    sq = math.fsum((a - b) ** 2 for a, b in zip(ours.sketch, theirs))
    if not math.isfinite(sq):
        return math.inf
    return math.sqrt(sq) / max(ours.norm, 1e-30)
