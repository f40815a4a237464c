"""This machine's own loopback TCP throughput: one process blasts bytes at another.

The benchmark divides bytes on the wire by this number to get each system's "wire time": how
long a step's communication would take if moving the bytes were the only cost. Both ends are
plain Python sockets with 1 MiB `sendall` / `recv_into`, the way smolcluster moves tensors, so
the number is what a Python process can push through loopback here, not a kernel ideal.

    python -m bench.loopback sink PORT   # internal: the receiving process
"""

from __future__ import annotations

import socket
import statistics
import sys
import time

from bench.procs import Group, python

CHUNK = 1 << 20


def sink(port: int) -> None:
    """Accept one connection, read everything, print `MB_PER_S <n>` (first byte to last)."""
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(60.0)  # never outlive a parent that died before connecting
        print("READY", flush=True)
        conn, _ = server.accept()
        conn.settimeout(60.0)
        buf = memoryview(bytearray(CHUNK))
        total, t0 = 0, None
        with conn:
            while n := conn.recv_into(buf):
                if t0 is None:
                    t0 = time.perf_counter()
                total += n
        elapsed = time.perf_counter() - (t0 or time.perf_counter())
        print(f"MB_PER_S {total / max(elapsed, 1e-9) / 1e6:.1f}", flush=True)


def blast_once(group: Group, name: str, nbytes: int, timeout_s: float = 60.0) -> float:
    """One transfer of `nbytes` to a sink process; returns MB/s (1 MB = 1e6 bytes)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = group.spawn(name, python("-m", "bench.loopback", "sink", str(port)), stdout_pipe=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        raise RuntimeError(f"loopback sink did not start:\n{group.tail(name)}")
    payload = memoryview(bytearray(CHUNK))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        for _ in range(nbytes // CHUNK):
            conn.sendall(payload)
    line = proc.stdout.readline().split()
    proc.wait(timeout=timeout_s)
    return float(line[1])


def measure(group: Group, repeats: int = 3, nbytes: int = 512 * CHUNK) -> dict[str, float | list[float]]:
    """Median and spread of `repeats` blasts of `nbytes` each."""
    runs = [blast_once(group, f"loopback-{i}", nbytes) for i in range(repeats)]
    return {"MB_per_s": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs,
            "bytes_per_run": nbytes}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sink":
        sink(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.loopback sink PORT")
