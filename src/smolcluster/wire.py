"""The wire protocol: versioned, length-prefixed binary frames. No pickle, ever.

A frame is a fixed 36-byte header, then `length` payload bytes, then an 8-byte checksum trailer:

    offset     size   field
    0          4      magic    b"SMCL"
    4          1      version  PROTOCOL_VERSION
    5          1      type     MsgType
    6          1      dtype    DType of a tensor payload (NONE for JSON / empty, RAW for safetensors)
    7          1      flags    reserved, 0
    8          4      worker   worker id (1..N; 0 for the server)
    12         8      step     training step the frame belongs to
    20         8      offset   first element of a tensor payload within the flat buffer
    28         4      count    samples behind a gradient (GRAD); 0 otherwise
    32         4      length   payload bytes
    36         length payload  the frame's payload
    36+length  8      trailer  xxh3_64 digest of the header's 36 bytes followed by the payload

all big-endian (the digest too: xxhash's canonical form). Tensor payloads are raw little-endian
element bytes of one contiguous slice of the flat parameter order; control payloads are UTF-8 JSON
objects of at most MAX_JSON bytes. A receiver checks every length against what the model implies
*before* it reads the payload, and reads tensor payloads straight into preallocated buffers with
`recv_into`.

The trailer is checked after the payload arrived and *before* the frame is handed on: a peer that
announces more bytes than it sends (so the next frame's bytes would be read as payload), or any
other misaligned or corrupted frame, is a ProtocolError and nothing of it is used. Skipped payloads
are hashed too, so a misaligned stream is caught whatever the receiver does with the bytes.
xxh3_64 is no MAC: it catches broken peers and corrupted or misaligned streams, not a forger on the
path (TLS is for that).
"""

from __future__ import annotations

import enum
import json
import socket
import ssl
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import xxhash

from smolcluster.errors import ConnectionClosed, ProtocolError

MAGIC = b"SMCL"
PROTOCOL_VERSION = 2
HEADER = struct.Struct("!4sBBBBIQQII")
HEADER_SIZE = HEADER.size
TRAILER_SIZE = 8
"""The xxh3_64 digest after every payload: a frame is HEADER_SIZE + length + TRAILER_SIZE bytes."""
MAX_JSON = 64 * 1024
MAX_U32 = 2**32 - 1
_SKIP_CHUNK = 64 * 1024
_IOV_MAX = 64


class MsgType(enum.IntEnum):
    HELLO = 1  # worker -> server, JSON: id, config fingerprint, layout
    WELCOME = 2  # server -> worker, JSON: the run's shape (steps, workers) and its W&B group
    REJECT = 3  # server -> worker, JSON: why the handshake was refused
    PARAMS = 4  # server -> worker, tensor: parameters to start from at `step`
    GRAD = 5  # worker -> server, tensor: gradient of `step` over `count` samples
    AVG = 6  # server -> worker, tensor: averaged gradient of `step`
    CHECKSUM = 7  # worker -> server, JSON: crc32 of the parameters after `step`
    DONE = 8  # server -> worker, JSON: final metrics; training is over
    BYE = 9  # worker -> server: clean goodbye
    ERROR = 10  # either way, JSON: a fatal error the peer should print
    HEARTBEAT = 11  # either way, empty: still alive
    CHALLENGE = 12  # server -> worker, JSON: nonce for the token proof
    # 13 was AUTH (the proof now rides in HELLO); the number stays unused
    STATE = 14  # server -> worker, tensor: optimizer state for a rejoining worker
    STATS = 15  # worker -> server, JSON: its speed (training.balance), step-time parts and bytes (stats.py)
    PLAN = 16  # server -> worker, JSON: its batch and local steps from `step` on (training.balance)


class DType(enum.IntEnum):
    NONE = 0
    F32 = 1
    BF16 = 2
    F16 = 3
    I8 = 4
    RAW = 5  # opaque bytes with their own self-describing, code-free format (safetensors)


JSON_TYPES = frozenset(
    {MsgType.HELLO, MsgType.WELCOME, MsgType.REJECT, MsgType.CHECKSUM, MsgType.DONE, MsgType.ERROR,
     MsgType.CHALLENGE, MsgType.STATS, MsgType.PLAN}
)
EMPTY_TYPES = frozenset({MsgType.BYE, MsgType.HEARTBEAT})
TENSOR_DTYPES = frozenset({DType.F32, DType.BF16, DType.F16, DType.I8})
ALLOWED_DTYPES: dict[MsgType, frozenset[DType]] = {
    **{t: frozenset({DType.NONE}) for t in JSON_TYPES | EMPTY_TYPES},
    MsgType.PARAMS: TENSOR_DTYPES, MsgType.GRAD: TENSOR_DTYPES, MsgType.AVG: TENSOR_DTYPES,
    MsgType.STATE: frozenset({DType.RAW}),
}


@dataclass(slots=True, frozen=True)
class Header:
    type: MsgType
    step: int = 0
    worker: int = 0
    length: int = 0
    dtype: DType = DType.NONE
    offset: int = 0
    count: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, PROTOCOL_VERSION, self.type, self.dtype, 0, self.worker, self.step, self.offset,
            self.count, self.length,
        )


def unpack_header(buf: bytes | bytearray | memoryview, peer: str) -> Header:
    """Parse and check a header; anything off is a ProtocolError naming `peer`."""
    if len(buf) != HEADER_SIZE:
        raise ProtocolError(f"{peer}: truncated header ({len(buf)} of {HEADER_SIZE} bytes)")
    magic, version, mtype, dtype, flags, worker, step, offset, count, length = HEADER.unpack(buf)
    if magic != MAGIC:
        hint = " (a pickle?)" if b"\x80" in bytes(buf[:8]) else ""
        raise ProtocolError(f"{peer}: bad magic {bytes(magic)!r}{hint}: not a smolcluster peer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{peer}: speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}: "
            "run the same smolcluster version everywhere"
        )
    try:
        mtype = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"{peer}: unknown message type {mtype}") from None
    try:
        dtype = DType(dtype)
    except ValueError:
        raise ProtocolError(f"{peer}: unknown dtype {dtype} in {mtype.name}") from None
    if flags != 0:
        raise ProtocolError(f"{peer}: unknown flags {flags:#x} in {mtype.name}")
    if mtype in JSON_TYPES and length > MAX_JSON:
        raise ProtocolError(f"{peer}: {mtype.name} of {length} bytes exceeds the {MAX_JSON}-byte limit")
    if mtype in EMPTY_TYPES and length:
        raise ProtocolError(f"{peer}: {mtype.name} must be empty, has {length} bytes")
    if dtype not in ALLOWED_DTYPES[mtype]:
        raise ProtocolError(f"{peer}: {mtype.name} with dtype {dtype.name}")
    return Header(mtype, step, worker, length, dtype, offset, count)


def encode_json(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_JSON:
        raise ValueError(f"control message of {len(data)} bytes exceeds {MAX_JSON}")
    return data


def decode_json(payload: bytes | bytearray | memoryview, header: Header, peer: str) -> dict[str, Any]:
    """JSON only (never pickle): a peer's bytes are data, not code."""
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except RecursionError:  # e.g. 60,000 '[': the C scanner gives up; one line, not a traceback
        raise ProtocolError(f"{peer}: {header.type.name} payload is JSON nested too deeply") from None
    except ValueError as e:  # not UTF-8, not JSON, or an integer of more than 4300 digits
        raise ProtocolError(f"{peer}: {header.type.name} payload is not UTF-8 JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{peer}: {header.type.name} payload is not a JSON object")
    return obj


def frame(mtype: MsgType, payload: Any = b"", **fields: Any) -> list[bytes | memoryview]:
    """Header, payload and trailer as a list of buffers for sendmsg (the payload is not copied);
    `payload` may be a dict (sent as JSON). The payload must not change until it has been sent."""
    if isinstance(payload, dict):
        payload = encode_json(payload)
    view = memoryview(payload).cast("B")
    if view.nbytes > MAX_U32:
        raise ValueError(f"payload of {view.nbytes} bytes does not fit a frame")
    header = Header(mtype, length=view.nbytes, **fields).pack()
    hasher = xxhash.xxh3_64(header)
    hasher.update(view)
    return [header, view, hasher.digest()] if view.nbytes else [header, hasher.digest()]


def _check_trailer(hasher: Any, trailer: bytes | bytearray | memoryview, header: Header, peer: str) -> None:
    """Refuse a frame whose bytes are not the ones its sender hashed (misaligned, cut, corrupted)."""
    if hasher.digest() != bytes(trailer):
        raise ProtocolError(
            f"{peer}: {header.type.name} frame for step {header.step} failed its checksum: the payload is not "
            "what was sent (a frame announced more bytes than it carried?)"
        )


# --- blocking I/O (workers) -------------------------------------------------------------------


def send_frame(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """Send all buffers with as few syscalls as the kernel allows (no joining copy)."""
    views = deque(memoryview(b).cast("B") for b in buffers)
    if isinstance(sock, ssl.SSLSocket) or not isinstance(sock, socket.socket):  # TLS has no sendmsg
        for view in views:
            sock.sendall(view)
        return
    while views:
        _consume(views, sock.sendmsg(list(views)[:_IOV_MAX]))


def _consume(views: deque[memoryview], sent: int) -> None:
    """Drop `sent` bytes from the front of a queue of buffers."""
    while sent:
        head = views[0]
        if sent >= head.nbytes:
            sent -= head.nbytes
            views.popleft()
        else:
            views[0] = head[sent:]
            sent = 0


def recv_exact(sock: socket.socket, view: memoryview, peer: str, hasher: Any = None) -> None:
    """Fill `view`; with a `hasher`, hash each piece as it lands (while it is still in cache)."""
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionClosed(f"{peer} closed the connection")
        if hasher is not None:
            hasher.update(view[got : got + n])
        got += n


def read_frame(
    sock: socket.socket, peer: str, target: Callable[[Header], memoryview | None]
) -> tuple[Header, memoryview]:
    """Read one frame; tensor payloads go into `target(header)`, control payloads are returned.

    The frame is returned only once its trailer matched (ProtocolError otherwise); a tensor payload
    that failed has still been written into `target`'s memory, so the caller must not use it then.
    """
    raw = bytearray(HEADER_SIZE)
    recv_exact(sock, memoryview(raw), peer)
    header = unpack_header(raw, peer)
    dest = target(header) if header.dtype != DType.NONE else None
    if dest is None:
        dest = memoryview(bytearray(header.length))
    elif dest.nbytes != header.length:
        raise ProtocolError(
            f"{peer}: {header.type.name} payload of {header.length} bytes, expected {dest.nbytes}"
        )
    hasher = xxhash.xxh3_64(raw)
    recv_exact(sock, dest, peer, hasher)
    trailer = bytearray(TRAILER_SIZE)
    recv_exact(sock, memoryview(trailer), peer)
    _check_trailer(hasher, trailer, header, peer)
    return header, dest


# --- non-blocking I/O (the server's event loop) -----------------------------------------------

SKIP = memoryview(bytearray(0))
"""Returned by a target callback: read this frame's payload and throw it away."""


class FrameReader:
    """Reads frames from a non-blocking socket as bytes arrive, into buffers the owner picks.

    `target(header)` is called once the header is complete: it returns a memoryview of exactly
    `header.length` bytes to receive the payload into, `SKIP` to discard it, or None for a control
    payload (bounded by MAX_JSON, so allocating it is safe). It raises ProtocolError to refuse.
    A frame is handed on only once its trailer matched: one that fails is a ProtocolError, and what
    it wrote into the target's memory must not be used (the server never marks it received).
    """

    def __init__(self, sock: socket.socket, peer: str, target: Callable[[Header], memoryview | None]):
        self.sock, self.peer, self.target = sock, peer, target
        self._head = bytearray(HEADER_SIZE)
        self._tail = bytearray(TRAILER_SIZE)
        self._header: Header | None = None
        self._payload = SKIP
        """Where the current frame's payload goes (SKIP: hashed and thrown away)."""
        self._in_trailer = False
        self._hasher: Any = None
        self._dest = memoryview(self._head)
        self._got = 0
        self._skip_left = 0
        self._scratch = bytearray(0)
        self._error: Exception | None = None

    def read(self) -> Iterator[tuple[Header, memoryview]]:
        """Frames as they complete, until the socket has no more bytes; raises ConnectionClosed on
        EOF and ProtocolError on bad input, after the frames that completed before it (a BYE
        followed by a close must be seen as a BYE). Once raised, the error is raised by every later
        call: the stream is out of step, nothing more from it can be trusted.

        A generator, so that the owner handles frame k (the server marks its bucket received)
        before `target` decides where frame k+1 goes. Were a batch collected first, a second copy
        of a bucket in the same batch would pass the duplicate check and land over the first copy,
        and a copy that then failed its checksum would leave its bytes under a delivered bucket.
        Stop iterating only at a yield (a frame boundary); the next call goes on from there.
        """
        if self._error is not None:
            raise self._error
        try:
            while True:
                want = self._want()
                try:
                    n = self.sock.recv_into(want)
                except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return
                if n == 0:
                    raise ConnectionClosed(f"{self.peer} closed the connection", self._cut_off())
                frame = self._advance(want[:n])
                if frame is not None:
                    yield frame
        except (ConnectionClosed, ProtocolError) as e:
            self._error = e
            raise

    def _want(self) -> memoryview:
        """The memory the next recv fills: a chunk of scratch while skipping, else the rest of `_dest`."""
        if self._skip_left:
            if not self._scratch:
                self._scratch = bytearray(_SKIP_CHUNK)
            return memoryview(self._scratch)[: min(self._skip_left, _SKIP_CHUNK)]
        return self._dest[self._got :]

    def _advance(self, got: memoryview) -> tuple[Header, memoryview] | None:
        """Account for `got` (just received); the frame, once its trailer is in and matches."""
        if self._header is not None and not self._in_trailer:
            self._hasher.update(got)  # payload bytes, hashed while they are still in cache
        if self._skip_left:
            self._skip_left -= got.nbytes
            if not self._skip_left:
                self._start_trailer()
            return None
        self._got += got.nbytes
        if self._got < self._dest.nbytes:
            return None
        if self._header is None:
            self._start_payload()
        elif not self._in_trailer:
            self._start_trailer()
        else:
            return self._finish()
        return None

    def _cut_off(self) -> str:
        """Where a frame was cut by the EOF, if it was: the log should say a frame was lost."""
        if self._header is not None:
            name = self._header.type.name
            if self._in_trailer:
                return f" in the middle of a {name} frame (its checksum: {self._got} of {TRAILER_SIZE} bytes)"
            got = self._header.length - self._skip_left if self._skip_left else self._got
            return f" in the middle of a {name} frame ({got} of {self._header.length} payload bytes)"
        if self._got:
            return f" in the middle of a frame header ({self._got} of {HEADER_SIZE} bytes)"
        return ""

    def _start_payload(self) -> None:
        header = unpack_header(self._head, self.peer)
        dest = self.target(header)
        self._header, self._got, self._hasher = header, 0, xxhash.xxh3_64(self._head)
        if dest is SKIP:
            self._payload, self._skip_left = SKIP, header.length
        elif dest is None:
            if header.dtype != DType.NONE:
                raise ProtocolError(f"{self.peer}: unexpected {header.type.name} frame")
            self._payload = self._dest = memoryview(bytearray(header.length))
        elif dest.nbytes != header.length:
            raise ProtocolError(
                f"{self.peer}: {header.type.name} payload of {header.length} bytes, expected {dest.nbytes}"
            )
        else:
            self._payload = self._dest = dest
        if header.length == 0:
            self._start_trailer()

    def _start_trailer(self) -> None:
        self._in_trailer, self._dest, self._got = True, memoryview(self._tail), 0

    def _finish(self) -> tuple[Header, memoryview]:
        """The trailer is in: hand the frame on only if it is the frame that was sent."""
        header, payload = self._header, self._payload
        assert header is not None
        _check_trailer(self._hasher, self._tail, header, self.peer)
        self._header, self._payload, self._hasher, self._in_trailer = None, SKIP, None, False
        self._dest, self._got, self._skip_left = memoryview(self._head), 0, 0
        return header, payload


class FrameWriter:
    """Queues frames for a non-blocking socket and writes them as it becomes writable.

    Buffers are sent as they are, not copied: the owner must not change a queued buffer until
    `pending` is 0 (the server waits for that before it reuses its broadcast buffer).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._queue: deque[memoryview] = deque()
        self.pending = 0
        self.sent_bytes = 0

    def push(self, buffers: list[bytes | memoryview]) -> None:
        for b in buffers:
            view = memoryview(b).cast("B")
            if view.nbytes:
                self._queue.append(view)
                self.pending += view.nbytes

    def own(self) -> None:
        """Copy what is still queued, so the buffers it came from may be reused. Views of immutable
        bytes (headers, trailers, earlier copies) are kept as they are: a peer that lags for many
        steps costs one copy of each frame, not one per step."""
        self._queue = deque(v if isinstance(v.obj, bytes) else memoryview(bytes(v)) for v in self._queue)

    def write(self) -> None:
        """Send what the socket takes now; raises ConnectionError if the peer is gone."""
        while self._queue:
            try:
                if isinstance(self.sock, ssl.SSLSocket):  # TLS has no sendmsg
                    sent = self.sock.send(self._queue[0])
                else:
                    sent = self.sock.sendmsg(list(self._queue)[:_IOV_MAX])
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            self.pending -= sent
            self.sent_bytes += sent
            _consume(self._queue, sent)
