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


def averager(compression: str = "fp32", outlier_factor: float = 0.0) -> Averager:
    torch.manual_seed(0)
    flat = FlatModel(nn.Sequential(nn.Linear(20, 16), nn.Linear(16, 4)))
    buckets = make_buckets([p.numel() for p in flat.model.parameters()], 200)
    return Averager(flat, buckets, compression, 64, outlier_factor)


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


# --- the admission rule: absurd but finite norms ------------------------------------------------


def step_with(avg: Averager, inboxes: list[Inbox], step: int, b: int, scales: list[float]) -> list[Inbox]:
    """Deliver bucket `b` from each inbox (seeded values times its scale) and reduce; the rejected."""
    avg.begin(step)
    for k, (inbox, scale) in enumerate(zip(inboxes, scales)):
        deliver(avg, inbox, b, bucket_values(avg, b, 100 * step + k) * scale, 4)
    return avg.reduce(b, inboxes)[1]


@pytest.mark.parametrize("compression", ["fp32", "bf16", "int8"])
def test_from_the_first_step_a_worker_far_above_the_others_is_rejected(compression):
    avg = averager(compression, outlier_factor=10)
    inboxes = [avg.inbox(), avg.inbox()]
    rejected = step_with(avg, inboxes, 0, 1, [1.0, 1e4])  # finite, and 1e4 times the other's norm
    assert rejected == [inboxes[1]]
    assert 500 < inboxes[1].outlier[1] < 2000 and inboxes[1].finite[1]  # ~1e4 / 10: its norm over the limit
    mean = avg.flat.wire[avg.buckets[1].lo : avg.buckets[1].hi]
    assert torch.isfinite(mean).all()
    solo = averager(compression)
    one = [solo.inbox()]
    step_with(solo, one, 0, 1, [1.0])
    assert torch.equal(mean, solo.flat.wire[solo.buckets[1].lo : solo.buckets[1].hi])


def test_after_warm_up_norms_are_judged_against_the_running_median():
    avg = averager(outlier_factor=10)
    inboxes = [avg.inbox(), avg.inbox()]
    for step in range(10):  # 20 accepted norms: past the warm-up
        assert step_with(avg, inboxes, step, 1, [1.0, 1.0]) == []
    # Both workers 8x (within the factor): accepted, though the pair agrees with each other anyway.
    assert step_with(avg, inboxes, 10, 1, [8.0, 8.0]) == []
    # Both at 50x: the step's own median would accept them; the history does not.
    assert step_with(avg, inboxes, 11, 1, [50.0, 50.0]) == inboxes
    assert all(i.outlier[1] > 1 for i in inboxes)


def test_a_norm_beyond_float32_is_always_rejected_and_the_loss_bucket_is_exempt():
    avg = averager(outlier_factor=10)
    inbox = [avg.inbox()]
    assert step_with(avg, inbox, 0, 1, [1e30]) == inbox  # alone: no other norm to compare with
    assert inbox[0].outlier[1] == float("inf")
    assert step_with(avg, inbox, 1, 0, [1e30]) == []  # bucket 0 is the loss: a metric


def test_factor_zero_turns_the_rule_off():
    avg = averager(outlier_factor=0)
    inboxes = [avg.inbox(), avg.inbox()]
    assert step_with(avg, inboxes, 0, 1, [1.0, 1e15]) == []


@pytest.mark.parametrize("compression", ["fp32", "bf16", "fp16", "int8"])
def test_each_codec_measures_the_norm_of_what_it_decodes(compression):
    codec = make_codec(compression, 64)
    values = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    payload = Encoder(codec, 1000, error_feedback=False).encode(values)
    decoded = torch.empty(1000)
    codec.decode(payload, decoded)
    assert codec.sqnorm(payload, 1000) == pytest.approx(float(decoded.double().square().sum()), rel=1e-5)
