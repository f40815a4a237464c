"""The frame codec: round trips, and typed errors for everything malformed."""

from __future__ import annotations

import pickle
import socket
import struct
import threading

import pytest

from smolcluster import wire
from smolcluster.wire import DType, Header, MsgType, ProtocolError


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def send_raw(sock: socket.socket, data: bytes) -> None:
    threading.Thread(target=sock.sendall, args=(data,), daemon=True).start()


def header_bytes(**overrides) -> bytearray:
    fields = dict(magic=wire.MAGIC, version=wire.PROTOCOL_VERSION, type=MsgType.GRAD, dtype=DType.F32,
                  flags=0, worker=1, step=7, offset=0, count=16, length=8)
    fields.update(overrides)
    return bytearray(wire.HEADER.pack(*fields.values()))


def test_header_round_trips_every_field():
    h = Header(MsgType.GRAD, step=2**40 + 3, worker=9, length=1234, dtype=DType.BF16, offset=77, count=32)
    assert wire.unpack_header(h.pack(), "peer") == h
    assert len(h.pack()) == wire.HEADER_SIZE == 36


def test_tensor_frame_round_trips_into_a_preallocated_buffer():
    a, b = pair()
    payload = struct.pack("<4f", 1.0, -2.5, 3.25, 0.0)
    wire.send_frame(a, wire.frame(MsgType.AVG, payload, step=5, dtype=DType.F32))
    dest = bytearray(16)
    header, view = wire.read_frame(b, "a", lambda h: memoryview(dest))
    assert header.type == MsgType.AVG and header.step == 5 and header.length == 16
    assert bytes(dest) == payload and view.obj is dest


def test_json_frame_round_trips():
    a, b = pair()
    wire.send_frame(a, wire.frame(MsgType.HELLO, {"worker_id": 3, "x": [1, 2]}))
    header, payload = wire.read_frame(b, "a", lambda h: None)
    assert wire.decode_json(payload, header, "a") == {"worker_id": 3, "x": [1, 2]}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"magic": b"XXXX"}, "bad magic"),
        ({"version": 99}, "protocol version 99"),
        ({"type": 200}, "unknown message type 200"),
        ({"dtype": 42}, "unknown dtype 42"),
        ({"flags": 1}, "unknown flags"),
        ({"type": MsgType.HELLO, "dtype": DType.NONE, "length": wire.MAX_JSON + 1}, "exceeds"),
        ({"type": MsgType.BYE, "dtype": DType.NONE, "length": 5}, "must be empty"),
        ({"type": MsgType.HELLO, "dtype": DType.F32, "length": 5}, "with dtype F32"),
    ],
)
def test_bad_headers_raise_protocol_error_naming_the_peer(overrides, message):
    with pytest.raises(ProtocolError, match=message) as err:
        wire.unpack_header(header_bytes(**overrides), "10.0.0.7:5000")
    assert "10.0.0.7:5000" in str(err.value)


def test_truncated_header_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="truncated"):
        wire.unpack_header(header_bytes()[:20], "peer")


def test_truncated_frame_is_connection_closed():
    a, b = pair()
    a.sendall(bytes(header_bytes(length=8)) + b"\0\0\0")
    a.close()
    with pytest.raises(wire.ConnectionClosed):
        wire.read_frame(b, "peer", lambda h: memoryview(bytearray(8)))


def test_oversized_tensor_length_is_refused_before_reading_the_payload():
    a, b = pair()
    a.sendall(bytes(header_bytes(length=2**31)))
    with pytest.raises(ProtocolError, match="expected 8"):
        wire.read_frame(b, "peer", lambda h: memoryview(bytearray(8)))


def test_a_pickle_is_refused_as_bad_magic():
    blob = pickle.dumps(("all_reduce", 1, 2, [0.0] * 20))
    with pytest.raises(ProtocolError, match="pickle"):
        wire.unpack_header(blob[: wire.HEADER_SIZE], "peer")


def test_json_payload_must_be_an_object_of_utf8():
    h = Header(MsgType.HELLO, length=3)
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        wire.decode_json(b"\xff\xfe\x00", h, "peer")
    with pytest.raises(ProtocolError, match="not a JSON object"):
        wire.decode_json(b"[1]", h, "peer")


def test_frame_reader_reassembles_frames_split_at_every_byte():
    a, b = pair()
    b.setblocking(False)
    dest = bytearray(8)
    frames = [*wire.frame(MsgType.GRAD, b"abcdefgh", step=1, dtype=DType.F32, count=1),
              *wire.frame(MsgType.CHECKSUM, {"crc": 5}, step=1),
              *wire.frame(MsgType.GRAD, b"12345678", step=2, dtype=DType.F32, count=1)]
    stream = b"".join(bytes(f) for f in frames)
    reader = wire.FrameReader(b, "peer", lambda h: memoryview(dest) if h.dtype == DType.F32 else None)
    got = []
    for i in range(len(stream)):
        a.sendall(stream[i : i + 1])
        for header, payload in reader.read():
            got.append((header.type, header.step, bytes(payload)))
    assert got == [(MsgType.GRAD, 1, b"abcdefgh"), (MsgType.CHECKSUM, 1, b'{"crc":5}'), (MsgType.GRAD, 2, b"12345678")]


def test_frame_reader_skips_payloads_it_is_told_to_discard():
    a, b = pair()
    b.setblocking(False)
    big = bytes(range(256)) * 1000
    frames = [*wire.frame(MsgType.GRAD, big, step=1, dtype=DType.F32, count=1), *wire.frame(MsgType.HEARTBEAT)]
    send_raw(a, b"".join(bytes(f) for f in frames))
    reader = wire.FrameReader(b, "peer", lambda h: wire.SKIP if h.type == MsgType.GRAD else None)
    got = []
    while len(got) < 2:
        got += reader.read()
    assert [h.type for h, _ in got] == [MsgType.GRAD, MsgType.HEARTBEAT]
    assert got[0][1] is wire.SKIP


@pytest.mark.parametrize("cut, where", [
    (0, ""), (10, " in the middle of a frame header (10 of 36 bytes)"),
    (wire.HEADER_SIZE + 3, " in the middle of a GRAD frame (3 of 8 payload bytes)"),
])
def test_frame_reader_says_where_an_eof_cut_a_frame(cut, where):
    """A worker that dies mid-send loses a frame: the log must say so, not just 'closed'."""
    a, b = pair()
    b.setblocking(False)
    stream = b"".join(bytes(f) for f in wire.frame(MsgType.GRAD, b"abcdefgh", step=1, dtype=DType.F32, count=1))
    a.sendall(stream[:cut])
    a.close()
    reader = wire.FrameReader(b, "peer", lambda h: memoryview(bytearray(8)))
    with pytest.raises(wire.ConnectionClosed) as err:
        while True:
            reader.read()
    assert str(err.value) == "peer closed the connection" + where


def test_frame_reader_refuses_a_length_the_model_does_not_imply():
    a, b = pair()
    b.setblocking(False)
    a.sendall(bytes(header_bytes(length=12)))
    reader = wire.FrameReader(b, "peer", lambda h: memoryview(bytearray(8)))
    with pytest.raises(ProtocolError, match="12 bytes, expected 8"):
        reader.read()


def test_frame_writer_sends_everything_through_a_small_socket_buffer():
    a, b = pair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 4096
    writer = wire.FrameWriter(a)
    writer.push(wire.frame(MsgType.AVG, payload, step=3, dtype=DType.F32))
    received = bytearray()
    total = wire.HEADER_SIZE + len(payload)
    while len(received) < total:
        writer.write()
        received += b.recv(1 << 16)
    assert writer.pending == 0 and bytes(received[wire.HEADER_SIZE :]) == payload
