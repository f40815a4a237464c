"""The torch backend's door: where the ranks meet, who may come in, and the process group.

torch.distributed meets at a TCPStore, a key-value server that rank 0 (worker 1) holds at
host_ip:port, and then talks through gloo or NCCL on ports of their own. Neither authenticates
anyone: a process that reaches those ports can read and write the store and disrupt the job.
So this module

- binds the store itself to exactly the configured address (torch's own store would listen on
  every interface), and refuses any address that is not loopback unless
  `cluster.torch_trust_network` says the network is trusted; on loopback, gloo is kept on the
  loopback interface too;
- before the process group exists, runs our handshake through the store: rank 0 posts a nonce,
  every other rank answers with an HMAC of it under the cluster token plus its fingerprint (config,
  model layout, data identity), and rank 0 answers each with its own proof and a verdict. A rank
  of another cluster, another token, or another job is refused, naming the difference, before it
  can take part in a collective. What it cannot do: stop a hostile machine that reaches the store
  from disrupting the job (it can write keys, or connect to gloo's ports). That is the
  `torch_trust_network` opt-in, and why the `ps` backend is the one for untrusted networks.

Values in the store are JSON text, never pickles.
Under torchrun, the rank and world size come from its environment and the store is its agent's.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from loguru import logger

from smolcluster import auth
from smolcluster.config import ClusterConfig, diff_fingerprints
from smolcluster.errors import ClusterError, ConfigError, WorkerError

PREFIX = "smolcluster/"
MAX_VALUE = 1 << 20
"""The largest store value we read (a fingerprint is a few KiB)."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits: its rank, the world, and who holds the store."""

    rank: int
    world: int
    local_rank: int
    address: str
    port: int
    torchrun: bool
    """Started by torchrun: the store is its agent's (or rank 0's, at MASTER_ADDR:MASTER_PORT)."""


def from_torchrun(environ: dict[str, str] | os._Environ[str] = os.environ) -> Launch | None:
    """The launch torchrun describes in the environment, or None when it did not start us."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", "0"))
        port = int(environ.get("MASTER_PORT", "29500"))
    except ValueError as e:
        raise ConfigError(f"RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT: expected integers ({e})") from None
    return Launch(rank, world, local, environ.get("MASTER_ADDR", "127.0.0.1"), port, torchrun=True)


def plan(c: ClusterConfig, worker_id: int | None, host: str | None) -> Launch:
    """This process's place: from torchrun's environment, else `--id` and the cluster config."""
    env = from_torchrun()
    if env is not None:
        if env.world != c.num_workers:
            raise ConfigError(f"cluster.num_workers is {c.num_workers} but torchrun started {env.world} "
                              f"processes (WORLD_SIZE); make them agree")
        if worker_id is not None and worker_id != env.rank + 1:
            raise ConfigError(f"--id {worker_id} but torchrun made this rank {env.rank} (worker {env.rank + 1}); "
                              "leave --id out under torchrun")
        return env
    if worker_id is None:
        raise ConfigError("--id: which worker this is (1..num_workers); only torchrun's environment can leave it out")
    if not 1 <= worker_id <= c.num_workers:
        raise ConfigError(f"--id {worker_id}: expected 1..{c.num_workers} (cluster num_workers)")
    address = c.bind_address() if worker_id == 1 else c.server_address(host)
    return Launch(worker_id - 1, c.num_workers, worker_id - 1, address, c.port, torchrun=False)


def check_network(c: ClusterConfig, launch: Launch) -> None:
    """Refuse to listen beyond loopback unless the network is trusted; on loopback, keep gloo there."""
    if auth.is_loopback(launch.address):
        if "GLOO_SOCKET_IFNAME" not in os.environ:
            loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
            if loopback:
                os.environ["GLOO_SOCKET_IFNAME"] = loopback
        return
    if not c.torch_trust_network:
        raise ConfigError(
            f"cluster.torch_trust_network: the torch backend would listen on {launch.address}, which other "
            "machines can reach, and torch.distributed authenticates no one (any machine that reaches its "
            "ports can disrupt the job). Set cluster.torch_trust_network: true on a network you trust, "
            "or use cluster.backend: ps (token and TLS) on one you do not")
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        logger.info("gloo picks this machine's network interface from its host name; if the ranks cannot reach "
                    "each other, set GLOO_SOCKET_IFNAME (en0, eth0, ...) on every machine")


def open_store(c: ClusterConfig, launch: Launch) -> Any:
    """The rendezvous store: held by rank 0 on a socket bound to exactly its address, or joined."""
    from torch.distributed import PrefixStore, TCPStore

    wait = datetime.timedelta(seconds=c.connect_timeout)
    if launch.torchrun and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = TCPStore(launch.address, launch.port, launch.world, False, wait)
        # A restarted group meets in the same agent store: its keys must not see the last attempt's.
        return PrefixStore(f"{PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    if launch.rank == 0:
        sock = socket.socket(socket.AF_INET6 if ":" in launch.address else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((launch.address, launch.port))
        except OSError as e:
            sock.close()
            raise WorkerError(f"cannot hold the rendezvous at {launch.address}:{launch.port} ({e.strerror or e}); "
                              "is another run on that port? (cluster.port)") from None
        sock.listen(128)
        # The store serves on this socket from now on, and closes it: Python lets go of it.
        store = TCPStore(launch.address, launch.port, launch.world, True, wait, wait_for_workers=False,
                         master_listen_fd=sock.detach())
        logger.info(f"holding the rendezvous at {launch.address}:{launch.port} for {launch.world} ranks")
        return PrefixStore(PREFIX, store)
    deadline = time.monotonic() + c.connect_timeout
    while True:
        try:
            store = TCPStore(launch.address, launch.port, launch.world, False, datetime.timedelta(seconds=10))
            return PrefixStore(PREFIX, store)
        except (RuntimeError, OSError) as e:  # rank 0 is not up yet: as a ps worker dials its server
            if time.monotonic() > deadline:
                raise WorkerError(f"no rendezvous at {launch.address}:{launch.port} after {c.connect_timeout:.0f} s "
                                  f"(cluster.connect_timeout): is worker 1 running? ({str(e)[:200]})") from None
            time.sleep(0.5)


def _get(store: Any, key: str, timeout: float, waiting_for: str) -> dict[str, Any]:
    """A JSON value, waiting for it to appear."""
    try:
        store.wait([key], datetime.timedelta(seconds=timeout))
        raw = store.get(key)
    except (RuntimeError, OSError) as e:
        raise ClusterError(f"gave up waiting for {waiting_for} after {timeout:.0f} s ({str(e)[:200]})") from None
    if len(raw) > MAX_VALUE:
        raise ClusterError(f"{waiting_for}: {len(raw)} bytes in the store, more than {MAX_VALUE}")
    try:
        value = json.loads(raw)
    except ValueError:
        raise ClusterError(f"{waiting_for}: not JSON in the store (another program on this port?)") from None
    if not isinstance(value, dict):
        raise ClusterError(f"{waiting_for}: expected a JSON object in the store")
    return value


def _put(store: Any, key: str, value: dict[str, Any]) -> None:
    store.set(key, json.dumps(value))


def admit(store: Any, c: ClusterConfig, launch: Launch, token: bytes | None, fingerprint: dict[str, Any],
          hello: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The handshake, through the store. Rank 0 checks every other rank (token proof and
    fingerprint) and returns what they said of themselves by rank; the others get rank 0's `run`
    (its W&B group and the step it starts at). A refusal is an error on both sides, naming why."""
    if launch.rank == 0:
        lead_nonce = auth.nonce()
        _put(store, "lead", {"nonce": lead_nonce, "run": run})
        ranks: dict[int, dict[str, Any]] = {0: hello}
        refused: list[str] = []
        for r in range(1, launch.world):
            theirs = _get(store, f"hello/{r}", c.join_timeout, f"worker {r + 1} (rank {r}) to join (cluster.join_timeout)")
            reason = _check(theirs, r, token, lead_nonce, fingerprint)
            answer: dict[str, Any] = {"ok": reason is None, "reason": reason or ""}
            if token is not None and isinstance(theirs.get("nonce"), str):
                answer["proof"] = auth.proof(token, "torch-lead", lead_nonce, theirs["nonce"], r + 1)
            _put(store, f"verdict/{r}", answer)
            if reason:
                refused.append(f"worker {r + 1} (rank {r}): {reason}")
            else:
                ranks[r] = theirs
                logger.info(f"worker {r + 1} (rank {r}) joined from {theirs.get('host', '?')} ({theirs.get('device', '?')})")
        _acknowledged(store, launch.world)
        if refused:
            raise ClusterError("refused " + "; ".join(refused))
        return {"ranks": ranks, **run}
    lead = _get(store, "lead", c.connect_timeout, "worker 1 (rank 0) to open the rendezvous")
    lead_nonce = lead.get("nonce")
    if not isinstance(lead_nonce, str):
        raise ClusterError("the rendezvous has no nonce: not a smolcluster rank 0 on that port?")
    mine = auth.nonce()
    proof = auth.proof(token, "torch-rank", lead_nonce, mine, launch.rank + 1) if token is not None else None
    _put(store, f"hello/{launch.rank}", {**hello, "nonce": mine, "proof": proof, "fingerprint": fingerprint})
    verdict = _get(store, f"verdict/{launch.rank}", c.join_timeout, "worker 1's verdict on this rank")
    store.set(f"seen/{launch.rank}", "1")
    if not verdict.get("ok"):
        raise ClusterError(f"worker 1 (rank 0) refused this rank: {str(verdict.get('reason', '?'))[:500]}")
    if token is not None and not auth.verify(token, verdict.get("proof"), "torch-lead", lead_nonce, mine, launch.rank + 1):
        raise ClusterError("worker 1 (rank 0) could not prove it holds the cluster token: another cluster on this port?")
    run = lead.get("run")
    return run if isinstance(run, dict) else {}


def _acknowledged(store: Any, world: int, timeout_s: float = 10.0) -> None:
    """Wait (briefly) until every rank has read its verdict: the store lives in rank 0, and a refused
    rank must learn why before rank 0 exits and takes the store with it."""
    try:
        store.wait([f"seen/{r}" for r in range(1, world)], datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError):
        logger.warning(f"not every rank confirmed reading rank 0's verdict within {timeout_s:g} s")


def _check(theirs: dict[str, Any], rank: int, token: bytes | None, lead_nonce: str,
           fingerprint: dict[str, Any]) -> str | None:
    """Why rank `rank` may not join, or None."""
    if token is not None and not auth.verify(token, theirs.get("proof"), "torch-rank", lead_nonce,
                                             str(theirs.get("nonce", "")), rank + 1):
        return "no valid proof of the cluster token (a different or missing SMOLCLUSTER_TOKEN / cluster.token_file)"
    if token is None and theirs.get("proof"):
        return "it holds a cluster token and worker 1 has none: give every worker the same token"
    theirs_fp = theirs.get("fingerprint")
    diffs = diff_fingerprints(fingerprint, theirs_fp if isinstance(theirs_fp, dict) else {})
    if diffs:
        return "a different job: " + "; ".join(diffs[:5])
    return None


def init_group(store: Any, launch: Launch, backend: str, timeout_s: float) -> None:
    """The process group, on the store the handshake used (under a prefix of its own)."""
    import torch.distributed as dist
    from torch.distributed import PrefixStore

    dist.init_process_group(backend, store=PrefixStore("pg/", store), rank=launch.rank, world_size=launch.world,
                            timeout=datetime.timedelta(seconds=timeout_s))
