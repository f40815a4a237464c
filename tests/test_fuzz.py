"""Fuzzing every decoder a peer's bytes reach: only typed errors come out, never a crash or a hang."""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from smolcluster import wire
from smolcluster.checkpoint import CheckpointError, decode_state
from smolcluster.config import ModelConfig, TrainingConfig
from smolcluster.models import build_model
from smolcluster.train import build_optimizer
from smolcluster.wire import DType, MsgType, ProtocolError

FUZZ = settings(max_examples=300, deadline=None)
MODEL_BYTES = 64


def header_with(**fields) -> bytes:
    values = dict(magic=wire.MAGIC, version=wire.PROTOCOL_VERSION, type=1, dtype=0, flags=0, worker=1, step=0,
                  offset=0, count=0, length=0)
    values.update(fields)
    return wire.HEADER.pack(*values.values())


def server_like_target(header: wire.Header) -> memoryview:
    """What the server does: a model-sized buffer for gradients, nothing else with a tensor payload."""
    if header.type == MsgType.GRAD:
        return memoryview(bytearray(MODEL_BYTES))
    if header.type == MsgType.AVG:
        return wire.SKIP
    raise ProtocolError(f"peer: unexpected {header.type.name}")


@FUZZ
@given(st.binary(min_size=wire.HEADER_SIZE, max_size=wire.HEADER_SIZE))
def test_random_headers_parse_or_raise_protocol_error(raw):
    try:
        h = wire.unpack_header(raw, "fuzz")
    except ProtocolError as e:
        assert "fuzz" in str(e)
    else:
        assert h.dtype in wire.ALLOWED_DTYPES[h.type]


@FUZZ
@given(mtype=st.integers(0, 255), dtype=st.integers(0, 255), flags=st.integers(0, 255),
       length=st.integers(0, 2**32 - 1), step=st.integers(0, 2**64 - 1))
def test_type_confused_headers_are_checked_before_any_payload(mtype, dtype, flags, length, step):
    raw = header_with(type=mtype, dtype=dtype, flags=flags, length=length, step=step)
    try:
        h = wire.unpack_header(raw, "fuzz")
    except ProtocolError:
        return
    if h.type in wire.JSON_TYPES:
        assert h.length <= wire.MAX_JSON
    if h.type in wire.EMPTY_TYPES:
        assert h.length == 0


@FUZZ
@given(stream=st.lists(st.one_of(
    st.binary(max_size=80),
    st.builds(lambda t, d, n: header_with(type=t, dtype=d, length=n), st.sampled_from(list(MsgType)),
              st.sampled_from(list(DType)), st.sampled_from([0, 1, MODEL_BYTES, MODEL_BYTES + 1, wire.MAX_JSON + 1, 2**32 - 1])),
), max_size=8), chunk=st.integers(1, 97))
def test_frame_reader_survives_any_byte_stream(stream, chunk):
    a, b = socket.socketpair()
    b.setblocking(False)
    reader = wire.FrameReader(b, "fuzz", server_like_target)
    data = b"".join(stream)
    try:
        for i in range(0, len(data), chunk):
            a.sendall(data[i : i + chunk])
            for header, payload in reader.read():
                if header.dtype == DType.NONE and header.length:
                    try:
                        wire.decode_json(payload, header, "fuzz")
                    except ProtocolError:
                        pass
        a.close()
        list(reader.read())
    except (ProtocolError, wire.ConnectionClosed):
        pass
    finally:
        a.close()
        b.close()


def nested(depth: int, opener: str, middle: str) -> bytes:
    """Deeply nested JSON (closed or not): json.loads recursed until RecursionError escaped it."""
    closer = {"[": "]", '{"a":': "}"}[opener]
    return (opener * depth + middle + closer * depth).encode()[: wire.MAX_JSON]


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(nested, st.integers(0, 40_000), st.sampled_from(["[", '{"a":']), st.sampled_from(["", "1", "[]"])),
    st.builds(lambda n: b'{"n":' + b"9" * n + b"}", st.integers(4000, 5000)),
))
def test_json_payloads_decode_or_raise_protocol_error(raw):
    header = wire.Header(MsgType.HELLO, length=len(raw))
    try:
        assert isinstance(wire.decode_json(raw, header, "fuzz"), dict)
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 400), st.binary(max_size=300))))
def test_optimizer_state_payloads_load_or_raise_checkpoint_error(raw):
    optimizer = build_optimizer(build_model(ModelConfig(hidden=4), 0), TrainingConfig())
    try:
        decode_state(optimizer, raw, "fuzz")
    except CheckpointError:
        pass


def encoded(mtype: MsgType, step: int, payload: bytes) -> bytes:
    dtype = DType.F32 if mtype in (MsgType.GRAD, MsgType.AVG) else DType.NONE
    return b"".join(bytes(f) for f in wire.frame(mtype, payload, step=step, dtype=dtype, count=1 if dtype else 0))


def integrity_target(header: wire.Header) -> memoryview | None:
    """Like the server: gradients into a model-sized buffer, AVG skipped, control payloads allocated."""
    if header.type == MsgType.GRAD:
        if header.length != MODEL_BYTES:
            raise ProtocolError(f"fuzz: GRAD of {header.length} bytes")
        return memoryview(bytearray(MODEL_BYTES))
    return wire.SKIP if header.type == MsgType.AVG else None


def collect(reader: wire.FrameReader, got: list[tuple[MsgType, int, bytes | None]]) -> None:
    """Keep each frame as it is handed on (an error may end the read after some were)."""
    for header, payload in reader.read():
        got.append((header.type, header.step, None if payload is wire.SKIP else bytes(payload)))


FRAMES = st.lists(st.one_of(
    st.builds(lambda s, p: (MsgType.GRAD, s, p), st.integers(0, 9), st.binary(min_size=MODEL_BYTES, max_size=MODEL_BYTES)),
    st.builds(lambda s, p: (MsgType.AVG, s, p), st.integers(0, 9), st.binary(min_size=1, max_size=3 * MODEL_BYTES)),
    st.builds(lambda s, n: (MsgType.CHECKSUM, s, b'{"crc":%d}' % n), st.integers(0, 9), st.integers(0, 2**32)),
    st.just((MsgType.HEARTBEAT, 0, b"")),
), min_size=1, max_size=6)


@FUZZ
@given(frames=FRAMES, victim=st.integers(0, 5), where=st.integers(0, 10_000),
       mutation=st.sampled_from(["flip", "drop", "insert", "announce"]), amount=st.integers(1, 255),
       chunk=st.integers(1, 97))
def test_a_damaged_frame_is_never_handed_on(frames, victim, where, mutation, amount, chunk):
    """One frame is damaged (a flipped bit, bytes lost or added, a wrong length): every frame before
    it comes out intact, it and everything after it never do. The trailer makes this hold for any
    damage, where the header checks alone let misaligned bytes through as payload."""
    victim %= len(frames)
    blobs = [encoded(*f) for f in frames]
    blob = bytearray(blobs[victim])
    at = where % len(blob)
    if mutation == "flip":
        blob[at] ^= amount
    elif mutation == "drop":  # not the whole frame: without it, the stream would be whole again
        del blob[at : at + min(amount, len(blob) - 1)]
    elif mutation == "insert":
        blob[at:at] = bytes([amount]) * amount
    else:  # announce more or fewer payload bytes than are carried
        length = max(0, len(frames[victim][2]) + (amount if at % 2 else -amount))
        blob[32:36] = length.to_bytes(4, "big")
        if length == len(frames[victim][2]):
            blob[32:36] = (length + 1).to_bytes(4, "big")
    a, b = socket.socketpair()
    b.setblocking(False)
    reader = wire.FrameReader(b, "fuzz", integrity_target)
    got: list[tuple[MsgType, int, bytes | None]] = []
    data = b"".join(blobs[:victim]) + bytes(blob) + b"".join(blobs[victim + 1 :])
    try:
        for i in range(0, len(data), chunk):
            a.sendall(data[i : i + chunk])
            collect(reader, got)
        a.close()
        collect(reader, got)
    except (ProtocolError, wire.ConnectionClosed):
        pass
    else:
        raise AssertionError("a damaged stream ended without an error")
    finally:
        a.close()
        b.close()
    want = [(t, s, None if t == MsgType.AVG else p) for t, s, p in frames[:victim]]
    assert got == want
