"""Our wire codecs as DDP communication hooks, so `cluster.compression` means the same on torch.distributed.

`register(ddp, compression)` makes each rank do, per gradient bucket, what a worker and the
parameter server do between them on the TCP path: encode (local gradient + own residual) with the
codec, keep what the codec lost as the residual, exchange the payloads (one all_gather of equal-length
byte tensors, asynchronous, so DDP overlaps it with the rest of backward), decode every rank's
payload and average them in float32, summing in rank order. Every rank decodes the same bytes in the
same order, so every rank applies a bit-identical average (plain IEEE adds and one division: no
fused or reordered arithmetic that could differ between machines). An allreduce of bf16 values
would instead sum in bf16, in whatever order the backend picks; and int8 payloads carry each
rank's own scales, so they cannot be summed before decoding anyway.

Wire cost, per gradient element and rank (ring all_gather: each rank sends its payload to, and
receives one from, each of the N - 1 others): bf16/fp16 send 2 (N - 1) bytes, int8 (1 + 4 / chunk)
(N - 1) bytes. DDP's own fp32 allreduce sends 8 (N - 1) / N bytes, so the compressed exchange costs
less only while N < 4 (bf16/fp16) or N < 8 (int8): for more ranks a gather of everyone's payload,
like the parameter server's star, grows with N. "none" and "fp32" register nothing: DDP's allreduce.

Error bound: with t_r = rank r's gradient + its residual, the applied average a of N ranks obeys,
per element, |a - mean_r t_r| <= mean_r E_r + (N - 1) 2^-24 mean_r |t_r| (the float32 sum), where E_r is
the codec's bound for t_r (compress.py): bf16 2^-8 |t_r| (2^-134 for subnormal t_r), fp16 2^-11
|t_r| for 2^-14 <= |t_r| <= 65504 (2^-25 below; clamped above), int8 scale_r / 2 of the element's
chunk, scale_r = max|t_r| over the chunk / 127 (chunks of `chunk` elements counted from the start of
the bucket). The bound is relative to mean_r |t_r|, not to |mean_r t_r|: where ranks disagree in
sign the average can lose all its relative precision. Without error feedback t_r is the gradient.
With it, over any number of steps sum(a) = sum(exact averages) - mean_r(current residual_r), up to
float32 rounding: the drift is one step's error, it does not grow, and nothing is lost, not even
when DDP rebuilds its buckets after the first step (each parameter's residual moves with it).

Non-finite values pass through, as on the TCP path: a NaN or inf in one rank's bucket makes the
average non-finite on every rank (int8: its whole chunk), and that rank's residual is reset so the
next step is clean. What differs from the parameter server: no admission rules (outliers are
averaged in, and a non-finite step is the training loop's to skip), a plain mean rather than one
weighted by sample counts (DDP ranks run equal batches), and the average is not encoded again for
the way back (every rank decodes the payloads itself), so one lossy step instead of two.

The codecs work on CPU memory (memoryview payloads), so a GPU bucket (NCCL) is copied to the host
to be encoded, its payload copied back for the all_gather, and the gathered payloads decoded on
the host: correct, but a device-host round trip per bucket. On CPU (gloo) nothing model-sized is
allocated per step. Meant for float32 gradients; other float dtypes are averaged in float32 and
rounded back.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations against the real
# GradBucket and Future types, and would reject them as strings.

from dataclasses import dataclass

import torch
import torch.distributed as dist
from loguru import logger
from torch.nn.parallel import DistributedDataParallel

from smolcluster.compress import DEFAULT_CHUNK, NAMES, Codec, Encoder, make_codec

UNCOMPRESSED = ("none", "fp32")
"""Compression values that leave DDP its own fp32 allreduce."""


@dataclass(eq=False)
class _Slot:
    """One bucket's state. DDP has at most one exchange per bucket in flight, so its buffers are reused."""

    layout: tuple[int, ...]
    """id() of the bucket's parameters in buffer order: a rebuilt bucket gets a new slot."""
    encoder: Encoder
    decoder: Codec
    """Its own scratch: decoding runs on a communication thread while backward encodes other buckets."""
    decoded: torch.Tensor
    total: torch.Tensor
    gathered: torch.Tensor
    """Every rank's payload, rank after rank, on the device the exchange runs on."""


class HookState:
    """What the hook keeps between steps: a slot per bucket index, and where each parameter's residual lives."""

    def __init__(self, compression: str, error_feedback: bool = True, chunk: int = DEFAULT_CHUNK,
                 group: dist.ProcessGroup | None = None, host: bool = False) -> None:
        if compression not in NAMES or compression in UNCOMPRESSED:
            raise ValueError(f"compression hook: expected one of bf16, fp16, int8, got {compression!r}")
        self.compression, self.chunk, self.error_feedback, self.group = compression, chunk, error_feedback, group
        self.host = host
        """Exchange through CPU tensors whatever the bucket's device (gloo with an MPS model)."""
        make_codec(compression, chunk)  # a bad chunk fails here, not in the middle of backward
        self.slots: dict[int, _Slot] = {}
        self.residual_of: dict[int, torch.Tensor] = {}
        """id(parameter) -> its part of the residual of the slot that last held it."""

    def slot(self, bucket: dist.GradBucket) -> _Slot:
        params = bucket.parameters()
        layout = tuple(id(p) for p in params)
        slot = self.slots.get(bucket.index())
        if slot is None or slot.layout != layout:
            slot = self.slots[bucket.index()] = self._new_slot(bucket.index(), layout, params, bucket.buffer())
        return slot

    def _new_slot(self, index: int, layout: tuple[int, ...], params: list[torch.Tensor], buffer: torch.Tensor) -> _Slot:
        numel = buffer.numel()
        encoder = Encoder(make_codec(self.compression, self.chunk), numel, self.error_feedback)
        carried = self._adopt(encoder.residual, layout, [p.numel() for p in params]) if encoder.feedback else 0
        logger.debug(f"ddp {self.compression} hook: bucket {index} holds {len(params)} parameters, {numel} elements; "
                     f"residual carried over for {carried} of them")
        nbytes = encoder.codec.payload_nbytes(numel)
        return _Slot(layout, encoder, make_codec(self.compression, self.chunk), torch.empty(numel), torch.empty(numel),
                     torch.empty(dist.get_world_size(self.group) * nbytes, dtype=torch.uint8,
                                 device="cpu" if self.host else buffer.device))

    def _adopt(self, residual: torch.Tensor, layout: tuple[int, ...], sizes: list[int]) -> int:
        """Move each parameter's residual from the bucket that held it before DDP rebuilt its buckets.

        The old part stays valid until adopted: it is a view that keeps its old residual alive.
        Returns how many parameters brought one.
        """
        if sum(sizes) != residual.numel():  # not the layout DDP documents: start from zero, lose one step's error
            logger.warning(f"ddp hook: bucket of {residual.numel()} elements holds parameters of {sum(sizes)}; "
                           f"its error feedback residual starts from zero")
            return 0
        carried = 0
        for key, part in zip(layout, residual.split(sizes)):
            old = self.residual_of.get(key)
            if old is not None:
                part.copy_(old)
                carried += 1
            self.residual_of[key] = part
        return carried


def compress_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Encode this rank's bucket, all_gather every rank's payload, return their float32 average in the bucket."""
    buffer = bucket.buffer()
    slot = state.slot(bucket)
    local = buffer.detach().reshape(-1).to("cpu", torch.float32)  # no copy for a float32 CPU bucket
    payload = torch.frombuffer(slot.encoder.encode(local), dtype=torch.uint8).to(slot.gathered.device)
    work = dist.all_gather_into_tensor(slot.gathered, payload, group=state.group, async_op=True)
    nbytes, world = payload.numel(), slot.gathered.numel() // payload.numel()

    def average(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        fut.value()  # raises if the exchange failed
        blobs = slot.gathered.cpu().numpy()
        slot.decoder.decode(memoryview(blobs[:nbytes]), slot.total)
        for r in range(1, world):  # rank order, on every rank: bit-identical sums
            slot.decoder.decode(memoryview(blobs[r * nbytes : (r + 1) * nbytes]), slot.decoded)
            slot.total.add_(slot.decoded)
        buffer.copy_(slot.total.div_(world).view_as(buffer))
        return buffer

    return work.get_future().then(average)


def host_hook(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's fp32 average through CPU memory: gloo takes CPU tensors only, and an Apple-silicon
    GPU (MPS) has no collective library of its own."""
    buffer = bucket.buffer()
    host = buffer.detach().to("cpu", torch.float32)
    work = dist.all_reduce(host, group=group, async_op=True)
    world = dist.get_world_size(group)

    def back(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        fut.value()
        buffer.copy_(host.div_(world).view_as(buffer))
        return buffer

    return work.get_future().then(back)


def _on_device(ddp: DistributedDataParallel) -> bool:
    """The model's parameters are on an accelerator (not in CPU memory)."""
    return next((p.device.type for p in ddp.module.parameters()), "cpu") != "cpu"


def register(ddp: DistributedDataParallel, compression: str, error_feedback: bool = True,
             chunk: int = DEFAULT_CHUNK, host: bool = False) -> None:
    """Make `ddp` exchange gradients with our codec `compression` (a `cluster.compression` value).

    :param compression: "none" or "fp32" (DDP's own allreduce: nothing registered), "bf16", "fp16", "int8".
    :param error_feedback: keep each rank's rounding error and send it with the next step.
    :param chunk: int8 elements per scale, counted from the start of each bucket.
    :param host: exchange through CPU tensors (gloo) even if the model is on a GPU (MPS).
    Call before the first backward; DDP takes one comm hook per model.
    """
    if compression not in UNCOMPRESSED + NAMES:
        known = ", ".join(dict.fromkeys(UNCOMPRESSED + NAMES))
        raise ValueError(f"compression: expected one of {known}, got {compression!r}")
    if compression in UNCOMPRESSED and host and _on_device(ddp):
        ddp.register_comm_hook(ddp.process_group, host_hook)
        logger.info("ddp: gradients averaged in fp32 through CPU memory (gloo)")
        return
    if compression in UNCOMPRESSED:
        logger.info("ddp: no compression hook, gradients go through DDP's fp32 allreduce")
        return
    state = HookState(compression, error_feedback, chunk, ddp.process_group, host)
    ddp.register_comm_hook(state, compress_hook)
    logger.info(f"ddp: gradients exchanged as {compression}"
                + (f" (chunk {chunk})" if compression == "int8" else "")
                + f", error feedback {'on' if state.error_feedback else 'off'}")
