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
        reader.read()
    except (ProtocolError, wire.ConnectionClosed):
        pass
    finally:
        a.close()
        b.close()


@FUZZ
@given(st.binary(max_size=300))
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
