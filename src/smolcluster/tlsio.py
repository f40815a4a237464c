"""A TLS connection that the worker's threads can share.

OpenSSL forbids using one connection from two threads at once, and TLS 1.3 makes it bite: a read
can write (session tickets, key updates) while the heartbeat or gradient thread is sending, which
corrupts the stream ("EOF occurred in violation of protocol"). Here every read and write holds one
lock, and a reader waits for bytes with select() *outside* it, so a sender is never stuck behind a
reader that is waiting for the server.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time


class SharedTLS:
    """The subset of a socket the worker uses (recv_into, sendall, settimeout, close), thread-safe."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._lock = threading.Lock()
        self._timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def fileno(self) -> int:
        return self._sock.fileno()

    def _wait(self, want_write: bool, deadline: float | None) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise socket.timeout("timed out")
        # Poll at most 50 ms at a time: the other side of the lock may have consumed what we saw.
        wait = 0.05 if left is None else min(left, 0.05)
        if want_write:
            select.select([], [self._sock], [], wait)
        else:
            select.select([self._sock], [], [], wait)

    def recv_into(self, view: memoryview) -> int:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            want_write = False
            with self._lock:
                try:
                    return self._sock.recv_into(view)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLWantWriteError:
                    want_write = True
            self._wait(want_write, deadline)

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        deadline = None if self._timeout is None else time.monotonic() + max(self._timeout, 60.0)
        with self._lock:
            while view.nbytes:
                try:
                    view = view[self._sock.send(view):]
                except ssl.SSLWantWriteError:
                    self._wait(True, deadline)
                except ssl.SSLWantReadError:
                    self._wait(False, deadline)

    def close(self) -> None:
        with self._lock:
            self._sock.close()
