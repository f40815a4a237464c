"""The frame codec: round trips, and typed errors for everything malformed."""

from __future__ import annotations

import pickle
import select
import socket
import struct
import threading
import time

import pytest
import torch
import xxhash

from smolcluster import wire
from smolcluster.averaging import Averager
from smolcluster.buckets import make_buckets
from smolcluster.flat import FlatModel
from smolcluster.hub import Hub, Peer
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


def trailer(head: bytes | bytearray, payload: bytes = b"") -> bytes:
    """The checksum an honest sender puts after `head` + `payload`."""
    return xxhash.xxh3_64(bytes(head) + payload).digest()


def raw_frame(payload: bytes = b"", **overrides) -> bytes:
    """A frame built by hand: header (length = len(payload) unless overridden), payload, trailer."""
    head = header_bytes(**{"length": len(payload), **overrides})
    return bytes(head) + payload + trailer(head, payload)


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
    a.sendall(raw_frame(b"\0" * 8)[:-5])
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
    (wire.HEADER_SIZE + 8 + 3, " in the middle of a GRAD frame (its checksum: 3 of 8 bytes)"),
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
            list(reader.read())
    assert str(err.value) == "peer closed the connection" + where


def test_frame_reader_refuses_a_length_the_model_does_not_imply():
    a, b = pair()
    b.setblocking(False)
    a.sendall(bytes(header_bytes(length=12)))
    reader = wire.FrameReader(b, "peer", lambda h: memoryview(bytearray(8)))
    with pytest.raises(ProtocolError, match="12 bytes, expected 8"):
        list(reader.read())


def test_frame_writer_sends_everything_through_a_small_socket_buffer():
    a, b = pair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 4096
    writer = wire.FrameWriter(a)
    writer.push(wire.frame(MsgType.AVG, payload, step=3, dtype=DType.F32))
    received = bytearray()
    total = wire.HEADER_SIZE + len(payload) + wire.TRAILER_SIZE
    while len(received) < total:
        writer.write()
        received += b.recv(1 << 16)
    assert writer.pending == 0 and bytes(received[wire.HEADER_SIZE : -wire.TRAILER_SIZE]) == payload
    assert bytes(received[-wire.TRAILER_SIZE :]) == trailer(received[: wire.HEADER_SIZE], payload)


# --- frame integrity: the checksum trailer ------------------------------------------------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A real loopback TCP connection (sender, receiver), as between a worker and the server."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname(), timeout=10)
        b, _ = listener.accept()
    b.settimeout(10)
    return a, b


def read_until_error(reader: wire.FrameReader, sock: socket.socket, got: list, timeout: float = 10.0) -> None:
    """Read as bytes arrive until the reader raises; fails after `timeout` seconds without one."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        select.select([sock], [], [], left)
        got += reader.read()
    raise AssertionError(f"no error within {timeout} s; got {[h for h, _ in got]}")


def misannounced(n: int, own_trailer: bool) -> bytes:
    """A GRAD frame announcing `n` payload bytes but carrying n - 36 - 8 (plus, if `own_trailer`,
    a trailer over what it did carry), then a complete next frame with an 8-byte payload: read
    by the length, the next frame's bytes fill up the first one exactly."""
    head = header_bytes(length=n, step=5)
    short = bytes(range(256)) * (n // 256 + 1)
    short = short[: n - wire.HEADER_SIZE - wire.TRAILER_SIZE]
    bad = bytes(head) + short + (trailer(head, short) if own_trailer else b"")
    return bad + raw_frame(b"nextstep", step=6)


def test_frame_carries_a_trailer_over_header_and_payload():
    buffers = wire.frame(MsgType.GRAD, b"abcdefgh", step=3, dtype=DType.F32, count=2)
    head, payload, tail = (bytes(b) for b in buffers)
    assert len(head) == wire.HEADER_SIZE and payload == b"abcdefgh" and len(tail) == wire.TRAILER_SIZE == 8
    assert tail == xxhash.xxh3_64(head + payload).digest()
    empty = wire.frame(MsgType.HEARTBEAT)
    assert len(empty) == 2 and bytes(empty[1]) == xxhash.xxh3_64(bytes(empty[0])).digest()
    assert wire.PROTOCOL_VERSION == 2


@pytest.mark.parametrize("own_trailer", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_frame_reader_refuses_a_frame_that_announced_more_than_it_carried(own_trailer, skip):
    """The next frame's header must not be averaged in as gradient bytes: the reader raises and
    returns neither the bad frame nor anything after it; the good frame before it still counts."""
    n = 4096
    a, b = tcp_pair()
    b.setblocking(False)
    targets: list[wire.Header] = []

    def target(h: wire.Header) -> memoryview:
        targets.append(h)
        return wire.SKIP if skip else memoryview(bytearray(h.length))

    reader = wire.FrameReader(b, "worker 2 (127.0.0.1:5)", target)
    a.sendall(raw_frame(b"goodgood", step=4) + misannounced(n, own_trailer))
    got: list[tuple[wire.Header, memoryview]] = []
    with pytest.raises(ProtocolError) as err:
        read_until_error(reader, b, got)
    assert [h.step for h, _ in got] == [4]
    assert str(err.value) == ("worker 2 (127.0.0.1:5): GRAD frame for step 5 failed its checksum: the payload is not "
                              "what was sent (a frame announced more bytes than it carried?)")
    assert [h.step for h in targets] == [4, 5]  # the next frame's header was never parsed as one
    with pytest.raises(ProtocolError):  # and the reader stays refused
        list(reader.read())
    a.close()
    b.close()


@pytest.mark.parametrize("own_trailer", [False, True])
def test_read_frame_refuses_a_frame_that_announced_more_than_it_carried(own_trailer):
    a, b = tcp_pair()
    a.sendall(misannounced(4096, own_trailer))
    dest = bytearray(4096)
    with pytest.raises(ProtocolError, match=r"^server 10.0.0.1:9000: GRAD frame for step 5 failed its checksum"):
        wire.read_frame(b, "server 10.0.0.1:9000", lambda h: memoryview(dest))
    a.close()
    b.close()


@pytest.mark.parametrize("at", [0, 12, 35, 36, 40, 43, 44, 51])
def test_one_flipped_bit_anywhere_in_a_frame_is_refused(at):
    """Header fields (step, count, offset) are covered as well as the payload and the trailer;
    a flipped length or type fails earlier or later, but the frame is never handed on."""
    stream = bytearray(raw_frame(b"abcdefgh"))
    stream[at] ^= 0x10
    a, b = pair()
    b.setblocking(False)
    a.sendall(bytes(stream))
    a.close()
    reader = wire.FrameReader(b, "peer", lambda h: memoryview(bytearray(h.length)))
    got = []
    with pytest.raises((ProtocolError, wire.ConnectionClosed)):
        for _ in range(100):
            got += reader.read()
    assert got == []


def test_a_skipped_payload_is_hashed_chunk_by_chunk_and_checked():
    """A payload the server throws away (a late gradient) still proves the stream is aligned."""
    big = bytes(range(256)) * 1000  # several skip chunks
    good = b"".join(bytes(f) for f in wire.frame(MsgType.GRAD, big, step=1, dtype=DType.F32, count=1))
    bad = bytearray(good)
    bad[wire.HEADER_SIZE + 100_000] ^= 1
    for stream, ok in [(good, True), (bytes(bad), False)]:
        a, b = pair()
        b.setblocking(False)
        send_raw(a, stream + b"".join(bytes(f) for f in wire.frame(MsgType.HEARTBEAT)))
        reader = wire.FrameReader(b, "peer", lambda h: wire.SKIP)
        got: list = []
        try:
            while len(got) < 2:
                got += reader.read()
        except ProtocolError as e:
            assert not ok and "GRAD frame for step 1 failed its checksum" in str(e) and got == []
        else:
            assert ok and got[0][1] is wire.SKIP


def test_read_frame_refuses_a_corrupted_control_payload():
    a, b = pair()
    stream = bytearray(b"".join(bytes(f) for f in wire.frame(MsgType.HELLO, {"worker_id": 1})))
    stream[wire.HEADER_SIZE + 2] ^= 0x20
    a.sendall(bytes(stream))
    with pytest.raises(ProtocolError, match="HELLO frame for step 0 failed its checksum"):
        wire.read_frame(b, "peer", lambda h: None)


# --- control payloads -------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("[" * 60_000, "nested too deeply"),
    ('{"a":' * 30_000, "nested too deeply"),
    ('{"n":' + "1" * 5000 + "}", "not UTF-8 JSON"),  # int() refuses more than 4300 digits
])
def test_hostile_json_is_a_one_line_protocol_error(text, message):
    """Deep nesting made json.loads raise RecursionError, which reached the hub's catch-all."""
    data = text.encode()[: wire.MAX_JSON]
    with pytest.raises(ProtocolError, match=message) as err:
        wire.decode_json(data, Header(MsgType.HELLO, length=len(data)), "10.0.0.9:4000")
    assert str(err.value).startswith("10.0.0.9:4000: HELLO payload") and "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


# --- duplicate gradients: the same bucket twice for one step ----------------------------------


def duplicate_setup() -> tuple[Averager, list, int, torch.Tensor, torch.Tensor]:
    """An averager for two workers, a gradient bucket, and two different payloads for it."""
    torch.manual_seed(0)
    flat = FlatModel(torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Linear(16, 4)))
    avg = Averager(flat, make_buckets([p.numel() for p in flat.model.parameters()], 200), "fp32", 64)
    b = 1
    n = avg.buckets[b].numel
    first, second = torch.randn(n), torch.randn(n)
    return avg, [avg.inbox(), avg.inbox()], b, first, second


def grad_frames(avg: Averager, b: int, step: int, values: torch.Tensor) -> bytes:
    bucket = avg.buckets[b]
    return b"".join(bytes(f) for f in wire.frame(MsgType.GRAD, values.numpy().tobytes(), step=step, worker=1,
                                                  count=4, offset=bucket.lo, dtype=DType.F32))


def serve(avg: Averager, inbox, stream: bytes) -> list[str]:
    """What the hub and server do with one worker's bytes: FrameReader into `avg.target`, then
    `avg.receive` for each frame `read()` returned; a ProtocolError ends it, as it closes the peer."""
    a, b = pair()
    b.setblocking(False)
    a.sendall(stream)
    a.close()
    reader = wire.FrameReader(b, "worker 1", lambda h: avg.target(inbox, h, "worker 1"))
    results = []
    try:
        while True:
            for header, _ in reader.read():  # each frame is received before the next header is read
                results.append(avg.receive(inbox, header))
    except wire.ConnectionClosed:
        return results
    except ProtocolError as e:
        return [*results, f"error: {e}"]


def bucket_of(avg: Averager, b: int) -> torch.Tensor:
    return avg.flat.wire[avg.buckets[b].lo : avg.buckets[b].hi].clone()


def test_a_duplicate_bucket_before_the_reduce_is_refused_and_the_first_copy_kept():
    avg, inboxes, b, first, second = duplicate_setup()
    avg.begin(0)
    out = serve(avg, inboxes[0], grad_frames(avg, b, 0, first) + grad_frames(avg, b, 0, second))
    assert out == ["ok", "error: worker 1: bucket 1 of step 0 twice"]
    assert torch.equal(inboxes[0].floats[b], first)  # refused at its header: not one byte landed
    assert serve(avg, inboxes[1], grad_frames(avg, b, 0, second)) == ["ok"]
    avg.reduce(b, inboxes)
    assert torch.equal(bucket_of(avg, b), (first + second) / 2)


def test_a_duplicate_bucket_after_the_reduce_is_refused_and_the_average_kept():
    avg, inboxes, b, first, second = duplicate_setup()
    avg.begin(0)
    for inbox in inboxes:
        assert serve(avg, inbox, grad_frames(avg, b, 0, first)) == ["ok"]
    avg.reduce(b, inboxes)
    assert serve(avg, inboxes[0], grad_frames(avg, b, 0, second)) == ["error: worker 1: bucket 1 of step 0 twice"]
    assert torch.equal(inboxes[0].floats[b], first) and torch.equal(bucket_of(avg, b), first)


def test_a_duplicate_of_a_finished_step_is_read_and_dropped_as_late():
    avg, inboxes, b, first, second = duplicate_setup()
    avg.begin(0)
    assert serve(avg, inboxes[0], grad_frames(avg, b, 0, first)) == ["ok"]
    avg.reduce(b, inboxes)
    avg.begin(1)
    assert serve(avg, inboxes[0], grad_frames(avg, b, 0, second)) == ["late"]  # SKIPped: read, hashed, dropped
    assert torch.equal(inboxes[0].floats[b], first) and not inboxes[0].has(b, 1)


def test_copies_of_a_bucket_reduced_without_them_are_late_and_never_land():
    """step_timeout averaged bucket b without worker 1: its first copy and a duplicate are both
    late (the server counts one late gradient per worker and step), and neither changes anything."""
    avg, inboxes, b, first, second = duplicate_setup()
    avg.begin(0)
    assert serve(avg, inboxes[1], grad_frames(avg, b, 0, first)) == ["ok"]
    avg.reduce(b, inboxes)
    before = bucket_of(avg, b)
    out = serve(avg, inboxes[0], grad_frames(avg, b, 0, second) + grad_frames(avg, b, 0, second))
    assert out == ["late", "late"]
    assert not inboxes[0].has(b, 0) and not inboxes[0].floats[b].any()
    assert torch.equal(bucket_of(avg, b), before) and torch.equal(before, first)


def test_frame_reader_hands_each_frame_on_before_it_looks_at_the_next_header():
    """The owner's state (the server's 'bucket received') must be current when `target` runs."""
    a, b = pair()
    b.setblocking(False)
    a.sendall(raw_frame(b"12345678", step=1) + raw_frame(b"abcdefgh", step=2))
    events: list[str] = []

    def target(h: wire.Header) -> memoryview:
        events.append(f"target {h.step}")
        return memoryview(bytearray(h.length))

    reader = wire.FrameReader(b, "peer", target)
    for header, _ in reader.read():
        events.append(f"frame {header.step}")
    assert events == ["target 1", "frame 1", "target 2", "frame 2"]


class RecordingHandler:
    """A server stand-in for the real Hub: gradients into an inbox, every event recorded."""

    def __init__(self, n: int) -> None:
        self.inbox = bytearray(n)
        self.frames: list[tuple[int, bytes]] = []
        self.drops: list[str] = []
        self.hub: Hub | None = None

    def on_connect(self, peer: Peer) -> None:
        pass

    def target(self, peer: Peer, header: Header) -> memoryview | None:
        return memoryview(self.inbox) if header.type == MsgType.GRAD else None

    def on_frame(self, peer: Peer, header: Header, payload: memoryview) -> None:
        self.frames.append((header.step, bytes(payload)))

    def on_drop(self, peer: Peer, why: str) -> None:
        self.drops.append(why)


def test_the_hub_never_delivers_a_misannounced_frame_and_tells_the_peer_why():
    """Real Hub, real TCP: the server's on_frame (where a bucket counts as received) sees the good
    GRAD only; the peer gets an ERROR naming the checksum failure and is closed."""
    n = 4096
    handler = RecordingHandler(n)
    hub = Hub("127.0.0.1", 0, handler, heartbeat_s=30, silence_s=30, handshake_s=30)
    try:
        with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as sock:
            good = bytes(range(256)) * (n // 256)
            sock.sendall(raw_frame(good, step=4) + misannounced(n, own_trailer=False))
            deadline = time.monotonic() + 10
            while not (hub.peers and hub.peers[0].closing) and time.monotonic() < deadline:
                hub.pump(0.05)
            sock.shutdown(socket.SHUT_WR)  # as a worker that read the ERROR would hang up
            while not handler.drops and time.monotonic() < deadline:
                hub.pump(0.05)
            assert handler.frames == [(4, good)]
            assert handler.drops and "failed its checksum" in handler.drops[0]
            header, body = wire.read_frame(sock, "server", lambda h: None)
            assert header.type == MsgType.ERROR
            assert "GRAD frame for step 5 failed its checksum" in wire.decode_json(body, header, "server")["error"]
    finally:
        hub.close()


def test_own_copies_a_mutable_buffer_once_and_keeps_the_bytes_it_holds():
    a, b = socket.socketpair()
    try:
        writer = wire.FrameWriter(a)
        live = bytearray(b"\x01" * 64)
        writer.push(wire.frame(MsgType.AVG, live, dtype=DType.F32))
        writer.own()
        owned = list(writer._queue)
        live[:] = b"\x02" * 64  # the buffer is reused: what is queued must not change
        writer.own()
        assert all(x is y for x, y in zip(owned, writer._queue))  # nothing copied twice
        writer.write()
        header, payload = wire.read_frame(b, "test", lambda h: memoryview(bytearray(h.length)))
        assert bytes(payload) == b"\x01" * 64
    finally:
        a.close()
        b.close()
