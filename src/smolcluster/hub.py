"""The server's network side: one thread, one `selectors` loop, every connection non-blocking.

A slow or dead peer can never block the others: reads land in buffers the owner picks as each
header arrives, writes are queued and drained as sockets accept them, a peer that stays silent
past its bound is dropped, and anything malformed closes only that peer's connection.
"""

from __future__ import annotations

import errno
import select
import selectors
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from loguru import logger

from smolcluster import wire
from smolcluster.admission import BUSY_FRAME, Admission, fd_soft_limit
from smolcluster.wire import Header, MsgType, ProtocolError

CLOSE_GRACE_S = 1.0
ACCEPT_BATCH = 256
"""Connections accepted per pass of the loop at most: a flood's backlog must not starve the workers' sockets."""
LISTEN_BACKLOG = 1024
"""Completed connections the kernel holds for us between passes (capped by somaxconn; macOS: 128)."""
ACCEPT_PAUSE_S = 0.5
"""How long the listener rests when accept() fails with nothing left to shed (instead of spinning)."""


@dataclass(eq=False)
class Peer:
    """One connection, and once it proved itself with HELLO, one worker."""

    sock: socket.socket
    addr: str
    reader: wire.FrameReader = field(init=False)
    writer: wire.FrameWriter = field(init=False)
    nonce: str = ""
    worker_id: int = 0
    synced: bool = False
    """Holds the current parameters and optimizer state (so its gradients count)."""
    drift: str = ""
    """Why it is to be resynced at the next step boundary (its replica drifted, or a periodic resync)."""
    resync_at: int = -1
    """The step it was resynced to, until it acknowledges (its gradients until then are dropped)."""
    inbox: Any = None
    """Its gradient payloads (an averaging.Inbox), once it joined."""
    since: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)
    handshaking: bool = False
    """TLS handshake still in progress."""
    closing: str = ""
    """Why it is being closed once its last frame (REJECT, ERROR) is out; nothing more is read."""
    closing_since: float = 0.0
    host: str = ""
    """Source address without the port: connections waiting for a handshake are capped per host."""

    @property
    def name(self) -> str:
        return f"worker {self.worker_id} ({self.addr})" if self.worker_id else self.addr


class Handler(Protocol):
    def on_connect(self, peer: Peer) -> None: ...
    def target(self, peer: Peer, header: Header) -> memoryview | None: ...
    def on_frame(self, peer: Peer, header: Header, payload: memoryview) -> None: ...
    def on_drop(self, peer: Peer, why: str) -> None: ...


class Hub:
    def __init__(self, host: str, port: int, handler: Handler, *, heartbeat_s: float, silence_s: float,
                 handshake_s: float, tls: ssl.SSLContext | None = None, max_queue: int = 1 << 62) -> None:
        self.handler = handler
        self.max_queue = max_queue
        """Bytes a peer may leave unread in its send queue; past that it is dropped (memory stays bounded)."""
        self.heartbeat_s, self.silence_s, self.handshake_s = heartbeat_s, silence_s, handshake_s
        self.tls = tls
        self.peers: list[Peer] = []
        self.sel = selectors.DefaultSelector()
        self.listener = self._listen(host, port)
        self._last_beat = time.monotonic()
        self.admission = Admission.for_fd_limit(fd_soft_limit())
        self._paused_until: float | None = None
        """While accept() is starved of descriptors with nothing to shed: when the listener is re-registered."""
        self._starved: list[float] = []
        """The current episode of accept() failures: [first, last, count]; empty outside one."""

    def _listen(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, None)
        self.port = sock.getsockname()[1]
        return sock

    def _accept(self) -> None:
        """Accept until the backlog is empty, ACCEPT_BATCH at most per pass; accept() errors never propagate."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while it waited in the backlog
                if self._accept_failed(e):
                    continue
                return
            self._admit(sock, addr)

    def _admit(self, sock: socket.socket, addr: Any) -> None:
        """Set up a new connection, shedding the oldest unauthenticated ones past the caps."""
        peer = Peer(sock, f"{addr[0]}:{addr[1]}", host=str(addr[0]))
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                peer.sock, peer.handshaking = sock, True
            self.sel.register(sock, selectors.EVENT_READ, peer)
        except (OSError, ValueError) as e:  # reset before we got to it (macOS: EINVAL), or the selector is full
            sock.close()
            logger.debug(f"connection from {peer.addr} lost while accepting it: {e}")
            return
        peer.reader = wire.FrameReader(sock, peer.addr, lambda h, p=peer: self.handler.target(p, h))
        peer.writer = wire.FrameWriter(sock)
        self.peers.append(peer)
        logger.debug(f"connection from {peer.addr}")
        for victim in self.admission.add(peer):
            self._shed(victim)
        if not peer.handshaking:
            self.handler.on_connect(peer)

    def _shed(self, peer: Peer) -> None:
        """Close an unauthenticated connection at once (a graceful close lingers and holds its descriptor).

        A plain one first gets one non-blocking try at the BUSY frame, and its unread input is
        drained: closing with input unread makes the kernel send a reset, which can destroy it.
        """
        self.admission.remove(peer)
        if not (peer.handshaking or peer.closing or peer.writer.pending or isinstance(peer.sock, ssl.SSLSocket)):
            try:
                peer.sock.send(BUSY_FRAME)
                peer.sock.recv(65536)
            except OSError:
                pass
        self.peers.remove(peer)
        self.sel.unregister(peer.sock)
        peer.sock.close()
        self.admission.shed += 1
        self.admission.shed_total += 1

    def _accept_failed(self, e: OSError) -> bool:
        """accept() failed (EMFILE, ENFILE, ENOBUFS...): shed the oldest unauthenticated connection and
        try again (True), or with none to shed rest the listener for ACCEPT_PAUSE_S instead of spinning
        on a backlog that stays readable. Logged once per episode, not per failure."""
        if e.errno in (errno.EMFILE, errno.ENFILE) and not self._connection_waiting():
            return False  # accept() says EMFILE before it looks at the backlog: nobody is waiting
        now = time.monotonic()
        if not self._starved:
            self._starved = [now, now, 0]
            logger.warning(f"cannot accept connections: {e.strerror or e} (open-file soft limit {fd_soft_limit()}); "
                           f"shedding connections that have not authenticated, resting {ACCEPT_PAUSE_S:g} s at a "
                           "time when none are left")
        self._starved[1:] = [now, self._starved[2] + 1]
        victim = self.admission.oldest() if e.errno in (errno.EMFILE, errno.ENFILE) else None
        if victim is not None:
            self._shed(victim)
            return True
        if self._paused_until is None:
            self.sel.unregister(self.listener)
        self._paused_until = now + ACCEPT_PAUSE_S
        return False

    def _connection_waiting(self) -> bool:
        """Whether the backlog holds a connection (poll() needs no descriptor, unlike a selector)."""
        poll = select.poll()
        poll.register(self.listener, select.POLLIN)
        return bool(poll.poll(0))

    def _resume_accepting(self, now: float) -> None:
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, None)

    def _report_admission(self, now: float) -> None:
        """At most one summary line per second: sheds, quiet closes, and the end of a starved episode."""
        if now - self.admission.window < 1.0:
            return
        line = self.admission.summary(now)
        if line:
            logger.warning(line)
        if self._starved and self._paused_until is None and now - self._starved[1] >= 1.0:
            first, _, failures = self._starved
            logger.info(f"accepting connections normally again after {now - first:.1f} s "
                        f"({failures} accept() failures)")
            self._starved = []

    def send(self, peer: Peer, buffers: list[Any]) -> None:
        if peer in self.peers:
            peer.writer.push(buffers)
            self._flush(peer)
            if peer in self.peers and peer.writer.pending > self.max_queue and not peer.closing:
                self.drop(peer, f"fell behind: {peer.writer.pending / 2**20:.1f} MiB of frames queued that it "
                                f"has not read (limit {self.max_queue / 2**20:.0f} MiB, cluster.max_send_queue_mb)")

    def _flush(self, peer: Peer) -> None:
        if peer.handshaking:
            return
        try:
            peer.writer.write()
        except OSError as e:
            self.drop(peer, peer.closing or f"send failed: {e}")
            return
        if peer.closing and not peer.writer.pending:
            # Half-close and let _discard read until the peer closes too: closing with unread
            # input makes the kernel send a reset, which can destroy our last frame in flight.
            try:
                peer.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.drop(peer, peer.closing)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.writer.pending else 0)
        self.sel.modify(peer.sock, events, peer)

    def drop(self, peer: Peer, why: str) -> None:
        if peer not in self.peers:
            return
        self.peers.remove(peer)
        self.sel.unregister(peer.sock)
        peer.sock.close()
        if peer.worker_id or self.admission.may_log():  # a flood's closes are counted, not logged each
            self.handler.on_drop(peer, why)

    def close_after(self, peer: Peer, buffers: list[Any], why: str) -> None:
        """Send a last frame, then close; a peer that does not take it within CLOSE_GRACE_S is cut."""
        if peer in self.peers and not peer.closing:
            peer.closing, peer.closing_since = why, time.monotonic()
            self.send(peer, buffers)

    def fail(self, peer: Peer, message: str) -> None:
        """Tell the peer why with an ERROR frame, then close it."""
        self.close_after(peer, wire.frame(MsgType.ERROR, {"error": message}), message)

    def _discard(self, peer: Peer) -> None:
        """Read and drop what a closing peer still sends, until it closes (or the grace ends)."""
        try:
            while peer.sock.recv(65536):
                pass
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return
        except OSError:
            pass
        self.drop(peer, peer.closing)

    def _tls_handshake(self, peer: Peer) -> None:
        try:
            peer.sock.do_handshake()  # type: ignore[attr-defined]
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        peer.handshaking = False
        self.handler.on_connect(peer)

    def pump(self, timeout: float) -> None:
        """Serve every socket for at most `timeout` seconds (returns after the first batch of events)."""
        now = time.monotonic()
        self._resume_accepting(now)
        if self._paused_until is not None:
            timeout = min(timeout, self._paused_until - now)
        incoming = False
        for key, events in self.sel.select(max(timeout, 0.0)):
            if key.data is None:  # accepted after the peers: newcomers must not shed a worker whose HELLO is here
                incoming = True
                continue
            peer: Peer = key.data
            try:
                if peer.handshaking:
                    self._tls_handshake(peer)
                    continue
                if events & selectors.EVENT_READ and peer.closing:
                    self._discard(peer)
                elif events & selectors.EVENT_READ:
                    for header, payload in peer.reader.read():
                        peer.last_heard = time.monotonic()
                        self.handler.on_frame(peer, header, payload)
                        if peer not in self.peers or peer.closing:
                            break
                if peer in self.peers and events & selectors.EVENT_WRITE:
                    self._flush(peer)
            except wire.ConnectionClosed as e:
                self.drop(peer, f"connection closed{e.cut}")
            except ProtocolError as e:
                logger.error(f"protocol error from {peer.name}: {e}")
                self.fail(peer, str(e))
            except (OSError, ssl.SSLError) as e:
                self.drop(peer, f"socket error: {e}")
            except Exception as e:  # a bug or an input we did not foresee: lose the peer, not the run
                logger.opt(exception=True).error(f"unexpected error handling {peer.name}: {e!r}")
                self.fail(peer, f"server could not handle a frame: {e!r}")
        if incoming:
            self._accept()
        self._police()
        self._report_admission(time.monotonic())

    def _police(self) -> None:
        """Drop silent peers; keep workers' read timeouts from firing while the server waits."""
        now = time.monotonic()
        for peer in list(self.peers):
            if peer.closing:
                if now - peer.closing_since > CLOSE_GRACE_S:
                    self.drop(peer, peer.closing)
            elif not peer.worker_id and now - peer.since > self.handshake_s:
                self.drop(peer, f"no valid handshake within {self.handshake_s:g} s")
            elif peer.worker_id and now - peer.last_heard > self.silence_s:
                self.drop(peer, f"silent for {now - peer.last_heard:.0f} s (no heartbeat)")
        if now - self._last_beat >= self.heartbeat_s:
            self._last_beat = now
            beat = wire.frame(MsgType.HEARTBEAT)
            for peer in self.peers:
                if peer.synced and not peer.writer.pending:
                    self.send(peer, beat)

    def drain(self, timeout: float) -> None:
        """Give queued writes up to `timeout` seconds to go out."""
        deadline = time.monotonic() + timeout
        while any(p.writer.pending for p in self.peers) and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())

    def close(self) -> None:
        self._report_admission(max(time.monotonic(), self.admission.window + 1.0))  # the last sheds too
        for peer in list(self.peers):
            self.sel.unregister(peer.sock)
            peer.sock.close()
        self.peers.clear()
        try:
            self.sel.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        self.listener.close()
        self.sel.close()
