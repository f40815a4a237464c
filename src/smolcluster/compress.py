"""Wire compression of the flat float32 gradient: fp32 (exact), bf16, fp16, int8, with error feedback.

Wire formats (the payload of one tensor frame; all little-endian, `n` = number of elements):

    codec  DType  payload
    fp32   F32    n x float32                               (4n bytes: the buffer itself)
    bf16   BF16   n x bfloat16                              (2n bytes)
    fp16   F16    n x float16                               (2n bytes)
    int8   I8     k x float32 scale, then n x int8 q        (4k + n bytes, k = ceil(n / chunk))

int8: element i belongs to chunk i // chunk (the last chunk may be partial) and decodes to
`q[i] * scale[i // chunk]`; the encoder writes `scale = max|x| / 127` and `q = round(x / scale)` in
-127..127 (a zero chunk has scale 0). Both sides must agree on `chunk`: put it in the config
fingerprint, as the length check catches a mismatch only when the number of chunks differs.

bf16 and fp16 round to nearest even; finite values beyond the type's range clamp to its largest
finite value instead of becoming inf, while NaN and +-inf pass through, so a broken gradient still
reaches the server as non-finite. An int8 chunk holding a NaN or inf gets a non-finite scale and
decodes to non-finite values throughout (NaN, or +-inf where the input was). A chunk whose max|x|
is within ~1e-7 of float32's max decodes its largest values to +-inf (127 * scale overflows): the
step is then rejected as non-finite rather than sent wrong.
int8 chunks with max|x| below ~1.5e-36 get a subnormal or zero scale: their error may exceed
scale / 2 but stays below 2^-142.

Decoding from a peer trusts nothing: the length must equal `payload_nbytes(numel)` (else
`wire.ProtocolError`), bytes are only ever viewed as numbers (no pickle), and whatever numbers a
peer sends decode to float32 values: a NaN/inf scale, an int8 of -128 or a huge scale decode to
non-finite or out-of-the-usual-range floats, which the server's finiteness check must judge.

Lossy codecs are meant to be used through an `Encoder`, which keeps the error feedback residual:
it sends `x + residual` and keeps what the codec lost, so over many steps nothing is lost.

Cost: the hot path allocates nothing model-sized (checked with torch.profiler). `Encoder`
preallocates its payload and residual; codecs work in blocks of BLOCK elements through a 1 MiB
scratch, because torch's mixed-dtype kernels (`acc.add_(bf16)`, `mul(int8, f32)`) silently make a
float32 copy of their whole input, and because a block stays in cache across the 3-6 passes that
encoding with error feedback takes. bf16/fp16 allocate only when some value is out of range or
non-finite (rare, and then correctness beats speed).
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import ClassVar, Iterator

import torch
from loguru import logger

from smolcluster.wire import DType, ProtocolError

if sys.byteorder != "little":  # payloads are written as native tensor bytes
    raise ImportError("smolcluster.compress assumes a little-endian machine")

Buffer = bytes | bytearray | memoryview

NAMES = ("fp32", "bf16", "fp16", "int8")
"""Values of the config key `cluster.compression`."""

DEFAULT_CHUNK = 2048
"""int8 elements per scale: 0.2% overhead, and an outlier coarsens only its own 2048 neighbours."""


BLOCK = 1 << 18
"""Elements per block of work (1 MiB of float32): big enough to amortise Python, small enough for L2."""


def _bytes(buf: Buffer) -> memoryview:
    return memoryview(buf).cast("B")


def _view(buf: Buffer, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """`count` elements of `dtype` at byte `offset` of `buf`, without a copy."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    mv = _bytes(buf)
    if mv.readonly:  # only ever read; torch warns about read-only buffers regardless
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(mv, dtype=dtype, count=count, offset=offset)
    return torch.frombuffer(mv, dtype=dtype, count=count, offset=offset)


def _check_src(src: torch.Tensor) -> None:
    if src.dtype != torch.float32 or src.dim() != 1 or not src.is_contiguous() or src.device.type != "cpu":
        raise ValueError(
            f"encode needs a contiguous 1-D float32 CPU tensor, got {src.dtype} shape {tuple(src.shape)} "
            f"on {src.device} (contiguous={src.is_contiguous()})"
        )


def _finite(*values: torch.Tensor) -> bool:
    return all(math.isfinite(float(v)) for v in values)


class Codec:
    """One wire format. Keeps a block-sized scratch, so use one instance per thread."""

    name: ClassVar[str]
    dtype: ClassVar[DType]
    lossy: ClassVar[bool]

    def __init__(self) -> None:
        self._scratch = torch.empty(BLOCK)

    def payload_nbytes(self, numel: int) -> int:
        """Bytes on the wire for `numel` elements: check a frame's length against it before reading."""
        raise NotImplementedError

    def encode(self, src: torch.Tensor, out: Buffer | None = None) -> memoryview:
        """Write the payload of `src` into `out` (allocated if None); returns exactly its bytes."""
        _check_src(src)
        return self._encode(src, self._out(src.numel(), out), None)[0]

    def decode(self, payload: Buffer, out: torch.Tensor) -> None:
        """Overwrite `out` (float32, numel elements) with the decoded payload."""
        raise NotImplementedError

    def accumulate(self, payload: Buffer, acc: torch.Tensor, weight: float = 1.0) -> None:
        """acc += weight * decode(payload), with no model-sized temporary (the server's weighted sum)."""
        raise NotImplementedError

    def finite(self, payload: Buffer, numel: int) -> bool:
        """Whether the payload decodes to finite values only (the server rejects it otherwise)."""
        raise NotImplementedError

    def sqnorm(self, payload: Buffer, numel: int) -> float:
        """Squared L2 norm of the decoded payload, summed in float32: inf for a finite payload means
        values beyond ~1.8e19 (the server's admission rule rejects those), NaN for a NaN payload."""
        raise NotImplementedError

    def _encode(self, src: torch.Tensor, out: memoryview, residual: torch.Tensor | None) -> tuple[memoryview, bool]:
        """Encode `src`, or with a residual: residual += src, encode it, residual -= decoded.

        Block by block, so each block is still in cache for the next operation. Also says whether
        every encoded value was finite (if not, the residual is garbage and the Encoder resets it).
        """
        raise NotImplementedError

    def _out(self, numel: int, out: Buffer | None) -> memoryview:
        want = self.payload_nbytes(numel)
        mv = _bytes(bytearray(want) if out is None else out)
        if mv.readonly or mv.nbytes < want:
            raise ValueError(f"{self.name}: output buffer of {mv.nbytes} bytes (readonly={mv.readonly}), need {want}")
        return mv[:want]

    def _payload(self, payload: Buffer, out: torch.Tensor) -> memoryview:
        """The payload as bytes, after checking it against what `out` implies (it came from a peer)."""
        if out.dtype != torch.float32 or out.dim() != 1 or not out.is_contiguous():
            raise ValueError(f"{self.name}: decode target must be contiguous 1-D float32, got {out.dtype} {tuple(out.shape)}")
        mv = _bytes(payload)
        want = self.payload_nbytes(out.numel())
        if mv.nbytes != want:
            raise ProtocolError(
                f"{self.name} payload of {mv.nbytes} bytes, expected {want} for {out.numel()} elements"
            )
        return mv

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Fp32(Codec):
    """Exact: the payload is the float32 buffer itself (zero-copy when `out` is None)."""

    name, dtype, lossy = "fp32", DType.F32, False

    def __init__(self) -> None:
        self._scratch = torch.empty(0)

    def payload_nbytes(self, numel: int) -> int:
        return 4 * numel

    def encode(self, src: torch.Tensor, out: Buffer | None = None) -> memoryview:
        _check_src(src)
        if out is None:
            return _bytes(src.numpy()) if src.numel() else memoryview(b"")
        return self._encode(src, self._out(src.numel(), out), None)[0]

    def _encode(self, src: torch.Tensor, out: memoryview, residual: torch.Tensor | None) -> tuple[memoryview, bool]:
        _view(out, torch.float32, src.numel()).copy_(src)
        return out, True

    def decode(self, payload: Buffer, out: torch.Tensor) -> None:
        out.copy_(_view(self._payload(payload, out), torch.float32, out.numel()))

    def accumulate(self, payload: Buffer, acc: torch.Tensor, weight: float = 1.0) -> None:
        acc.add_(_view(self._payload(payload, acc), torch.float32, acc.numel()), alpha=weight)

    def finite(self, payload: Buffer, numel: int) -> bool:
        return bool(torch.isfinite(_view(payload, torch.float32, numel)).all())

    def sqnorm(self, payload: Buffer, numel: int) -> float:
        x = _view(payload, torch.float32, numel)
        return float(torch.dot(x, x))


class _Cast(Codec):
    """A cast to a 16-bit float with clamping to its finite range; NaN and inf pass through."""

    lossy = True
    target: ClassVar[torch.dtype]

    def __init__(self) -> None:
        super().__init__()
        self.max = float(torch.finfo(self.target).max)

    def payload_nbytes(self, numel: int) -> int:
        return 2 * numel

    def _encode(self, src: torch.Tensor, out: memoryview, residual: torch.Tensor | None) -> tuple[memoryview, bool]:
        n = src.numel()
        dst = _view(out, self.target, n)
        finite = True
        for i in range(0, n, BLOCK):
            x, d = src[i : i + BLOCK], dst[i : i + BLOCK]
            t = x if residual is None else residual[i : i + BLOCK].add_(x)
            finite &= self._cast(t, d)
            if residual is not None:
                w = self._scratch[: t.numel()]
                t.sub_(w.copy_(d))  # mixed-dtype ops allocate a float32 copy; this does not
        return out, finite

    def _cast(self, t: torch.Tensor, d: torch.Tensor) -> bool:
        lo, hi = torch.aminmax(t)  # NaN propagates into both
        if -self.max <= float(lo) and float(hi) <= self.max:
            d.copy_(t)  # the common case: in range, a plain round-to-nearest-even cast
            return True
        # Rare: clamp finite values only (a copy would round them to inf); small temporaries.
        d.copy_(torch.where(t.isinf(), t, t.clamp(-self.max, self.max)))
        return _finite(lo, hi)

    def decode(self, payload: Buffer, out: torch.Tensor) -> None:
        out.copy_(_view(self._payload(payload, out), self.target, out.numel()))

    def accumulate(self, payload: Buffer, acc: torch.Tensor, weight: float = 1.0) -> None:
        src = _view(self._payload(payload, acc), self.target, acc.numel())
        for i in range(0, acc.numel(), BLOCK):
            a = acc[i : i + BLOCK]
            a.add_(self._scratch[: a.numel()].copy_(src[i : i + BLOCK]), alpha=weight)

    def finite(self, payload: Buffer, numel: int) -> bool:
        return bool(torch.isfinite(_view(payload, self.target, numel)).all())

    def sqnorm(self, payload: Buffer, numel: int) -> float:
        src, total = _view(payload, self.target, numel), 0.0
        for i in range(0, numel, BLOCK):
            x = self._scratch[: min(BLOCK, numel - i)].copy_(src[i : i + BLOCK])
            total += float(torch.dot(x, x))
        return total


class Bf16(_Cast):
    """bfloat16: float32's range, 8 significant bits (relative error <= 2^-8). The safe 16-bit choice."""

    name, dtype, target = "bf16", DType.BF16, torch.bfloat16


class Fp16(_Cast):
    """float16: 11 significant bits (relative error <= 2^-11) but range 6.1e-5..65504: gradients
    below 2^-25 round to 0 and large ones clamp, so use it with error feedback or prefer bf16."""

    name, dtype, target = "fp16", DType.F16, torch.float16


class Int8(Codec):
    """Symmetric int8 with one float32 scale per `chunk` elements: |error| <= scale / 2 per element."""

    name, dtype, lossy = "int8", DType.I8, True

    def __init__(self, chunk: int = DEFAULT_CHUNK) -> None:
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"int8 chunk must be an int >= 1, got {chunk!r}")
        self.chunk = chunk
        self._rows = max(1, BLOCK // chunk)  # chunks per block
        self._scratch = torch.empty(self._rows * chunk)

    def __repr__(self) -> str:
        return f"Int8(chunk={self.chunk})"

    def chunks(self, numel: int) -> int:
        return -(-numel // self.chunk)

    def payload_nbytes(self, numel: int) -> int:
        return 4 * self.chunks(numel) + numel

    def _blocks(self, numel: int) -> Iterator[tuple[slice, slice, tuple[int, int]]]:
        """(chunk slice, element slice, (chunks, chunk length)) of whole-chunk blocks, then the partial chunk."""
        c, full = self.chunk, numel // self.chunk
        for r in range(0, full, self._rows):
            r1 = min(r + self._rows, full)
            yield slice(r, r1), slice(r * c, r1 * c), (r1 - r, c)
        if numel % c:
            yield slice(full, full + 1), slice(full * c, numel), (1, numel % c)

    def _split(self, mv: memoryview, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.chunks(numel)
        return _view(mv, torch.float32, k), _view(mv, torch.int8, numel, offset=4 * k)

    def _encode(self, src: torch.Tensor, out: memoryview, residual: torch.Tensor | None) -> tuple[memoryview, bool]:
        scales, q = self._split(out, src.numel())
        finite = True
        for rows, els, shape in self._blocks(src.numel()):
            t = src[els].view(shape)
            if residual is not None:
                t = residual[els].view(shape).add_(t)
            s, w = scales[rows], self._scratch[: t.numel()].view(shape)
            # amin and amax, not aminmax(dim=) (5x slower here) nor abs() (a temporary).
            lo, hi = torch.amin(t, dim=1), torch.amax(t, dim=1)  # NaN propagates into the scale
            torch.div(torch.maximum(lo.neg_(), hi).abs_(), 127.0, out=s)  # abs_: -0.0 -> 0.0
            # Zero chunks divide by 1 (q = 0). Division, not a reciprocal: 1/scale overflows for tiny scales.
            torch.div(t, torch.where(s > 0, s, 1.0)[:, None], out=w)
            # Clamp: a subnormal scale is inexact, so |x / scale| may round past 127. Never 128 or wrap.
            w.round_().clamp_(-127.0, 127.0)
            if not bool(torch.isfinite(s * 127.0).all()):  # also a max|x| so near float32's max that q * scale overflows
                finite = False
                w.nan_to_num_(nan=0.0)  # q of a NaN is 0; its chunk decodes to NaN via the scale
            q[els].view(shape).copy_(w)
            if residual is not None:
                t.addcmul_(w, s[:, None], value=-1.0)
        return out, finite

    def decode(self, payload: Buffer, out: torch.Tensor) -> None:
        scales, q = self._split(self._payload(payload, out), out.numel())
        for rows, els, shape in self._blocks(out.numel()):
            o = out[els].view(shape)
            o.copy_(q[els].view(shape)).mul_(scales[rows, None])

    def finite(self, payload: Buffer, numel: int) -> bool:
        scales, _ = self._split(_bytes(payload), numel)
        return bool(torch.isfinite(scales * 127.0).all())

    def sqnorm(self, payload: Buffer, numel: int) -> float:
        scales, q = self._split(_bytes(payload), numel)
        total = 0.0
        for rows, els, shape in self._blocks(numel):
            w = self._scratch[: els.stop - els.start].view(shape).copy_(q[els].view(shape))
            total += float(torch.dot(w.mul_(w).sum(1), scales[rows] * scales[rows]))
        return total

    def accumulate(self, payload: Buffer, acc: torch.Tensor, weight: float = 1.0) -> None:
        scales, q = self._split(self._payload(payload, acc), acc.numel())
        for rows, els, shape in self._blocks(acc.numel()):
            w = self._scratch[: els.stop - els.start].view(shape).copy_(q[els].view(shape))
            acc[els].view(shape).addcmul_(w, scales[rows, None], value=weight)


def make_codec(name: str, chunk: int = DEFAULT_CHUNK) -> Codec:
    """The codec for `cluster.compression`; `chunk` is used by int8 only."""
    if name == "int8":
        return Int8(chunk)
    codecs: dict[str, type[Codec]] = {"fp32": Fp32, "bf16": Bf16, "fp16": Fp16}
    if name not in codecs:
        raise ValueError(f"cluster.compression: expected one of {', '.join(NAMES)}, got {name!r}")
    return codecs[name]()


def codec_for_dtype(dtype: DType, chunk: int = DEFAULT_CHUNK) -> Codec:
    """The codec for a frame header's dtype (a receiver decodes what the header says, if it accepts it)."""
    names = {DType.F32: "fp32", DType.BF16: "bf16", DType.F16: "fp16", DType.I8: "int8"}
    if dtype not in names:
        raise ProtocolError(f"no codec for dtype {dtype!r}")
    return make_codec(names[dtype], chunk)


class Encoder:
    """One sender's encoder for one buffer size: preallocated payload, and error feedback if lossy.

    It sends `t = x + residual` and keeps `residual = t - decode(payload)`, so over any number of
    steps `sum(decoded) + residual == sum(inputs)` up to float32 rounding: what one step rounds away
    (or clamps, or flushes to zero) is sent later. A step with a non-finite input resets the
    residual to zero (else NaN would poison every later step); that step's payload stays non-finite.
    """

    def __init__(self, codec: Codec, numel: int, error_feedback: bool = True) -> None:
        self.codec, self.numel = codec, numel
        self.feedback = error_feedback and codec.lossy
        self.payload = bytearray(codec.payload_nbytes(numel))
        self.residual = torch.zeros(numel if self.feedback else 0)
        self.resets = 0
        """Steps whose input was non-finite (each one dropped the residual)."""

    def encode(self, src: torch.Tensor) -> memoryview:
        """The payload for `src` (float32, numel elements); valid until the next call.

        fp32 returns `src`'s own bytes (zero-copy): do not change `src` while they are being sent.
        """
        _check_src(src)
        if src.numel() != self.numel:
            raise ValueError(f"encoder built for {self.numel} elements, got {src.numel()}")
        if isinstance(self.codec, Fp32):
            return self.codec.encode(src)
        payload, finite = self.codec._encode(src, memoryview(self.payload), self.residual if self.feedback else None)
        if not finite and self.feedback:
            self.residual.zero_()
            self.resets += 1
            logger.warning(f"{self.codec.name} encoder: non-finite gradient; error feedback residual reset")
        return payload

    def reset(self) -> None:
        """Forget the residual (e.g. after a rejoin, when the old steps' errors no longer apply)."""
        self.residual.zero_()
