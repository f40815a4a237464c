"""Gradient buckets: contiguous ranges of the flat buffer that travel, and are averaged, on their own.

Bucket 0 is the model's buffers and the loss slot (float32, never compressed), sent right after
the forward pass.
The others hold whole parameters in *reverse* order, because backward finishes the last layer
first: a worker sends a bucket as soon as its gradients are complete (overlapping the rest of
backward), and the server averages and returns each bucket as soon as every worker sent it.
Averaging is element-wise, so any bucketing gives bit-identical results; one big bucket is the
plain algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Bucket:
    index: int
    lo: int
    """First element in the flat wire buffer (parameters, then the loss slot)."""
    hi: int
    """One past the last element."""
    params: tuple[int, ...]
    """Indices (in model order) of the parameters it holds; empty for the loss bucket."""

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def make_buckets(sizes: list[int], bucket_elems: int, buffers: int = 0) -> list[Bucket]:
    """Buckets for parameters of `sizes` elements (model order), each at most `bucket_elems`
    elements unless a single parameter is larger; see the module docstring for the order.
    Bucket 0 holds the model's `buffers` floats and the loss (flat.py)."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    numel = offsets[-1]
    buckets = [Bucket(0, numel, numel + buffers + 1, ())]
    members: list[int] = []
    for i in reversed(range(len(sizes))):
        if members and offsets[members[0] + 1] - offsets[i] > bucket_elems:
            buckets.append(Bucket(len(buckets), offsets[members[-1]], offsets[members[0] + 1], tuple(members)))
            members = []
        members.append(i)
    if members:
        buckets.append(Bucket(len(buckets), offsets[members[-1]], offsets[members[0] + 1], tuple(members)))
    return buckets
