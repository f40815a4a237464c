"""smolcluster itself: a real `smolcluster server` and N `smolcluster worker` processes, as users run them.

The server's own summary.json is the measurement (`step_ms`, `samples_per_s`). For a slow link,
a `bench.proxy` sits between the workers and the server: the server listens on one port, the
proxy on another, and the workers are pointed at the proxy with `--set cluster.port=PROXYPORT`.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from bench import proxy
from bench.netns import LOOPBACK, Hosts
from bench.procs import BenchError, Group, child_env, python, set_flags
from bench.proxy import LinkSpec
from smolcluster.auth import TOKEN_ENV
from smolcluster.wire import HEADER_SIZE, TRAILER_SIZE



def frame_bytes(params: int, elem_bytes: float) -> int:
    """One GRAD or AVG frame: the 36-byte header + every parameter + the loss slot, `elem_bytes` each,
    + the 8-byte checksum trailer."""
    return HEADER_SIZE + round((params + 1) * elem_bytes) + TRAILER_SIZE


def run(group: Group, overrides: list[str], workers: int, timeout_s: float,
        link: LinkSpec | None = None, hosts: Hosts = LOOPBACK, server_set: tuple[str, ...] = (),
        worker_set: tuple[str, ...] = ()) -> dict[str, Any]:
    """One cluster run to `training.max_steps` (server on host 0, worker k on host k); returns the
    server's summary.json. With `link`, the workers reach the server through a `bench.proxy`.
    `server_set` / `worker_set`: overrides for the server or the workers alone, keys outside the
    config's fingerprint (`training.device=cuda`, say)."""
    names, out = start(group, overrides, workers, link, hosts, server_set, worker_set)
    group.wait(names, timeout_s)
    summary = out / "summary.json"
    if not summary.exists():
        raise BenchError(f"the server wrote no {summary}:\n{group.tail('smol-server')}")
    return json.loads(summary.read_text())


def start(group: Group, overrides: list[str], workers: int, link: LinkSpec | None = None,
          hosts: Hosts = LOOPBACK, server_set: tuple[str, ...] = (),
          worker_set: tuple[str, ...] = ()) -> tuple[list[str], Path]:
    """`run` without the waiting: starts the processes; returns their names and the server's out_dir
    (for a caller that watches out_dir/evals.jsonl and stops the group itself)."""
    from smolcluster.runner import free_port

    out = group.logs / "smolcluster-out"
    server_ip, port = hosts.address(0), free_port()
    common = [*overrides, f"training.out_dir={out}", f"cluster.host_ip={server_ip}"]
    # A cluster token, as a user would set: a server bound to a non-loopback address (netns) needs one.
    env = child_env(**{TOKEN_ENV: secrets.token_hex(16)})
    group.spawn("smol-server", [*hosts.prefix(0), *python("-m", "smolcluster", "server", *set_flags(
        [*common, *server_set, f"cluster.bind={server_ip}", f"cluster.port={port}"]))], env=env)
    worker_port = proxy.start(group, port, link) if link is not None else port
    names = ["smol-server"]
    for k in range(1, workers + 1):
        names.append(f"smol-worker{k}")
        group.spawn(names[-1], [*hosts.prefix(k), *python("-m", "smolcluster", "worker", "--id", str(k), *set_flags(
            [*common, *worker_set, f"cluster.port={worker_port}"]))], env=env)
    return names, Path(out)


def run_torch(group: Group, overrides: list[str], workers: int, timeout_s: float) -> dict[str, Any]:
    """smolcluster on its torch backend (cluster.backend=torch): N `smolcluster worker` ranks on
    loopback and no server; rank 0 (worker 1) writes summary.json, whose step_ms it timed itself,
    as DDP's rank 0 times the baseline's."""
    from smolcluster.runner import free_port

    out = group.logs / "smolcluster-torch-out"
    common = [*overrides, f"training.out_dir={out}", "cluster.host_ip=127.0.0.1", "cluster.backend=torch",
              f"cluster.port={free_port()}"]
    env = child_env(**{TOKEN_ENV: secrets.token_hex(16)})
    names = [f"torch-rank{k - 1}" for k in range(1, workers + 1)]
    for k, name in enumerate(names, 1):
        group.spawn(name, python("-m", "smolcluster", "worker", "--id", str(k), *set_flags(common)), env=env)
    group.wait(names, timeout_s)
    summary = out / "summary.json"
    if not summary.exists():
        raise BenchError(f"rank 0 wrote no {summary}:\n{group.tail('torch-rank0')}")
    return json.loads(summary.read_text())
