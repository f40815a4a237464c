"""Hostile peers: raw sockets that connect to a smolcluster server and misbehave.

Shared by the fault tests (`tests/e2e/test_faults.py`) and the reliability report. A duplicate
worker id is the one attack not here: it is a real worker process (`Cluster.start_worker`).
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from collections.abc import Callable

from smolcluster import auth, wire
from smolcluster.wire import DType, MsgType


def rogue(port: int, payload: bytes | None = None, hello: dict | None = None, token: str | None = None) -> str:
    """Connect and misbehave; returns what the server answered (or why the connection ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        header, body = wire.read_frame(sock, "server", lambda h: memoryview(bytearray(h.length)))
        assert header.type == MsgType.CHALLENGE
        if payload is not None:
            sock.sendall(payload)
        if hello is not None:
            server_nonce = wire.decode_json(body, header, "server")["nonce"]
            if token is not None:
                hello["proof"] = auth.proof(token.encode(), "worker", server_nonce, hello["nonce"], hello["worker_id"])
            wire.send_frame(sock, wire.frame(MsgType.HELLO, hello))
        try:
            while True:
                header, body = wire.read_frame(sock, "server", lambda h: memoryview(bytearray(h.length)))
                if header.type in (MsgType.REJECT, MsgType.ERROR):
                    return bytes(body).decode()
        except (wire.ConnectionClosed, OSError) as e:
            return f"closed: {e}"


def upstream_frame(message: tuple) -> bytes:
    """What the hobby servers we replace put on the wire: a 4-byte length, then a pickle."""
    blob = pickle.dumps(message)
    return struct.pack("!I", len(blob)) + blob


def attacks(port: int) -> dict[str, Callable[[], str]]:
    """Each raw-socket attack on the server at `port`, by name; calling one returns the server's answer."""
    hello = {"worker_id": 1, "nonce": "n" * 32, "fingerprint": {}}
    return {
        "no token": lambda: rogue(port, hello=dict(hello, worker_id=2)),
        "wrong token": lambda: rogue(port, hello=dict(hello), token="guess"),
        "pickle": lambda: rogue(port, payload=upstream_frame(("all_reduce", 0, 1, [0.5] * 64))),
        "random bytes": lambda: rogue(port, payload=os.urandom(4096)),
        "says nothing": lambda: rogue(port),
        "AVG from a client": lambda: rogue(port, payload=b"".join(bytes(b) for b in wire.frame(
            MsgType.AVG, b"\0" * 8, dtype=DType.F32))),
        "oversized": lambda: rogue(port, payload=wire.Header(MsgType.HELLO, length=2**31).pack()),
    }


import time  # noqa: E402 - below: added with the frame-integrity attack, kept apart from the rest
import typing  # noqa: E402

if typing.TYPE_CHECKING:
    from smolcluster.config import Config


def take(header: wire.Header) -> memoryview:
    """Any payload the server sends, in a fresh buffer (a client of our own: any size is fine)."""
    return memoryview(bytearray(header.length))


def joined(port: int, cfg: Config, worker_id: int, token: str | None = None, timeout: float = 60.0) -> socket.socket:
    """A raw socket that joined as worker `worker_id` of the job `cfg` the way a real worker does
    (CHALLENGE, HELLO with the job's fingerprint, WELCOME) and took the PARAMS and STATE the server
    sends when training starts: from here the server counts on its gradients."""
    from smolcluster.models import build_model, layout

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    header, body = wire.read_frame(sock, "server", take)
    server_nonce, nonce = wire.decode_json(body, header, "server")["nonce"], auth.nonce()
    model = build_model(cfg.model, cfg.cluster.seed)
    hello = {"worker_id": worker_id, "nonce": nonce, "fingerprint": {**cfg.fingerprint(), "layout": layout(model)}}
    if token is not None:
        hello["proof"] = auth.proof(token.encode(), "worker", server_nonce, nonce, worker_id)
    wire.send_frame(sock, wire.frame(MsgType.HELLO, hello, worker=worker_id))
    for expected in (MsgType.WELCOME, MsgType.PARAMS, MsgType.STATE):
        header, body = wire.read_frame(sock, "server", take)
        while header.type == MsgType.HEARTBEAT:
            header, body = wire.read_frame(sock, "server", take)
        if header.type != expected:
            sock.close()
            raise RuntimeError(f"expected {expected.name} from the server, got {header.type.name}: {bytes(body)[:300]!r}")
    return sock


def misannounced(sock: socket.socket, cfg: Config, worker_id: int, step: int = 0, linger_s: float = 10.0) -> str:
    """On a `joined` socket: a GRAD for the largest bucket whose header announces the bucket's full
    length but which carries 44 bytes (one header and one trailer) less, then complete frames, as a
    sender that lost count would. Read by its length, the frame swallows the next frame's header as
    gradient bytes. Returns what the server answered, after lingering (up to `linger_s`) until the
    server cuts the connection: while it is still connected, its inbox is part of every average."""
    from smolcluster.buckets import make_buckets
    from smolcluster.models import build_model

    model = build_model(cfg.model, cfg.cluster.seed)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    buckets = make_buckets(sizes, max(1, int(cfg.cluster.bucket_mb * 2**20) // 4))
    bucket = max(buckets, key=lambda b: b.numel)
    length = 4 * bucket.numel
    header = wire.Header(MsgType.GRAD, step=step, worker=worker_id, length=length, dtype=DType.F32,
                         offset=bucket.lo, count=cfg.training.batch_size).pack()
    canary = struct.pack("<f", 1e3) * (length // 4)  # would show in every parameter if it were averaged in
    loss = wire.frame(MsgType.GRAD, struct.pack("<f", 1.0), step=step, worker=worker_id,
                      count=cfg.training.batch_size, offset=buckets[0].lo, dtype=DType.F32)
    rest = [*wire.frame(MsgType.HEARTBEAT, worker=worker_id), *loss]
    sock.sendall(header + canary[: length - wire.HEADER_SIZE - wire.TRAILER_SIZE] + b"".join(bytes(b) for b in rest))
    answer = "no answer"
    try:
        while True:
            header_, body = wire.read_frame(sock, "server", take)
            if header_.type in (MsgType.REJECT, MsgType.ERROR):
                answer = bytes(body).decode()
                break
    except (wire.ConnectionClosed, OSError) as e:
        return f"closed: {e}"
    _linger(sock, linger_s)
    return answer


def _linger(sock: socket.socket, timeout: float) -> None:
    """Stay connected until the server closes our connection (a send then fails), or `timeout` passes."""
    deadline = time.monotonic() + timeout
    beat = b"".join(bytes(b) for b in wire.frame(MsgType.HEARTBEAT))
    while time.monotonic() < deadline:
        try:
            sock.sendall(beat)
        except OSError:
            return
        time.sleep(0.05)
