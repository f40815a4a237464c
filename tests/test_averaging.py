"""The server's per-bucket averaging: sample-weighted means, and rejecting NaN/Inf contributions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smolcluster.averaging import Averager, Inbox
from smolcluster.buckets import make_buckets
from smolcluster.compress import Encoder, make_codec
from smolcluster.flat import FlatModel
from smolcluster.wire import Header, MsgType


def averager(compression: str = "fp32") -> Averager:
    torch.manual_seed(0)
    flat = FlatModel(nn.Sequential(nn.Linear(20, 16), nn.Linear(16, 4)))
    buckets = make_buckets([p.numel() for p in flat.model.parameters()], 200)
    return Averager(flat, buckets, compression, 64)


def deliver(avg: Averager, inbox: Inbox, b: int, values: torch.Tensor, count: int) -> str:
    """What the server does with one worker's GRAD frame for bucket `b`: target, receive into it."""
    bucket, codec = avg.buckets[b], avg.codecs[b]
    payload = memoryview(Encoder(codec, bucket.numel).encode(values)).cast("B")
    header = Header(MsgType.GRAD, step=avg.step, length=payload.nbytes, dtype=codec.dtype, offset=bucket.lo,
                    count=count)
    avg.target(inbox, header, "test").cast("B")[:] = payload
    return avg.receive(inbox, header)


def bucket_values(avg: Averager, b: int, seed: int) -> torch.Tensor:
    return torch.randn(avg.buckets[b].numel, generator=torch.Generator().manual_seed(seed))


def test_the_average_is_weighted_by_sample_count():
    avg = averager()
    inboxes = [avg.inbox(), avg.inbox()]
    avg.begin(0)
    b = len(avg.buckets) - 1
    a, c = bucket_values(avg, b, 1), bucket_values(avg, b, 2)
    assert deliver(avg, inboxes[0], b, a, 3) == "ok" and deliver(avg, inboxes[1], b, c, 1) == "ok"
    assert avg.ready(inboxes) == [b]
    _, rejected = avg.reduce(b, inboxes)
    bucket = avg.buckets[b]
    assert rejected == []
    assert torch.allclose(avg.flat.wire[bucket.lo : bucket.hi], (3 * a + c) / 4)


@pytest.mark.parametrize("compression", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_contribution_is_rejected_and_the_rest_averaged(compression, bad):
    avg = averager(compression)
    inboxes = [avg.inbox(), avg.inbox(), avg.inbox()]
    avg.begin(5)
    b = 1
    good = [bucket_values(avg, b, 1), bucket_values(avg, b, 2)]
    poisoned = bucket_values(avg, b, 3)
    poisoned[7] = bad
    for inbox, values in zip(inboxes, [good[0], poisoned, good[1]]):
        deliver(avg, inbox, b, values, 4)
    _, rejected = avg.reduce(b, inboxes)
    assert rejected == [inboxes[1]]
    assert inboxes[1].finite[b] is False and inboxes[0].finite[b] and inboxes[2].finite[b]
    mean = avg.flat.wire[avg.buckets[b].lo : avg.buckets[b].hi].clone()
    assert torch.isfinite(mean).all()

    # The same bucket averaged over the two good workers alone gives the same numbers.
    clean = averager(compression)
    pair = [clean.inbox(), clean.inbox()]
    clean.begin(5)
    for inbox, values in zip(pair, good):
        deliver(clean, inbox, b, values, 4)
    assert clean.reduce(b, pair)[1] == []
    assert torch.equal(mean, clean.flat.wire[clean.buckets[b].lo : clean.buckets[b].hi])


def test_huge_but_finite_gradients_are_not_rejected():
    """A sum can overflow to inf with every input finite: the per-worker check must clear them."""
    avg = averager()
    inboxes = [avg.inbox(), avg.inbox()]
    avg.begin(0)
    b = 1
    values = torch.full((avg.buckets[b].numel,), 3e38)
    for inbox in inboxes:
        deliver(avg, inbox, b, values, 1)
    _, rejected = avg.reduce(b, inboxes)
    assert rejected == [] and all(i.finite[b] for i in inboxes)


def test_a_gradient_for_another_step_is_late():
    avg = averager()
    inbox = avg.inbox()
    avg.begin(3)
    bucket = avg.buckets[1]
    header = Header(MsgType.GRAD, step=2, length=4 * bucket.numel, dtype=avg.codecs[1].dtype, offset=bucket.lo,
                    count=1)
    assert avg.receive(inbox, header) == "late"
    assert not inbox.has(1, 3)
