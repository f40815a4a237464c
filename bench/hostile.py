"""Hostile peers: raw sockets that connect to a smolcluster server and misbehave.

Shared by the fault tests (`tests/e2e/test_faults.py`) and the reliability report. A duplicate
worker id is the one attack not here: it is a real worker process (`Cluster.start_worker`).
"""

from __future__ import annotations

import errno
import os
import pickle
import resource
import selectors
import socket
import struct
import threading
import time
import typing
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

from smolcluster import auth, wire
from smolcluster.wire import DType, MsgType

if typing.TYPE_CHECKING:
    from smolcluster.config import Config


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


def take(header: wire.Header) -> memoryview:
    """Any payload the server sends, in a fresh buffer (a client of our own: any size is fine)."""
    return memoryview(bytearray(header.length))


def _replica(cfg: Config) -> Any:
    """The job's replica as a real worker builds it (the data's description decides the model's sizes)."""
    from smolcluster.data import load_data
    from smolcluster.replica import build_replica

    return build_replica(cfg, meta=load_data(cfg.dataset, cfg.cluster.seed).meta)


def joined(port: int, cfg: Config, worker_id: int, token: str | None = None, timeout: float = 60.0) -> socket.socket:
    """A raw socket that joined as worker `worker_id` of the job `cfg` the way a real worker does
    (CHALLENGE, HELLO with the job's fingerprint, WELCOME) and took the PARAMS and STATE the server
    sends when training starts: from here the server counts on its gradients."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    header, body = wire.read_frame(sock, "server", take)
    server_nonce, nonce = wire.decode_json(body, header, "server")["nonce"], auth.nonce()
    hello = {"worker_id": worker_id, "nonce": nonce, "fingerprint": _replica(cfg).fingerprint}
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
    buckets = _replica(cfg).buckets
    bucket = max(buckets, key=lambda b: b.numel)
    length = 4 * bucket.numel
    header = wire.Header(MsgType.GRAD, step=step, worker=worker_id, length=length, dtype=DType.F32,
                         offset=bucket.lo, count=cfg.training.batch_size).pack()
    canary = struct.pack("<f", 1e3) * (length // 4)  # would show in every parameter if it were averaged in
    loss = wire.frame(MsgType.GRAD, struct.pack("<f", 1.0) * buckets[0].numel, step=step, worker=worker_id,
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


# --- floods: many connections that never authenticate ------------------------------------------


FLOOD_TICK_S = 0.02
"""The flood's select() timeout: 50 wake-ups a second keep its own CPU use low."""
FLOOD_CONNECT_S = 3.0
"""A connect() still pending this long (the server's backlog is full) is given up and counted refused."""
FLOOD_LINGER0 = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() resets the connection, so no TIME_WAIT piles up on our side while churning."""


@dataclass
class FloodCounts:
    """What a flood did, seen from its own side of the sockets (updated as it runs)."""

    mode: str
    opened: int = 0
    """Connections the server's kernel completed (it may not have accepted them yet)."""
    refused: int = 0
    """connect() failed: refused, reset, timed out, or no descriptor free on our side."""
    closed: int = 0
    """Closed by the server (EOF or reset) before we closed them ourselves."""
    busy: int = 0
    """Connections that were told 'server busy' (shed by the server's admission caps)."""
    challenges: int = 0
    """Connections on which the server's CHALLENGE arrived (it accepted them)."""
    peak_open: int = 0
    """Most sockets open at once here."""
    seconds: float = 0.0
    cpu_s: float = 0.0
    """CPU time of the flood's own thread: it shares the cores with the cluster."""


def flood(port: int, n: int = 1000, mode: str = "idle", seconds: float = 30.0, rate: float = 500.0,
          stop: threading.Event | None = None, counts: FloodCounts | None = None) -> FloodCounts:
    """Connections to 127.0.0.1:`port` that never authenticate; returns what became of them.

    idle: keep up to `n` open that never send anything; reopen those the server closes.
    churn: connect, read the CHALLENGE on every other connection, close, again and again, up to
    `n` in flight. Both open `n` at once, then at most `rate` new ones a second. Bounded: `n`
    sockets at once, and it returns after `seconds` (or once `stop` is set). Only ever 127.0.0.1.
    """
    if mode not in ("idle", "churn"):
        raise ValueError(f"flood mode {mode!r}: expected idle or churn")
    counts = counts or FloodCounts(mode)
    n = _flood_room(n)
    sel = selectors.DefaultSelector()
    cpu0, t0 = time.thread_time(), time.monotonic()
    allowance, last, last_sweep, serial = float(n), t0, t0, 0  # the first n at once
    refill = max(1.0, 2 * rate * FLOOD_TICK_S)
    try:
        while (now := time.monotonic()) - t0 < seconds and not (stop is not None and stop.is_set()):
            if allowance < refill:
                allowance = min(allowance + (now - last) * rate, refill)
            last = now
            while allowance >= 1 and len(sel.get_map()) < n:
                allowance -= 1
                serial += 1
                _flood_dial(sel, port, counts, read=mode == "idle" or serial % 2 == 0)
            for key, _ in sel.select(FLOOD_TICK_S):
                _flood_event(sel, key, mode, counts)
            counts.peak_open = max(counts.peak_open, len(sel.get_map()))
            if now - last_sweep > 0.5:
                last_sweep = now
                _flood_sweep(sel, now, counts)
    finally:
        for key in list(sel.get_map().values()):
            _flood_close(sel, key.fileobj)
        sel.close()
        counts.seconds, counts.cpu_s = time.monotonic() - t0, time.thread_time() - cpu0
    return counts


class Flood:
    """flood() on a thread of its own: start it, train meanwhile, then stop() for the counts."""

    def __init__(self, port: int, n: int = 1000, mode: str = "idle", seconds: float = 120.0,
                 rate: float = 500.0) -> None:
        self.counts = FloodCounts(mode)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=flood, args=(port, n, mode, seconds, rate, self._stop, self.counts),
                                        daemon=True, name=f"flood-{mode}")
        self._thread.start()

    def stop(self) -> FloodCounts:
        self._stop.set()
        self._thread.join(timeout=10.0)
        return self.counts


@dataclass(slots=True)
class _Conn:
    """One flood socket's state."""

    read: bool
    """churn: wait for the CHALLENGE before closing."""
    since: float
    connected: bool = False
    heard: bool = False
    busy: bool = False


def _flood_room(n: int, spare: int = 256) -> int:
    """How many sockets a flood of `n` may open here: raises our own soft limit if it can (macOS: 256)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if soft != inf and soft < n + spare:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n + spare if hard == inf else min(n + spare, hard), hard))
        except (OSError, ValueError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return n if soft == inf else max(0, min(n, soft - spare))


def _flood_dial(sel: selectors.BaseSelector, port: int, counts: FloodCounts, read: bool) -> None:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        counts.refused += 1
        return
    sock.setblocking(False)
    err = sock.connect_ex(("127.0.0.1", port))
    if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
        sock.close()
        counts.refused += 1
        return
    sel.register(sock, selectors.EVENT_WRITE, _Conn(read, time.monotonic()))


def _flood_event(sel: selectors.BaseSelector, key: selectors.SelectorKey, mode: str, counts: FloodCounts) -> None:
    sock, conn = key.fileobj, key.data
    assert isinstance(sock, socket.socket)
    if not conn.connected:  # the connect() finished, one way or the other
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            counts.refused += 1
            _flood_close(sel, sock)
            return
        counts.opened += 1
        conn.connected = True
        if mode == "churn" and not conn.read:
            _flood_close(sel, sock)
        else:
            sel.modify(sock, selectors.EVENT_READ, conn)
        return
    try:
        data = sock.recv(4096)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:  # the server closed it (shed, timed out)
        counts.closed += 1
        _flood_close(sel, sock)
        return
    if not conn.heard:
        conn.heard = True
        counts.challenges += 1
    if b"server busy" in data and not conn.busy:
        conn.busy = True
        counts.busy += 1
    if mode == "churn":
        _flood_close(sel, sock)


def _flood_sweep(sel: selectors.BaseSelector, now: float, counts: FloodCounts) -> None:
    """Give up connect()s the server's full backlog has left pending for FLOOD_CONNECT_S."""
    for key in list(sel.get_map().values()):
        if not key.data.connected and now - key.data.since > FLOOD_CONNECT_S:
            counts.refused += 1
            _flood_close(sel, key.fileobj)


def _flood_close(sel: selectors.BaseSelector, sock: socket.socket) -> None:
    sel.unregister(sock)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, FLOOD_LINGER0)
    except OSError:
        pass
    sock.close()
