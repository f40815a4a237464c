"""A userspace TCP proxy that makes loopback behave like a slower link: bandwidth and latency.

    python -m bench.proxy --upstream 127.0.0.1:65432 --mbit 100 --delay-ms 0.5 [--port 0]

Why userspace: this kernel has no netem, and `tc tbf` only shapes inside network namespaces, so
the benchmark puts this proxy between the workers and the server instead. Each direction
(client->upstream, upstream->client) has its own pacer (bandwidth) and its own delay line
(one-way latency). By default the pacers are shared by every connection through the proxy: all
workers' traffic squeezes through one link, like the server machine's one network port
(`--per-connection` gives each connection a link of its own instead).

Model of a link: bytes leave the pacer at `rate` (in slices of `--quantum` bytes, so a large
read is not held back as one huge packet), then arrive `delay` seconds later. Threads and
`time.sleep` rather than asyncio: asyncio's epoll timeouts round up to whole milliseconds, which
would cap a 1 Gbit/s emulation well below 1 Gbit/s.

On start it prints `PROXY_PORT <port>` on stdout (one line), so a parent can pick port 0.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.procs import Group

READ_SIZE = 1024 * 1024
"""Bytes read per recv from a sender."""


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """One direction of an emulated link."""

    rate: float | None = None
    """Bytes per second; None: as fast as loopback."""
    delay_s: float = 0.0
    """One-way latency in seconds."""
    quantum: int = 16 * 1024
    """Bytes released per pacing step (the emulated 'packet'); smaller is smoother and costs more CPU."""
    burst: int = 16 * 1024
    """Bytes an idle link may send at once before pacing starts."""

    @staticmethod
    def from_mbit(mbit: float | None, delay_ms: float = 0.0, quantum: int = 16 * 1024) -> LinkSpec:
        rate = None if mbit is None else mbit * 1e6 / 8
        return LinkSpec(rate=rate, delay_s=delay_ms / 1e3, quantum=quantum, burst=quantum)


class Pacer:
    """Token bucket as a virtual clock: `release(n)` says when n more bytes have left the link.

    An idle link banks at most `burst` bytes (the clock never falls behind `now - burst/rate`);
    a backlogged one is paced from its own clock, so a thread that woke up late (a loaded
    machine) is not charged for the oversleep.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate}")
        self.rate, self.burst, self.clock = rate, burst, clock
        self._free_at = float("-inf")
        self._lock = threading.Lock()

    def release(self, n: int, backlogged: bool = False) -> float:
        """Time (on `clock`) at which `n` bytes queued now are fully sent.

        `backlogged`: these bytes were already waiting behind the previous ones (the rest of one
        read), so the link was busy all along and a late wake-up is caught up in full.
        """
        with self._lock:
            start = self._free_at if backlogged else max(self._free_at, self.clock() - self.burst / self.rate)
            self._free_at = start + n / self.rate
            return self._free_at


def _sleep_until(t: float) -> None:
    wait = t - time.monotonic()
    if wait > 0:
        time.sleep(wait)


class Direction:
    """Moves bytes from `src` to `dst` through a pacer and a delay line, then half-closes `dst`."""

    def __init__(self, src: socket.socket, dst: socket.socket, spec: LinkSpec, pacer: Pacer | None,
                 on_done: Callable[[], None]) -> None:
        self.src, self.dst, self.spec, self.pacer, self.on_done = src, dst, spec, pacer, on_done
        self.finished = False
        self._line: deque[tuple[float, bytes | None]] = deque()
        self._ready = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        if spec.delay_s > 0:
            threading.Thread(target=self._deliver, daemon=True).start()

    def _read(self) -> None:
        try:
            while not self.finished and (data := self.src.recv(READ_SIZE)):
                view = memoryview(data)
                for i in range(0, len(view), self.spec.quantum):
                    piece = view[i : i + self.spec.quantum]
                    if self.pacer is not None:
                        _sleep_until(self.pacer.release(len(piece), backlogged=i > 0))
                    self._forward(piece)
        except OSError:
            pass
        self._forward(None)

    def _forward(self, piece: memoryview | None) -> None:
        if self.spec.delay_s <= 0:
            self._send(piece)
            return
        with self._ready:
            self._line.append((time.monotonic() + self.spec.delay_s, None if piece is None else bytes(piece)))
            self._ready.notify()

    def _deliver(self) -> None:
        while True:
            with self._ready:
                while not self._line:
                    self._ready.wait()
                due, piece = self._line.popleft()
            _sleep_until(due)
            if not self._send(piece):
                return

    def _send(self, piece: bytes | memoryview | None) -> bool:
        """Forward a piece (None: end of stream); False once this direction is finished."""
        if self.finished:
            return False
        try:
            if piece is not None:
                self.dst.sendall(piece)
                return True
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.finished = True
        self.on_done()
        return False


class Proxy:
    """Accepts on `port`, dials `upstream` for each connection, and forwards both ways through links."""

    def __init__(self, upstream: tuple[str, int], up: LinkSpec, down: LinkSpec, port: int = 0,
                 host: str = "127.0.0.1", per_connection: bool = False, connect_timeout_s: float = 30.0) -> None:
        self.upstream, self.up, self.down = upstream, up, down
        self.per_connection, self.connect_timeout_s = per_connection, connect_timeout_s
        self.listener = socket.create_server((host, port))
        self.port = self.listener.getsockname()[1]
        self._shared = (self._pacer(up), self._pacer(down))

    @staticmethod
    def _pacer(spec: LinkSpec) -> Pacer | None:
        return None if spec.rate is None else Pacer(spec.rate, spec.burst)

    def _dial(self) -> socket.socket:
        """The upstream may still be starting: retry until connect_timeout_s."""
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                return socket.create_connection(self.upstream, timeout=5.0)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def serve_forever(self) -> None:
        while True:
            client, _ = self.listener.accept()
            try:
                server = self._dial()
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._join(client, server)

    def _join(self, client: socket.socket, server: socket.socket) -> None:
        up, down = (self._pacer(self.up), self._pacer(self.down)) if self.per_connection else self._shared
        left = [2]
        lock = threading.Lock()

        def done() -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            client.close()
            server.close()

        Direction(client, server, self.up, up, done)  # each runs on its own threads
        Direction(server, client, self.down, down, done)


def start(group: Group, upstream_port: int, link: LinkSpec) -> int:
    """Run a proxy process in `group` in front of 127.0.0.1:`upstream_port`; returns its port."""
    from bench.procs import BenchError, python

    args = ["--upstream", f"127.0.0.1:{upstream_port}", "--delay-ms", str(link.delay_s * 1e3),
            "--quantum", str(link.quantum)]
    if link.rate is not None:
        args += ["--mbit", str(link.rate * 8 / 1e6)]
    proc = group.spawn("proxy", python("-m", "bench.proxy", *args), stdout_pipe=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "PROXY_PORT":
        raise BenchError(f"the proxy did not start:\n{group.tail('proxy')}")
    return int(line[1])


def describe(spec: LinkSpec) -> str:
    rate = "unlimited" if spec.rate is None else f"{spec.rate * 8 / 1e6:g} Mbit/s"
    return f"{rate}, delay {spec.delay_s * 1e3:g} ms"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="where to forward connections")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--mbit", type=float, help="bandwidth per direction in Mbit/s (default: unlimited)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way latency per direction, in ms")
    p.add_argument("--quantum", type=int, default=16 * 1024, help="bytes per paced slice (default 16384)")
    p.add_argument("--per-connection", action="store_true", help="a link per connection, not one shared")
    args = p.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    spec = LinkSpec.from_mbit(args.mbit, args.delay_ms, args.quantum)
    proxy = Proxy((host, int(port)), spec, spec, args.port, args.host, args.per_connection)
    share = "per connection" if args.per_connection else "shared by all connections"
    print(f"proxy 127.0.0.1:{proxy.port} -> {args.upstream}: {describe(spec)} each way, {share}",
          file=sys.stderr, flush=True)
    print(f"PROXY_PORT {proxy.port}", flush=True)
    try:
        from smolcluster.runner import watch_parent  # exit with the benchmark that started us

        watch_parent()
    except ImportError:
        pass
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
