"""BASELINE ONLY — the naive pickle-over-TCP parameter server that smolcluster replaces.

Never imported by the library; this file (with the rest of bench/) is the only place in the
repository where pickle appears. It is written in the style of the hobby projects our users
come from (see shared/UPSTREAM.md): a 4-byte length prefix, then `pickle.dumps` of a tuple such
as ("all_reduce", step, rank, [grad tensors]); the server reads the workers one after the other,
averages with `torch.stack(...).mean(0)` and pickles ("averaged_gradients", step, avg) back.

Unpickling runs code chosen by the sender; here both ends are our own processes on loopback,
which is the only reason it is tolerable. Two upstream mistakes are deliberately *not* copied,
so the comparison measures the protocol and not easily fixed bugs: buffers grow linearly
(upstream's `data += chunk` was quadratic), and sockets set TCP_NODELAY.

    python -m bench.pickle_ps server --port P --steps S --out FILE --set KEY=VALUE ...
    python -m bench.pickle_ps worker --rank K --port P --steps S --set KEY=VALUE ...
"""

from __future__ import annotations

import argparse
import json
import pickle
import socket
import struct
import time
from pathlib import Path

from bench import proxy
from bench.netns import LOOPBACK, Hosts
from bench.procs import Group, python, set_flags
from bench.proxy import LinkSpec

LENGTH = struct.Struct(">I")


def send_msg(sock: socket.socket, obj: object) -> int:
    """Pickle `obj` and send it behind its length; returns the bytes sent."""
    payload = pickle.dumps(obj)
    sock.sendall(LENGTH.pack(len(payload)) + payload)
    return LENGTH.size + len(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return buf


def recv_msg(sock: socket.socket) -> tuple[object, int]:
    """The next message and its size on the wire."""
    (n,) = LENGTH.unpack(_recv_exact(sock, LENGTH.size))
    return pickle.loads(_recv_exact(sock, n)), LENGTH.size + n


def serve(host: str, port: int, steps: int, out: Path, workers: int) -> None:
    import torch

    from bench.workload import StepTimer

    listener = socket.create_server((host, port))
    conns: dict[int, socket.socket] = {}
    while len(conns) < workers:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        (kind, rank), _ = recv_msg(conn)
        conns[rank] = conn
    for conn in conns.values():
        send_msg(conn, ("start",))
    timer, bytes_in, bytes_out = StepTimer(), 0, 0
    for step in range(steps):
        grads = []
        for rank in sorted(conns):
            (kind, s, r, g), n = recv_msg(conns[rank])
            grads.append(g)
            bytes_in += n
        avg = [torch.stack(layer).mean(0) for layer in zip(*grads)]
        for conn in conns.values():
            bytes_out += send_msg(conn, ("averaged_gradients", step, avg))
        timer.tick()
    for conn in conns.values():
        conn.close()
    out.write_text(json.dumps({"step_s": timer.times, "bytes_in_per_step": bytes_in / steps,
                               "bytes_out_per_step": bytes_out / steps}))


def _connect(host: str, port: int, timeout_s: float = 60.0) -> socket.socket:
    """The server may still be importing torch: retry for up to `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.create_connection((host, port), timeout=120)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def work(rank: int, host: str, port: int, steps: int, overrides: list[str]) -> None:
    from bench.workload import Shard, load, model_and_optimizer
    from smolcluster.train import cross_entropy, optimizer_step

    cfg = load(overrides)
    model, optimizer = model_and_optimizer(cfg)
    batches = Shard(cfg, rank, cfg.cluster.num_workers).batches(steps)
    params = list(model.parameters())
    sock = _connect(host, port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send_msg(sock, ("register", rank))
    recv_msg(sock)
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        cross_entropy(model(x), y).backward()
        send_msg(sock, ("all_reduce", step, rank, [p.grad for p in params]))
        (kind, s, avg), _ = recv_msg(sock)
        for p, g in zip(params, avg):
            p.grad = g
        optimizer_step(optimizer, cfg.training, step, steps)
    sock.close()


def run(group: Group, overrides: list[str], workers: int, steps: int, timeout_s: float,
        link: LinkSpec | None = None, hosts: Hosts = LOOPBACK) -> dict:
    """Server on host 0 + `workers` workers on hosts 1..N (behind a `bench.proxy` link if given);
    returns the server's seconds per step and bytes per step."""
    from smolcluster.runner import free_port

    out = group.logs / "pickle-times.json"
    port = free_port()
    sets = ["--host", hosts.address(0), "--steps", str(steps), *set_flags(overrides)]
    group.spawn("pickle-server", [*hosts.prefix(0), *python("-m", "bench.pickle_ps", "server", "--out", str(out),
                                                            "--port", str(port), *sets)])
    worker_port = proxy.start(group, port, link) if link is not None else port
    names = ["pickle-server"]
    for rank in range(1, workers + 1):
        names.append(f"pickle-worker{rank}")
        group.spawn(names[-1], [*hosts.prefix(rank), *python(
            "-m", "bench.pickle_ps", "worker", "--rank", str(rank), "--port", str(worker_port), *sets)])
    group.wait(names, timeout_s)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pickle_ps")
    p.add_argument("role", choices=["server", "worker"])
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1", help="the server's address")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", type=Path)
    p.add_argument("--set", action="append", default=[], dest="overrides")
    a = p.parse_args()
    from bench.workload import load
    from smolcluster.runner import watch_parent

    watch_parent()
    if a.role == "server":
        serve(a.host, a.port, a.steps, a.out, load(a.overrides).cluster.num_workers)
    else:
        work(a.rank, a.host, a.port, a.steps, a.overrides)


if __name__ == "__main__":
    main()
