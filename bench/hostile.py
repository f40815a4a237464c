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
