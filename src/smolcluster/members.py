"""The server's side of membership: who is connected, who joined, who delivers, who is gone.

`Membership` is the half of the `Server` that the hub calls (connections, frames, drops) plus the
joining of workers at step boundaries; server.py keeps the steps. Both halves share the state in
`Server.__init__`: `workers`, `avg`, `counters`, `step`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from loguru import logger

from smolcluster import handshake, wire
from smolcluster.checkpoint import encode_state
from smolcluster.balance import BALANCE_STEPS, plan
from smolcluster.drift import Digest, digest, parse_sketch, relative_drift, sketch_length
from smolcluster.errors import ClusterError
from smolcluster.hub import Peer
from smolcluster.results import Counters
from smolcluster.stats import parse_stats
from smolcluster.web import Board
from smolcluster.wire import DType, Header, MsgType, ProtocolError

if TYPE_CHECKING:
    from smolcluster.averaging import Averager
    from smolcluster.config import Config
    from smolcluster.flat import FlatModel
    from smolcluster.hub import Hub


class Membership:
    """Connections, handshakes and liveness (mixed into Server)."""

    cfg: Config
    hub: Hub
    avg: Averager
    flat: FlatModel
    workers: dict[int, Peer]
    counters: Counters
    step: int
    started: bool
    devices: dict[str, str]
    board: Board
    checksums: dict[int, Digest]

    def on_connect(self, peer: Peer) -> None:
        peer.nonce, offer = handshake.challenge(self.token)
        self.hub.send(peer, offer)

    def on_drop(self, peer: Peer, why: str) -> None:
        if peer.worker_id and self.workers.get(peer.worker_id) is peer:
            del self.workers[peer.worker_id]
            self.counters.dropped += self.started
            where = f"at step {self.step}" if self.started else "before training started"
            logger.warning(f"worker {peer.worker_id} dropped {where}: {why}; "
                           f"{len(self.workers)}/{self.cfg.cluster.num_workers} workers remain")
            self.board.worker(peer.worker_id, state="dropped")
            self.board.event("dropped", f"worker {peer.worker_id} dropped {where}: {why}", peer.worker_id)
        else:
            logger.warning(f"closed connection from {peer.addr}: {why}")

    def target(self, peer: Peer, header: Header) -> memoryview | None:
        """Where a frame's payload goes; decided from the header, before any payload byte is read."""
        if header.type in (MsgType.HELLO, MsgType.CHECKSUM, MsgType.STATS, MsgType.ERROR, MsgType.BYE,
                           MsgType.HEARTBEAT):
            return None
        if header.type != MsgType.GRAD or not peer.synced:
            raise ProtocolError(f"{peer.name}: a worker may not send {header.type.name} now")
        if header.step < self.resync_step or peer.resync_at >= 0:
            return wire.SKIP  # computed from parameters that were rolled back, or that drifted
        if header.step > self.step:
            raise ProtocolError(f"{peer.name}: gradient for step {header.step} while the server is at step {self.step}")
        if not 0 < header.count <= self.max_count:
            raise ProtocolError(f"{peer.name}: gradient over {header.count} samples (at most {self.max_count})")
        return self.avg.target(peer.inbox, header, peer.name)

    def on_frame(self, peer: Peer, header: Header, payload: memoryview) -> None:
        if header.type == MsgType.HELLO:
            self._on_hello(peer, wire.decode_json(payload, header, peer.addr))
        elif not peer.worker_id:
            raise ProtocolError(f"{peer.addr}: {header.type.name} before HELLO")
        elif header.type == MsgType.GRAD:
            self._on_grad(peer, header)
        elif header.type == MsgType.CHECKSUM:
            self._on_checksum(peer, header, wire.decode_json(payload, header, peer.name))
        elif header.type == MsgType.STATS:
            self._on_stats(peer, wire.decode_json(payload, header, peer.name))
        elif header.type == MsgType.BYE:
            self.hub.drop(peer, "said goodbye")
        elif header.type == MsgType.ERROR:
            msg = wire.decode_json(payload, header, peer.name).get("error", "?")
            self.hub.drop(peer, f"reported an error: {msg}")

    def _refuse(self, peer: Peer, claimed: object, reason: str) -> None:
        self.counters.refused += 1
        self.board.event("refused", f"refused {peer.addr} claiming worker {claimed!r}: {reason}")
        logger.error(f"refused {peer.addr} claiming worker {claimed!r}: {reason}")
        self.hub.close_after(peer, wire.frame(MsgType.REJECT, {"reason": reason}), "refused")

    def _on_hello(self, peer: Peer, hello: dict[str, Any]) -> None:
        if peer.worker_id:
            raise ProtocolError(f"{peer.name}: second HELLO")
        n = self.cfg.cluster.num_workers
        ok = handshake.check_hello(hello, num_workers=n, token=self.token, server_nonce=peer.nonce,
                                   taken={k: p.addr for k, p in self.workers.items()}, fingerprint=self.fingerprint)
        if isinstance(ok, str):
            return self._refuse(peer, hello.get("worker_id"), ok)
        wid = peer.worker_id = ok.worker_id
        peer.inbox = self.avg.inbox()
        self.workers[wid] = peer
        self._progressed(wid)
        if self.started:
            self.counters.rejoined += 1
        self.devices[str(wid)] = ok.device
        state = "rejoined" if self.started else "joined"
        self.board.worker(wid, host=ok.host, addr=peer.addr, device=ok.device, state=state, last_seen=round(time.time(), 3))
        self.board.event(state, f"worker {wid} {state} from {peer.addr} ({ok.host}, {ok.device})", wid)
        logger.info(f"worker {wid} {'rejoined' if self.started else 'joined'} from {peer.addr} "
                    f"({ok.host}, {ok.device}); {len(self.workers)}/{n} workers")
        self.hub.send(peer, handshake.welcome(ok, self.token, peer.nonce, total_steps=self.total_steps,
                                              steps_per_epoch=self.steps_per_epoch, wandb_group=self.wandb_group,
                                              plan=self.plans.get(wid)))

    def _on_grad(self, peer: Peer, header: Header) -> None:
        self._progressed(peer.worker_id)  # late or not, it is working
        if header.step < self.resync_step or peer.resync_at >= 0:
            return
        result, inbox = self.avg.receive(peer.inbox, header), peer.inbox
        if result == "late":
            if inbox.late_step != header.step:  # once per worker and step, not per bucket
                inbox.late_step = header.step
                self.counters.late += 1
                self.step_late += 1
                logger.warning(f"step {self.step}: dropped late gradient of step {header.step} from worker {peer.worker_id}")
                self.board.event("late", f"step {self.step}: late gradient of step {header.step} from worker "
                                         f"{peer.worker_id}", peer.worker_id)
                self.board.late(peer.worker_id)
            return
        if self.first_arrival is None:
            self.first_arrival = time.monotonic()

    def _progressed(self, wid: int) -> None:
        self.progress[wid], self.progress_at[wid] = self.step, time.monotonic()

    def _drop_stalled(self, live: list[Peer]) -> None:
        """Liveness is progress: a worker whose heartbeats go on but whose gradients stopped coming
        (a hung compute thread) is dropped once `worker_timeout` passed while the others went on."""
        c, now = self.cfg.cluster, time.monotonic()
        for peer in live:
            wid = peer.worker_id
            idle = now - self.progress_at.get(wid, now)
            behind = self.step - self.progress.get(wid, self.step)
            if idle > c.worker_timeout and behind >= 2:
                self.hub.drop(peer, f"delivered no gradient for {idle:.0f} s while the others went on "
                                    f"{behind - 1} steps (worker_timeout={c.worker_timeout:g})")

    def _on_stats(self, peer: Peer, body: dict[str, Any]) -> None:
        """What a worker says of itself (stats.py): its speed (training.balance, used at the next
        step boundary) and, about once a second, its step's parts and its bytes (the dashboard)."""
        stats = parse_stats(body, peer.name)
        if stats.s_per_sample is not None:
            self.speeds[peer.worker_id] = stats.s_per_sample
        row = stats.row()
        if row:
            self.board.worker(peer.worker_id, **row)

    def _balance(self) -> None:
        """training.balance: once every worker measured itself (or long enough after the first
        did), size each one's work to its speed from the next step on (balance.py)."""
        c, t = self.cfg.cluster, self.cfg.training
        if not t.balance or self.plans or not self.speeds:
            return
        live = [p for p in self.workers.values() if p.synced]
        if any(p.worker_id not in self.speeds for p in live) and self.step - self.start_step < 3 * BALANCE_STEPS:
            return
        sizes = plan(self.speeds, c.num_workers, t.batch_size, t.local_steps, t.algorithm == "sync")
        for k, (b, h) in sizes.items():
            self.plans[k] = {"step": self.step + 1, "batch": b, "local_steps": h}
        self.max_count = max(self.max_count, *(b * h for b, h in sizes.values()))
        for peer in live:
            self.hub.send(peer, wire.frame(MsgType.PLAN, self.plans[peer.worker_id], step=self.step + 1))
        sync = t.algorithm == "sync"
        parts = [f"worker {k} ({f'{self.speeds[k] * 1e3:.3g} ms/sample' if k in self.speeds else 'unmeasured'}): "
                 f"{f'batch {b}' if sync else f'{h} local steps'}" for k, (b, h) in sorted(sizes.items())]
        logger.info(f"balance from step {self.step + 1}: " + "; ".join(parts))

    def _on_checksum(self, peer: Peer, header: Header, body: dict[str, Any]) -> None:
        """A worker's replica after step `header.step`, against ours: equal; drifted but within
        `cluster.drift_tolerance` (it trains on); or further, or on the last step: resynced."""
        theirs, ours = body.get("crc"), self.checksums.get(header.step)
        sketch = parse_sketch(body, sketch_length(self.flat.nbuf), peer.name)
        if body.get("resynced"):
            if peer.resync_at != header.step + 1:
                return  # the acknowledgement of a rollback's resync (`_resync_all`), or of an older one
            peer.resync_at = -1  # its gradients count again
        elif peer.resync_at >= 0:
            return  # of parameters it is being resynced from
        if ours is None and header.step < self.resync_step:
            return  # of parameters the server rolled back
        if ours is None:
            logger.warning(f"{peer.name} sent a checksum for step {header.step}, which the server has none of")
            return
        last = header.step == self.total_steps - 1
        if theirs == ours.crc:
            if last:
                self.final_acks.add(peer.worker_id)
            return
        self.counters.replica_mismatches += 1
        tolerance = self.cfg.cluster.drift_tolerance
        drift = relative_drift(ours, sketch)
        what = (f"worker {peer.worker_id}'s parameters differ from the server's after step {header.step} "
                f"by {drift:.2g} of their norm (cluster.drift_tolerance={tolerance:g})")
        if body.get("resynced"):
            self.hub.drop(peer, f"{what} right after a resync: the parameters it was sent did not arrive intact")
            return
        if drift <= tolerance and not last:
            logger.info(f"{what}: within the tolerance, it trains on")
            return
        peer.drift = what + ("" if drift > tolerance else " on the last step")

    # --- training -----------------------------------------------------------------------------

    def _missing(self, have: set[int] | None = None) -> list[int]:
        have = set(self.workers) if have is None else have
        return [k for k in range(1, self.cfg.cluster.num_workers + 1) if k not in have]

    def _wait_for_workers(self) -> None:
        c = self.cfg.cluster
        deadline = time.monotonic() + c.join_timeout
        last_note = time.monotonic()
        while len(self.workers) < c.num_workers:
            now = time.monotonic()
            if now > deadline:
                raise ClusterError(f"only {len(self.workers)}/{c.num_workers} workers joined within "
                                   f"{c.join_timeout:.0f} s; missing {self._missing()}")
            if now - last_note >= 10.0:
                logger.info(f"waiting for workers {self._missing()} ({len(self.workers)}/{c.num_workers} joined)")
                last_note = now
            self.hub.pump(min(1.0, deadline - now))

    def _sync_newcomers(self) -> None:
        """At a step boundary, hand every new worker the current parameters and optimizer state."""
        fresh = [p for p in self.workers.values() if not p.synced]
        if not fresh:
            return
        self._send_replica(fresh, self.step)
        for peer in fresh:
            peer.synced = True
            if self.started:
                logger.info(f"worker {peer.worker_id} is back in lockstep from step {self.step}")

    def _send_replica(self, peers: list[Peer], step: int) -> None:
        """PARAMS and STATE (the server's replica as it is now) to `peers`, to train on from `step`."""
        self.flat.pull()
        params = bytes(self.flat.param_bytes)  # a snapshot: the live buffer changes next step
        state = encode_state(self.optimizer, self.flat.buffers)
        for peer in peers:
            self.hub.send(peer, [
                *wire.frame(MsgType.PARAMS, params, step=step, dtype=DType.F32),
                *wire.frame(MsgType.STATE, state, step=step, dtype=DType.RAW),
            ])
            self._progressed(peer.worker_id)

    def _digest(self) -> Digest:
        return digest(self.flat, self.cfg.cluster.seed)

    def _resync_drifted(self, step: int) -> None:
        """At a step boundary, resync the workers marked to be (`Peer.drift`) to the server's replica.

        Such a worker may have sent gradients for `step` from its own parameters already: they and
        anything else it sends before it acknowledges the resync are dropped (`target`), and it
        computes the step again from the parameters it was sent."""
        due = [p for p in self.workers.values() if p.drift and p.synced]
        if not due:
            return
        if step - 1 not in self.checksums:
            self.checksums[step - 1] = self._digest()
        self._send_replica(due, step)
        for peer in due:
            periodic = peer.drift.startswith("periodic")
            if periodic:
                self.counters.periodic_resyncs += 1
            else:
                self.counters.drift_resyncs += 1
            (logger.info if periodic else logger.warning)(
                f"resyncing worker {peer.worker_id} to the server's parameters at step {step}: {peer.drift}")
            peer.drift, peer.resync_at = "", step

