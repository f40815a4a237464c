"""The worker's half of a step's gradient exchange: send buckets, receive their averages.

With `overlap` on, a hook on every parameter notices when backward has finished a bucket and a
sender thread encodes and sends it while backward goes on with the earlier layers (torch and
socket calls release the GIL, so the two really run at once). With it off, all buckets go out
in one `sendmsg` after backward. The numbers are the same either way.

An average may only land in a bucket's memory once that bucket has left (the fp32 payload *is*
the gradient buffer): `target` waits for the sender before it hands the memory to recv_into.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from smolcluster import wire
from smolcluster.buckets import Bucket
from smolcluster.compress import Codec, Encoder, Fp32, make_codec
from smolcluster.flat import FlatModel
from smolcluster.wire import Header, MsgType, ProtocolError

Send = Callable[[list[bytes | memoryview]], None]


class GradExchange:
    def __init__(self, flat: FlatModel, buckets: list[Bucket], compression: str, chunk: int,
                 overlap: bool, worker_id: int, send: Send, peer: str) -> None:
        # One gradient bucket has nothing to overlap with: the thread hand-off would only cost time.
        self.flat, self.buckets, self.overlap = flat, buckets, overlap and len(buckets) > 2
        self.id, self.send, self.peer = worker_id, send, peer
        codec = make_codec(compression, chunk)
        send_codecs = [Fp32() if b.index == 0 else codec for b in buckets]
        self.encoders = [Encoder(c, b.numel) for c, b in zip(send_codecs, buckets)]
        # Decoding runs on the main thread while the sender thread encodes: separate scratch space.
        self.decoders: list[Codec] = [Fp32() if b.index == 0 else make_codec(compression, chunk) for b in buckets]
        self.inbox = [None if isinstance(c, Fp32) else bytearray(c.payload_nbytes(b.numel))
                      for c, b in zip(self.decoders, buckets)]
        self.by_offset = {b.lo: b for b in buckets}
        self.bucket_of = {p: b.index for b in buckets for p in b.params}
        self.step, self.count = -1, 0
        self.pending = [0] * len(buckets)
        self.sent = [-1] * len(buckets)
        self.received = [-1] * len(buckets)
        self.error: BaseException | None = None
        self.sent_at = 0.0
        """When (time.monotonic) the last bucket sent so far left: with overlap, maybe after backward."""
        self._cond = threading.Condition()
        self._queue: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if self.overlap:
            params = [p for p in flat.model.parameters() if p.requires_grad]
            self._hooks = [p.register_post_accumulate_grad_hook(lambda _, i=i: self._ready(i))
                           for i, p in enumerate(params)]
            self._thread = threading.Thread(target=self._sender, daemon=True, name="grad-sender")
            self._thread.start()

    # --- sending ----------------------------------------------------------------------------

    def _frames(self, b: int, step: int) -> list[bytes | memoryview]:
        bucket, enc = self.buckets[b], self.encoders[b]
        self.flat.stage(bucket.lo, bucket.hi)  # from the GPU, when the model is on one
        payload = enc.encode(self.flat.wire[bucket.lo : bucket.hi])
        return wire.frame(MsgType.GRAD, payload, step=step, worker=self.id, count=self.count,
                          offset=bucket.lo, dtype=enc.codec.dtype)

    def _mark_sent(self, buckets: list[int], step: int) -> None:
        with self._cond:
            for b in buckets:
                self.sent[b] = step
            self.sent_at = time.monotonic()
            self._cond.notify_all()

    def begin(self, step: int, count: int) -> None:
        """After forward: the loss is known; send it (and, with overlap, arm the hooks)."""
        self.step, self.count = step, count
        self.pending = [len(b.params) for b in self.buckets]
        if self.overlap:
            self._queue.put((0, step))
        else:
            self.send(self._frames(0, step))
            self._mark_sent([0], step)

    def _ready(self, param: int) -> None:
        b = self.bucket_of[param]
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self._queue.put((b, self.step))

    def finish_backward(self) -> None:
        """After backward: without overlap, send every gradient bucket now, in one go."""
        if self.overlap:
            return
        frames: list[bytes | memoryview] = []
        for b in range(1, len(self.buckets)):
            frames += self._frames(b, self.step)
        self.send(frames)
        self._mark_sent(list(range(1, len(self.buckets))), self.step)

    def _sender(self) -> None:
        while (item := self._queue.get()) is not None:
            b, step = item
            try:
                self.send(self._frames(b, step))
            except BaseException as e:  # reported to the main thread, which waits on `sent`
                self.error = e
            self._mark_sent([b], step)

    def wait_sent(self) -> None:
        """Block until every bucket of the current step has left (its memory may be reused then)."""
        with self._cond:
            while any(s != self.step for s in self.sent):
                self._cond.wait()

    def restart(self) -> None:
        """After a resync: the step in flight is abandoned, and error feedback's carried-over
        rounding belongs to parameters that no longer exist."""
        self.wait_sent()
        for enc in self.encoders:
            enc.reset()
        self.received = [-1] * len(self.buckets)

    def close(self) -> None:
        if self._thread is not None:
            for hook in self._hooks:
                hook.remove()
            self._queue.put(None)
            self._thread.join(timeout=5.0)

    # --- receiving --------------------------------------------------------------------------

    def target(self, header: Header) -> memoryview:
        """Memory for an AVG frame of the current step; waits until that bucket has been sent."""
        bucket = self.by_offset.get(header.offset)
        if header.type != MsgType.AVG or header.step != self.step or bucket is None:
            raise ProtocolError(f"{self.peer}: unexpected {header.type.name} for step {header.step} "
                                f"at element {header.offset} (at step {self.step})")
        b, codec = bucket.index, self.decoders[bucket.index]
        want = codec.payload_nbytes(bucket.numel)
        if header.dtype != codec.dtype or header.length != want or self.received[b] == self.step:
            raise ProtocolError(f"{self.peer}: AVG bucket {b} as {header.dtype.name} of {header.length} bytes, "
                                f"expected one {codec.dtype.name} of {want}")
        with self._cond:
            while self.sent[b] != self.step:
                self._cond.wait()
        if self.error is not None:
            raise self.error
        inbox = self.inbox[b]
        if inbox is None:
            return memoryview(self.flat.grad_bytes)[4 * bucket.lo : 4 * bucket.hi]
        return memoryview(inbox)

    def land(self, header: Header) -> bool:
        """An AVG payload arrived: decode it in place; True once every bucket of the step is in."""
        bucket = self.by_offset[header.offset]
        inbox = self.inbox[bucket.index]
        if inbox is not None:
            self.decoders[bucket.index].decode(inbox, self.flat.wire[bucket.lo : bucket.hi])
        self.received[bucket.index] = self.step
        return all(r == self.step for r in self.received)
