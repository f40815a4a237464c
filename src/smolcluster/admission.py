"""Admission of connections that have not authenticated yet, and the open-file limit behind it.

A few hundred idle connections that never finish the handshake would use up a process's open
files (macOS starts it at 256) and accept() would fail with EMFILE. So the server raises its own
soft limit at start, keeps such connections under caps derived from that limit, in total and per
source address, and sheds the oldest past a cap: every newcomer, a worker too, gets its turn.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smolcluster import wire
from smolcluster.wire import MsgType

if TYPE_CHECKING:
    from smolcluster.hub import Peer

MAX_PENDING = 128
"""Connections that have not authenticated yet (no HELLO accepted, TLS handshakes included) kept at
most; past it the oldest is shed. Also capped by the open-file limit (Admission.for_fd_limit)."""
MAX_PENDING_PER_ADDRESS = 16
"""The same per source address, so one flooding host sheds its own connections, not a worker's."""
FD_RESERVE = 64
"""Descriptors the caps leave alone: the process's own files, the workers, checkpoints and logs."""
OPEN_MAX = 10240
"""What the soft open-file limit is raised to at most: plenty here, and macOS refuses more even
where its hard limit says unlimited."""
LOGGED_DROPS_BURST = 20
LOGGED_DROPS_PER_S = 2.0
"""Closes of unauthenticated connections logged one by one: a burst of 20, then 2 a second (a token
bucket); the rest are counted into the summary line, so a flood cannot flood the log."""
BUSY = "server busy: too many connections waiting for a handshake; retry"
"""The ERROR a shed connection gets (workers retry on it)."""
BUSY_FRAME = b"".join(bytes(b) for b in wire.frame(MsgType.ERROR, {"error": BUSY}))


def fd_soft_limit() -> int:
    """The process's soft open-file limit (a large number when unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class FdLimit:
    """What raise_fd_limit did, for the server's start-up log line."""

    before: int
    after: int
    why: str = ""

    def __str__(self) -> str:
        if self.after > self.before:
            return f"soft limit raised {self.before} -> {self.after}"
        return f"soft limit {self.after}" + (f" ({self.why})" if self.why else "")


def raise_fd_limit(target: int = OPEN_MAX) -> FdLimit:
    """Lift our soft RLIMIT_NOFILE toward the hard limit, to `target` at most; never lower it.

    macOS starts processes at 256 open files, which a few hundred idle connections use up.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as e:
        return FdLimit(0, 0, f"unknown: {e}")
    inf = resource.RLIM_INFINITY
    want = target if hard == inf else min(hard, target)
    if soft == inf or soft >= want:
        enough = soft == inf or soft >= target
        return FdLimit(soft, soft, f"{target} or more already" if enough else "the hard limit; cannot raise it")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as e:
        return FdLimit(soft, soft, f"could not raise it to {want}: {e}")
    return FdLimit(soft, want)


@dataclass(eq=False)
class Admission:
    """Caps on connections that have not authenticated yet, and the counts for the summary log line.

    A flood of such connections must neither use up the open files (accept() then fails with
    EMFILE) nor crowd workers out: past a cap the oldest is shed, so every newcomer, a worker's
    too, gets its turn to say HELLO.
    """

    total: int
    per_address: int
    pending: dict[Peer, None] = field(default_factory=dict)
    """Oldest first (dicts keep insertion order); authenticated or closed ones are purged lazily."""
    by_address: dict[str, dict[Peer, None]] = field(default_factory=dict)
    shed: int = 0
    """Shed since the last summary line."""
    shed_total: int = 0
    quiet: int = 0
    """Closes of unauthenticated connections not logged one by one since the last summary line."""
    tokens: float = LOGGED_DROPS_BURST
    """Closes that may still be logged one by one."""
    window: float = field(default_factory=time.monotonic)

    @classmethod
    def for_fd_limit(cls, limit: int) -> Admission:
        """Caps leaving FD_RESERVE descriptors and half the rest free (a shed follows its accept())."""
        total = max(1, min(MAX_PENDING, (limit - FD_RESERVE) // 2))
        return cls(total, min(MAX_PENDING_PER_ADDRESS, total))

    def __str__(self) -> str:
        return f"cap {self.total} total, {self.per_address} per address"

    @staticmethod
    def _waiting(peer: Peer) -> bool:
        return not peer.worker_id and peer.sock.fileno() != -1  # closed: fileno() is -1

    def add(self, peer: Peer) -> list[Peer]:
        """Count a new connection in; returns those to shed for it (its address's oldest, then the oldest)."""
        self.pending[peer] = None
        mine = self.by_address.setdefault(peer.host, {})
        mine[peer] = None
        victims = []
        for group, cap in ((mine, self.per_address), (self.pending, self.total)):
            if len(group) > cap:
                self._purge(group)
            while len(group) > cap:
                victims.append(next(iter(group)))
                self.remove(victims[-1])
        return victims

    def oldest(self) -> Peer | None:
        """The oldest connection still waiting for its handshake."""
        while self.pending:
            peer = next(iter(self.pending))
            if self._waiting(peer):
                return peer
            self.remove(peer)
        return None

    def remove(self, peer: Peer) -> None:
        self.pending.pop(peer, None)
        mine = self.by_address.get(peer.host)
        if mine is not None:
            mine.pop(peer, None)
            if not mine:
                del self.by_address[peer.host]

    def _purge(self, group: dict[Peer, None]) -> None:
        for peer in [p for p in group if not self._waiting(p)]:
            self.remove(peer)

    def may_log(self) -> bool:
        """Whether this unauthenticated close gets its own log line (else it is counted)."""
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.quiet += 1
        return False

    def summary(self, now: float) -> str:
        """The line for the counts since the last one ('' if nothing happened); starts a new window."""
        s = f"{now - self.window:.0f} s"
        parts = []
        if self.shed:
            parts.append(f"shed {self.shed} connections that had not authenticated in the last {s} ({self})")
        if self.quiet:
            parts.append(f"{self.quiet} more unauthenticated connections closed in the last {s} (not logged one by one)")
        self.shed = self.quiet = 0
        self.tokens = min(LOGGED_DROPS_BURST, self.tokens + (now - self.window) * LOGGED_DROPS_PER_S)
        self.window = now
        return "; ".join(parts)
