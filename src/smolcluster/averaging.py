"""The server's averaging, bucket by bucket: receive into preallocated inboxes, reduce, encode.

Each worker has an inbox: one preallocated buffer holding every bucket's payload as it arrives
(for fp32 it *is* the float32 gradient, received with recv_into and never copied). A bucket is
reduced as soon as every live worker delivered it — the weighted mean by sample count, written
in place into the server's own gradient buffer — and encoded once for all workers (the same
bytes go to each). With a lossy codec the server applies exactly what the workers will decode.

Two admission rules keep one broken contribution out of the average, bucket by bucket:
non-finite values (NaN/Inf), and an absurd norm (see `Admission`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from smolcluster import wire
from smolcluster.buckets import Bucket
from smolcluster.compress import Codec, Encoder, Fp32, make_codec
from smolcluster.flat import FlatModel
from smolcluster.wire import Header, ProtocolError


@dataclass(eq=False)
class Inbox:
    """One worker's gradient payloads for the current step."""

    buffer: bytearray
    views: list[memoryview]
    floats: list[torch.Tensor | None]
    """fp32 buckets as float32 views of `views` (None for encoded buckets)."""
    got: list[int] = field(default_factory=list)
    """Step of the last complete payload per bucket."""
    finite: list[bool] = field(default_factory=list)
    count: int = 0
    """Samples behind this step's gradient."""
    outlier: list[float] = field(default_factory=list)
    """Per bucket: norm / admission limit of a payload rejected as absurd this step, else 0."""
    late_step: int = -1
    bad_step: int = -1
    outlier_step: int = -1

    def has(self, bucket: int, step: int) -> bool:
        return self.got[bucket] == step

    def complete(self, step: int) -> bool:
        return all(g == step for g in self.got)


ALWAYS_ADMITTED = 1.0
"""A bucket norm this small is never absurd: a model near zero loss has tiny gradients whose
ratios are noise (a batch at 1e-3 after a run of 1e-5 is not a fault)."""


class Admission:
    """Rejects a bucket whose norm is more than `factor` times what is normal for that bucket.

    Normal is the median of the last `window` accepted norms of the bucket; until `warmup` of
    them exist it is the lower median of this step's norms (for two workers, the smaller one),
    so a single broken worker is caught from step 0. A norm that overflows float32 (values past
    ~1e19) is always absurd, and one of at most ALWAYS_ADMITTED never is. A broken gradient of 1e19 is finite and passes the NaN check, but
    it drives Adam's second moment so high that the model stops learning for thousands of steps.
    """

    def __init__(self, buckets: int, factor: float, window: int = 64, warmup: int = 16) -> None:
        self.factor, self.warmup = factor, warmup
        self.history: list[deque[float]] = [deque(maxlen=window) for _ in range(buckets)]

    def limits(self, b: int, norms: list[float]) -> float:
        """The largest norm of bucket `b` admitted this step, given every contribution's norm."""
        if not self.factor:
            return math.inf
        seen = sorted(self.history[b]) if len(self.history[b]) >= self.warmup else sorted(norms)
        normal = seen[(len(seen) - 1) // 2] if len(seen) > 1 else 0.0
        return max(self.factor * normal, ALWAYS_ADMITTED) if normal > 0 else math.inf

    def accept(self, b: int, norm: float) -> None:
        self.history[b].append(norm)


class Averager:
    def __init__(self, flat: FlatModel, buckets: list[Bucket], compression: str, chunk: int,
                 outlier_factor: float = 0.0) -> None:
        self.flat, self.buckets = flat, buckets
        self.admission = Admission(len(buckets), outlier_factor)
        codec = make_codec(compression, chunk)
        self.codecs: list[Codec] = [Fp32() if b.index == 0 else codec for b in buckets]  # the loss stays exact
        self.nbytes = [c.payload_nbytes(b.numel) for c, b in zip(self.codecs, buckets)]
        self.encoders = [Encoder(c, b.numel) for c, b in zip(self.codecs, buckets)]
        self.by_offset = {b.lo: b for b in buckets}
        self.step = -1
        self.reduced = [True] * len(buckets)
        self.bytes_in = self.bytes_out = 0

    def inbox(self) -> Inbox:
        buffer = bytearray(sum(self.nbytes))
        views, floats, at = [], [], 0
        for codec, n in zip(self.codecs, self.nbytes):
            view = memoryview(buffer)[at : at + n]
            views.append(view)
            floats.append(torch.frombuffer(view, dtype=torch.float32) if isinstance(codec, Fp32) and n else None)
            at += n
        k = len(self.buckets)
        return Inbox(buffer, views, floats, got=[-1] * k, finite=[True] * k, outlier=[0.0] * k)

    def begin(self, step: int) -> None:
        self.step = step
        self.reduced = [False] * len(self.buckets)
        self.bytes_in = self.bytes_out = 0

    @property
    def done(self) -> bool:
        return all(self.reduced)

    def target(self, inbox: Inbox, header: Header, peer: str) -> memoryview:
        """Where a GRAD frame's payload goes, after checking it against the bucket it claims."""
        bucket = self.by_offset.get(header.offset)
        if bucket is None:
            raise ProtocolError(f"{peer}: gradient at element {header.offset}, which starts no bucket")
        codec, want = self.codecs[bucket.index], self.nbytes[bucket.index]
        if header.dtype != codec.dtype or header.length != want:
            raise ProtocolError(f"{peer}: bucket {bucket.index} as {header.dtype.name} of {header.length} bytes, "
                                f"expected {codec.dtype.name} of {want} (cluster.compression={codec.name if bucket.index else 'fp32'})")
        if header.step == self.step and inbox.has(bucket.index, self.step):
            raise ProtocolError(f"{peer}: bucket {bucket.index} of step {self.step} twice")
        if header.step != self.step or self.reduced[bucket.index]:
            return wire.SKIP  # late: read and drop
        return inbox.views[bucket.index]

    def receive(self, inbox: Inbox, header: Header) -> str:
        """Record a complete payload: "ok", or "late" (its step or bucket is gone).

        Finiteness is judged in `reduce`, once per bucket rather than once per worker."""
        b = self.by_offset[header.offset].index
        if header.step != self.step or self.reduced[b]:
            return "late"
        inbox.got[b], inbox.count = self.step, header.count
        inbox.finite[b], inbox.outlier[b] = True, 0.0
        self.bytes_in += wire.HEADER_SIZE + header.length + wire.TRAILER_SIZE
        return "ok"

    def ready(self, inboxes: list[Inbox]) -> list[int]:
        """Buckets not yet reduced that every one of `inboxes` delivered."""
        return [b for b, done in enumerate(self.reduced)
                if not done and inboxes and all(i.has(b, self.step) for i in inboxes)]

    def reduce(self, b: int, inboxes: list[Inbox]) -> tuple[list[bytes | memoryview], list[Inbox]]:
        """Average bucket `b` over `inboxes` (those that delivered it) into the server's buffer; returns
        the AVG frame for every worker and the inboxes rejected: for a non-finite (NaN/Inf) payload
        (`finite[b]` False) or an absurd norm (`outlier[b]` > 0). `inboxes` must be in a fixed
        (worker id) order.

        NaN and Inf survive a sum, so one cheap sum of the average tells whether any input was bad
        (a per-input isfinite would cost ~25x more, on every step); only then is each checked.
        """
        bucket, codec = self.buckets[b], self.codecs[b]
        acc = self.flat.wire[bucket.lo : bucket.hi]
        usable = [i for i in inboxes if i.has(b, self.step) and i.count]
        rejected = self._outliers(b, usable) if b and self.admission.factor else []
        usable = [i for i in usable if i not in rejected]
        self._mean(b, usable, acc)
        if usable and not math.isfinite(float(acc.sum())):
            bad = [i for i in usable if not codec.finite(i.views[b], bucket.numel)]
            for i in bad:
                i.finite[b] = False
            if bad:
                rejected += bad
                self._mean(b, [i for i in usable if i.finite[b]], acc)
        payload = self.encoders[b].encode(acc)
        if codec.lossy:
            codec.decode(payload, acc)  # apply exactly what the workers will
        self.reduced[b] = True
        frames = wire.frame(wire.MsgType.AVG, payload, step=self.step, offset=bucket.lo, dtype=codec.dtype)
        return frames, rejected

    def _outliers(self, b: int, usable: list[Inbox]) -> list[Inbox]:
        """The contributions to bucket `b` whose norm is absurd; the others' norms become history.

        The loss bucket (0) is exempt: it carries a metric, not a gradient."""
        bucket, codec = self.buckets[b], self.codecs[b]
        norms = [math.sqrt(v) if v >= 0 else v for v in (codec.sqnorm(i.views[b], bucket.numel) for i in usable)]
        finite = [n for n in norms if math.isfinite(n)]
        limit = self.admission.limits(b, finite)
        out = []
        for inbox, norm in zip(usable, norms):
            if math.isnan(norm) or (math.isinf(norm) and not codec.finite(inbox.views[b], bucket.numel)):
                continue  # NaN or Inf in the payload: the non-finite check rejects (and counts) it
            if norm > limit or math.isinf(norm):
                inbox.outlier[b] = math.inf if math.isinf(norm) or math.isinf(limit) else norm / limit
                out.append(inbox)
            else:
                self.admission.accept(b, norm)
        return out

    def _mean(self, b: int, usable: list[Inbox], acc: torch.Tensor) -> None:
        """The sample-weighted mean of bucket `b` over `usable`, written into `acc` (zero if none)."""
        codec = self.codecs[b]
        total = sum(i.count for i in usable)
        if not usable:
            acc.zero_()
        elif isinstance(codec, Fp32):
            torch.mul(usable[0].floats[b], usable[0].count, out=acc)
            for i in usable[1:]:
                acc.add_(i.floats[b], alpha=i.count)
            acc.div_(total)
        else:
            acc.zero_()
            for i in usable:
                codec.accumulate(i.views[b], acc, i.count / total)
