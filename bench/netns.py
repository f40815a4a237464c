"""Hosts for a measurement: loopback, or a star of network namespaces with shaped ports.

DDP cannot be put behind `bench/proxy.py`: gloo's ranks dial each other directly, at addresses
they exchange through the store. So for a slow-link comparison of DDP and smolcluster on equal
terms, every process gets a "machine" of its own: a network namespace with one veth port on a
shared bridge (the switch), and `tc tbf` limits each port in both directions, as a switch port
of that speed would. Only bandwidth: this kernel has no netem, so no added latency (the proxy
links have latency). Needs root and iproute2 (`ip`, `tc`); `available()` says why not otherwise.

Namespaces are named after this process id and deleted on exit; ones left by a benchmark that
was killed (its pid gone) are deleted the next time a Star is built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import TracebackType

from bench.procs import BenchError

PREFIX = "smolbench"
SUBNET = "10.77.0"


class Hosts:
    """Where process i of a measurement runs; the base class is this machine's loopback."""

    def prefix(self, i: int) -> list[str]:
        """Command prefix that runs a process on host i."""
        return []

    def address(self, i: int) -> str:
        return "127.0.0.1"

    def ifname(self, i: int) -> str:
        """Host i's network interface (for GLOO_SOCKET_IFNAME)."""
        return "lo0" if sys.platform == "darwin" else "lo"


LOOPBACK = Hosts()


def available() -> str | None:
    """None if namespaces can be built here, else the reason they cannot."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (iproute2)" if missing else None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale() -> None:
    """Delete namespaces of benchmarks whose process is gone."""
    for name in _netns_list():
        parts = name.split("-")
        if parts[0] == PREFIX and len(parts) >= 2 and parts[1].isdigit() and not _alive(int(parts[1])):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Star(Hosts):
    """`hosts` namespaces on one bridge; every port limited to `mbit` Mbit/s each way."""

    def __init__(self, hosts: int, mbit: float) -> None:
        self.hosts, self.mbit = hosts, mbit
        self.tag = f"{PREFIX}-{os.getpid()}"
        self.created: list[str] = []

    def ns(self, i: int) -> str:
        return f"{self.tag}-h{i}"

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i)]

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def ifname(self, i: int) -> str:
        return f"sb{i}"

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _shape(self, ns: str, dev: str) -> None:
        # A 1 Gbit/s tbf needs a burst of a few ms of traffic to reach its rate (measured: 64 KB
        # gave 855 Mbit/s, 256 KB 965); never less than 64 KB, or GSO packets are dropped.
        burst = max(64 * 1024, int(self.mbit * 1e6 / 8 * 0.002))
        _ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", f"{self.mbit:g}mbit", "burst", str(burst), "latency", "100ms")

    def __enter__(self) -> Star:
        reason = available()
        if reason:
            raise BenchError(reason)
        remove_stale()
        try:
            switch = f"{self.tag}-sw"
            self._add_ns(switch)
            _ip("-n", switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", switch, "link", "set", "br0", "up")
            for i in range(self.hosts):
                ns, port = self.ns(i), f"p{i}"
                self._add_ns(ns)
                _ip("link", "add", self.ifname(i), "netns", ns, "type", "veth", "peer", "name", port, "netns", switch)
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", self.ifname(i))
                _ip("-n", ns, "link", "set", self.ifname(i), "up")
                _ip("-n", switch, "link", "set", port, "master", "br0")
                _ip("-n", switch, "link", "set", port, "up")
                self._shape(ns, self.ifname(i))  # host -> switch
                self._shape(switch, port)  # switch -> host
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.created.clear()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
