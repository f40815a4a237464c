"""A worker's one connection to the server: blocking frames, sends under a lock, heartbeats.

Blocking I/O on purpose: a worker has exactly one peer and strictly alternates send/receive, so
plain reads *are* the protocol. Every wait is bounded by a timeout; a small thread sends
heartbeats while the worker computes, so the server can tell slow from dead. The gradient
sender, the heartbeat thread and the main thread share the socket: whole frames go out under one
lock (and TLS sockets serialise every read and write, see tlsio.py).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

from loguru import logger

from smolcluster import wire
from smolcluster.errors import ConnectionClosed, ServerLost, WorkerError
from smolcluster.tlsio import SharedTLS
from smolcluster.wire import Header, MsgType

Target = Callable[[Header], memoryview]


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """Dial the server, retrying with backoff (0.1 s doubling to 2 s) until `timeout_s` seconds pass."""
    start = time.monotonic()
    deadline = start + timeout_s
    delay, told = 0.1, False
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=min(5.0, timeout_s))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            if time.monotonic() + delay > deadline:
                hint = " (macOS Local Network privacy? see README troubleshooting)" if e.errno == 65 else ""
                raise WorkerError(
                    f"could not reach the server at {host}:{port} within {timeout_s:.0f} s: {e}{hint}; "
                    "is it running, and is the port open in the firewall?"
                ) from None
            if not told and time.monotonic() - start > 3.0:  # quiet while the server starts up
                logger.info(f"waiting for the server at {host}:{port} ({e.strerror or e}); retrying")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class Link:
    def __init__(self, sock: socket.socket | SharedTLS, peer: str, worker_id: int) -> None:
        self.sock, self.peer, self.id = sock, peer, worker_id
        self._lock = threading.Lock()
        self._last_send = time.monotonic()
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None
        self.bytes_sent = self.bytes_received = 0
        """Every byte of every frame through this connection (stats.py reports them)."""
        self.received_s = 0.0
        """Seconds spent reading tensor payloads once their header was in (the averages' bytes)."""

    def send(self, mtype: MsgType, payload: Any = b"", **fields: Any) -> None:
        self.send_frames(wire.frame(mtype, payload, worker=self.id, **fields))

    def send_frames(self, frames: list[bytes | memoryview]) -> None:
        """Send whole frames under the lock (the heartbeat and gradient threads share the socket)."""
        try:
            with self._lock:
                self._send_locked(frames)
        except OSError as e:
            raise ServerLost(f"lost the connection to the {self.peer} while sending: {e}") from None

    def _send_locked(self, frames: list[bytes | memoryview]) -> None:
        wire.send_frame(self.sock, frames)
        self._last_send = time.monotonic()
        self.bytes_sent += sum(memoryview(f).nbytes for f in frames)

    def send_raw(self, data: bytes) -> None:
        """Bytes that are not a frame (fault injection only)."""
        with self._lock:
            self.sock.sendall(data)

    def read(self, step: int, timeout: float, target: Target) -> tuple[Header, memoryview]:
        """The next frame; ERROR and REJECT become WorkerError. Tensor payloads land in `target`."""
        self.sock.settimeout(timeout)
        arrived = 0.0

        def timed(h: Header) -> memoryview:
            nonlocal arrived
            dest = target(h)
            arrived = time.monotonic()  # after target: its wait for our own send is not receiving
            return dest

        try:
            header, payload = wire.read_frame(self.sock, self.peer, timed)
        except socket.timeout:
            raise ServerLost(f"no word from the {self.peer} for {timeout:.0f} s at step {step}") from None
        except (ConnectionClosed, OSError) as e:
            raise ServerLost(f"lost the connection to the {self.peer} at step {step}: {e}") from None
        self.bytes_received += wire.HEADER_SIZE + header.length + wire.TRAILER_SIZE
        if arrived:
            self.received_s += time.monotonic() - arrived
        if header.type in (MsgType.ERROR, MsgType.REJECT):
            body = wire.decode_json(payload, header, self.peer)
            if header.type == MsgType.ERROR:
                raise WorkerError(f"the {self.peer} ended our session: {body.get('error', '?')}")
            raise WorkerError(f"the server refused worker {self.id}: {body.get('reason', '?')}")
        return header, payload

    def json(self, mtype: MsgType, timeout: float) -> dict[str, Any]:
        """The next control frame, which must be `mtype` (heartbeats in between are skipped)."""
        def control_only(h: Header) -> memoryview:
            raise wire.ProtocolError(f"{self.peer}: unexpected {h.type.name} while waiting for {mtype.name}")

        while True:
            header, payload = self.read(0, timeout, control_only)
            if header.type == mtype:
                return wire.decode_json(payload, header, self.peer)
            if header.type != MsgType.HEARTBEAT:
                raise WorkerError(f"expected {mtype.name} from the {self.peer}, got {header.type.name}")

    def start_heartbeats(self, period: float) -> None:
        self._beats = threading.Thread(target=self._heartbeats, args=(period,), daemon=True, name="heartbeat")
        self._beats.start()

    def _heartbeats(self, period: float) -> None:
        while not self._stop.wait(period / 2):
            if time.monotonic() - self._last_send < period:
                continue
            try:
                with self._lock:
                    self._send_locked(wire.frame(MsgType.HEARTBEAT, worker=self.id))
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        if self._beats is not None and self._beats.is_alive():
            self._beats.join(timeout=5.0)  # a daemon thread alive at exit can abort the interpreter
        self.sock.close()
