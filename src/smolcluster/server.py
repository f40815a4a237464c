"""The parameter server: waits for N workers, then averages their gradients step by step.

One thread and one `selectors` loop serve every connection, so a slow or dead peer can never
block the others: reads land in per-worker preallocated buffers, writes are queued and drained as
sockets accept them. The server keeps its own replica and applies every average with the same
optimizer, so it always holds the authoritative parameters (evaluated, checkpointed, saved).

A step, seen from here:

    workers --GRAD(step, count)--> per-worker buffers --weighted mean--> avg --AVG(step)--> every worker
                                                                          \\--> optimizer.step() here
"""

from __future__ import annotations

import dataclasses
import json
import selectors
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from smolcluster import data, wire
from smolcluster.config import Config, diff_fingerprints
from smolcluster.flat import FlatModel
from smolcluster.models import build_model, layout
from smolcluster.progress import Progress
from smolcluster.results import save_model, write_summary
from smolcluster.tracking import group_name, start_tracker
from smolcluster.train import build_optimizer, evaluate, learning_rate, optimizer_step, set_threads
from smolcluster.wire import DType, Header, MsgType, ProtocolError

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new connection has to say HELLO before it is closed."""


class ClusterError(RuntimeError):
    """Training cannot go on (too few workers, nobody joined); the message says who and when."""


@dataclass(eq=False)
class Peer:
    """One connection, and once it said HELLO, one worker."""

    sock: socket.socket
    addr: str
    reader: wire.FrameReader = field(init=False)
    writer: wire.FrameWriter = field(init=False)
    worker_id: int = 0
    grad: torch.Tensor | None = None
    grad_view: memoryview | None = None
    grad_step: int = -1
    count: int = 0
    since: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"worker {self.worker_id} ({self.addr})" if self.worker_id else self.addr


@dataclass
class StepStats:
    """What happened in one step, for logs, the summary and W&B."""

    present: int = 0
    late: int = 0
    wait_s: float = 0.0


def step_ms_stats(times: list[float], skip: int = 5) -> dict[str, float]:
    """Median/min/max step time in ms, leaving out the first `skip` (warm-up) steps."""
    kept = sorted(times[skip:] if len(times) > 2 * skip else times)
    if not kept:
        return {}
    return {"median": round(1e3 * kept[len(kept) // 2], 3), "min": round(1e3 * kept[0], 3),
            "max": round(1e3 * kept[-1], 3), "steps": len(kept)}


class Server:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        c, t = cfg.cluster, cfg.training
        set_threads(t.threads)
        self.model = build_model(cfg.model, c.seed)
        self.flat = FlatModel(self.model)
        self.optimizer = build_optimizer(self.model, t)
        self.test = data.load_split(cfg.dataset, "test", c.seed)
        n_train = data.split_size(cfg.dataset, "train")
        self.steps_per_epoch = data.steps_per_epoch(n_train, c.num_workers, t.batch_size)
        total = self.steps_per_epoch * t.num_epochs
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        self.fingerprint = {**cfg.fingerprint(), "layout": layout(self.model)}
        self.step = 0
        self.started = False
        self.peers: list[Peer] = []
        self.workers: dict[int, Peer] = {}
        self.checksums: dict[int, int] = {}
        self.checksum_acks: set[int] = set()
        self.replica_mismatches = 0
        self.late_total = 0
        self.evals: list[dict[str, float]] = []
        self.stats = StepStats()
        self.step_times: list[float] = []
        self.wandb_group = group_name(cfg)  # told to every worker, so all runs land in one W&B group
        self.sel = selectors.DefaultSelector()
        self.listener = self._listen()

    # --- connections ----------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        host, port = self.cfg.cluster.bind_address(), self.cfg.cluster.port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ClusterError(
                f"cannot listen on {host}:{port}: {e.strerror} (another server running? "
                "pick another port with --set cluster.port=N)"
            ) from None
        sock.listen(64)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, None)
        self.port = sock.getsockname()[1]
        logger.info(f"listening on {host}:{self.port} for {self.cfg.cluster.num_workers} workers")
        return sock

    def _accept(self) -> None:
        try:
            sock, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = Peer(sock, f"{addr[0]}:{addr[1]}")
        peer.reader = wire.FrameReader(sock, peer.addr, lambda h, p=peer: self._target(p, h))
        peer.writer = wire.FrameWriter(sock)
        self.peers.append(peer)
        self.sel.register(sock, selectors.EVENT_READ, peer)
        logger.debug(f"connection from {peer.addr}")

    def _send(self, peer: Peer, buffers: list[Any]) -> None:
        peer.writer.push(buffers)
        self._flush(peer)

    def _flush(self, peer: Peer) -> None:
        try:
            peer.writer.write()
        except OSError as e:
            self._drop(peer, f"send failed: {e}")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.writer.pending else 0)
        self.sel.modify(peer.sock, events, peer)

    def _drop(self, peer: Peer, why: str) -> None:
        if peer not in self.peers:
            return
        self.peers.remove(peer)
        self.sel.unregister(peer.sock)
        peer.sock.close()
        if peer.worker_id and self.workers.get(peer.worker_id) is peer:
            del self.workers[peer.worker_id]
            where = f"at step {self.step}" if self.started else "before training started"
            logger.warning(
                f"worker {peer.worker_id} dropped {where}: {why}; "
                f"{len(self.workers)}/{self.cfg.cluster.num_workers} workers remain"
            )
        else:
            logger.warning(f"closed connection from {peer.addr}: {why}")

    def _pump(self, timeout: float) -> None:
        """Serve every socket for at most `timeout` seconds (returns after the first batch of events)."""
        for key, events in self.sel.select(max(timeout, 0.0)):
            if key.data is None:
                self._accept()
                continue
            peer: Peer = key.data
            try:
                if events & selectors.EVENT_READ:
                    for header, payload in peer.reader.read():
                        self._on_frame(peer, header, payload)
                        if peer not in self.peers:
                            break
                if peer in self.peers and events & selectors.EVENT_WRITE:
                    self._flush(peer)
            except wire.ConnectionClosed:
                self._drop(peer, "connection closed")
            except ProtocolError as e:
                logger.error(f"protocol error from {peer.name}: {e}")
                self._send_error(peer, str(e))
                self._drop(peer, "protocol error")
            except OSError as e:
                self._drop(peer, f"socket error: {e}")
        now = time.monotonic()
        for peer in [p for p in self.peers if not p.worker_id and now - p.since > HANDSHAKE_TIMEOUT]:
            self._drop(peer, f"said no HELLO within {HANDSHAKE_TIMEOUT:.0f} s")

    def _send_error(self, peer: Peer, message: str) -> None:
        try:
            peer.sock.setblocking(True)
            peer.sock.settimeout(1.0)
            wire.send_frame(peer.sock, wire.frame(MsgType.ERROR, {"error": message}))
        except OSError:
            pass

    # --- frames -----------------------------------------------------------------------------

    def _target(self, peer: Peer, header: Header) -> memoryview | None:
        """Where a frame's payload goes; decided from the header, before any payload byte is read."""
        if header.type in wire.JSON_TYPES:
            if header.type not in (MsgType.HELLO, MsgType.CHECKSUM, MsgType.ERROR):
                raise ProtocolError(f"{peer.name}: a worker may not send {header.type.name}")
            return None
        if header.type in wire.EMPTY_TYPES:
            return None
        if header.type != MsgType.GRAD or not peer.worker_id:
            raise ProtocolError(f"{peer.name}: unexpected {header.type.name} frame")
        if header.dtype != DType.F32 or header.offset != 0:
            raise ProtocolError(f"{peer.name}: GRAD must be whole float32, got {header.dtype.name} at {header.offset}")
        if header.step > self.step or not self.started:
            raise ProtocolError(f"{peer.name}: gradient for step {header.step} while the server is at step {self.step}")
        if peer.grad_step == self.step:
            raise ProtocolError(f"{peer.name}: second gradient for step {self.step} (this one says {header.step})")
        if not 0 < header.count <= self.cfg.training.batch_size:
            raise ProtocolError(f"{peer.name}: gradient over {header.count} samples (batch_size {self.cfg.training.batch_size})")
        return peer.grad_view if header.step == self.step else wire.SKIP

    def _on_frame(self, peer: Peer, header: Header, payload: memoryview) -> None:
        if header.type == MsgType.HELLO:
            self._on_hello(peer, wire.decode_json(payload, header, peer.addr))
        elif not peer.worker_id:
            raise ProtocolError(f"{peer.addr}: {header.type.name} before HELLO")
        elif header.type == MsgType.GRAD:
            if header.step == self.step:
                peer.grad_step, peer.count = header.step, header.count
            else:
                self.late_total += 1
                self.stats.late += 1
                logger.warning(f"step {self.step}: dropped late gradient of step {header.step} from worker {peer.worker_id}")
        elif header.type == MsgType.CHECKSUM:
            self._on_checksum(peer, header, wire.decode_json(payload, header, peer.name))
        elif header.type == MsgType.BYE:
            self._drop(peer, "said goodbye")
        elif header.type == MsgType.ERROR:
            msg = wire.decode_json(payload, header, peer.name).get("error", "?")
            self._drop(peer, f"reported an error: {msg}")

    def _on_hello(self, peer: Peer, hello: dict[str, Any]) -> None:
        if peer.worker_id:
            raise ProtocolError(f"{peer.name}: second HELLO")
        wid, n = hello.get("worker_id"), self.cfg.cluster.num_workers
        reason = None
        if not isinstance(wid, int) or not 1 <= wid <= n:
            reason = f"worker id {wid!r} is not in 1..{n} (num_workers={n})"
        elif wid in self.workers:
            reason = f"worker id {wid} is already connected from {self.workers[wid].addr}"
        elif self.started:
            reason = f"training already started (step {self.step}); rejoining is not supported yet"
        else:
            diffs = diff_fingerprints(self.fingerprint, hello.get("fingerprint") or {})
            if diffs:
                reason = "config differs from the server's: " + "; ".join(diffs[:5])
        if reason:
            logger.error(f"refused {peer.addr} claiming worker {wid!r}: {reason}")
            self._send(peer, wire.frame(MsgType.REJECT, {"reason": reason}))
            return
        peer.worker_id = wid
        buf = bytearray(len(self.flat.grad_bytes))
        peer.grad, peer.grad_view = torch.frombuffer(buf, dtype=torch.float32), memoryview(buf)
        self.workers[wid] = peer
        host = hello.get("host", "?")
        logger.info(f"worker {wid} joined from {peer.addr} ({host}); {len(self.workers)}/{n} workers")
        self._send(peer, wire.frame(MsgType.WELCOME, {
            "worker_id": wid, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            "wandb_group": self.wandb_group,
        }))

    def _on_checksum(self, peer: Peer, header: Header, body: dict[str, Any]) -> None:
        theirs, ours = body.get("crc"), self.checksums.get(header.step)
        if ours is None:
            logger.warning(f"{peer.name} sent a checksum for step {header.step}, which the server has none of")
            return
        if header.step == self.total_steps - 1:
            self.checksum_acks.add(peer.worker_id)
        if theirs != ours:
            self.replica_mismatches += 1
            logger.error(
                f"worker {peer.worker_id}'s parameters differ from the server's after step {header.step} "
                f"(crc {theirs} != {ours}): its replica has drifted"
            )

    # --- training ---------------------------------------------------------------------------

    def _wait_for_workers(self) -> None:
        c = self.cfg.cluster
        deadline = time.monotonic() + c.join_timeout
        last_note = time.monotonic()
        while len(self.workers) < c.num_workers:
            now = time.monotonic()
            if now > deadline:
                raise ClusterError(
                    f"only {len(self.workers)}/{c.num_workers} workers joined within "
                    f"{c.join_timeout:.0f} s; missing {self._missing()}"
                )
            if now - last_note >= 10.0:
                logger.info(f"waiting for workers {self._missing()} ({len(self.workers)}/{c.num_workers} joined)")
                last_note = now
            self._pump(min(1.0, deadline - now))

    def _missing(self, have: set[int] | None = None) -> list[int]:
        have = set(self.workers) if have is None else have
        return [k for k in range(1, self.cfg.cluster.num_workers + 1) if k not in have]

    def _collect(self) -> list[Peer]:
        """Gradients of the current step: from every live worker, or after the deadline from a quorum."""
        c = self.cfg.cluster
        start = time.monotonic()
        first: float | None = None
        while True:
            arrived = [p for p in self.workers.values() if p.grad_step == self.step]
            now = time.monotonic()
            if arrived and first is None:
                first = now
            if arrived and len(arrived) == len(self.workers) and len(arrived) >= c.quorum:
                return arrived
            if first is not None and now - first >= c.step_timeout and len(arrived) >= c.quorum:
                missing = self._missing({p.worker_id for p in arrived})
                logger.warning(
                    f"step {self.step}: waited {now - first:.1f} s, still missing workers {missing}; "
                    f"continuing with {len(arrived)}/{c.num_workers} (min_workers={c.quorum})"
                )
                return arrived
            if now - start >= c.worker_timeout:
                raise ClusterError(
                    f"step {self.step}: only {len(arrived)} gradients (from workers "
                    f"{sorted(p.worker_id for p in arrived)}) after {c.worker_timeout:.0f} s, "
                    f"{len(self.workers)} workers connected; min_workers={c.quorum}"
                )
            wait = c.worker_timeout - (now - start)
            if first is not None:
                wait = min(wait, c.step_timeout - (now - first))
            self._pump(wait)

    def _average(self, arrived: list[Peer]) -> None:
        """avg = sum(count_k * grad_k) / sum(count_k), in place into the server's gradient buffer."""
        for peer in self.workers.values():
            peer.writer.own()  # a lagging worker keeps its own copy of the previous average
        arrived = sorted(arrived, key=lambda p: p.worker_id)  # fixed order: same bits every run
        total = sum(p.count for p in arrived)
        avg = self.flat.wire
        torch.mul(arrived[0].grad, arrived[0].count, out=avg)
        for p in arrived[1:]:
            avg.add_(p.grad, alpha=p.count)
        avg.div_(total)

    def _broadcast_average(self) -> int:
        """Queue the average to every connected worker (late ones too); returns the bytes queued."""
        frames = wire.frame(MsgType.AVG, memoryview(self.flat.grad_bytes), step=self.step, dtype=DType.F32)
        peers = list(self.workers.values())
        for peer in peers:
            self._send(peer, frames)
        return len(peers) * (wire.HEADER_SIZE + len(self.flat.grad_bytes))

    def _evaluate(self, epoch: float) -> dict[str, float]:
        loss, acc = evaluate(self.model, self.test)
        result = {"step": self.step + 1, "epoch": round(epoch, 3), "test_loss": loss, "test_accuracy": acc}
        self.evals.append(result)
        logger.info(f"step {self.step + 1}/{self.total_steps}: test loss {loss:.4f}, test accuracy {acc:.2f}%")
        return result

    def run(self) -> dict[str, Any]:
        """Train to the end; returns the summary (also written to out_dir/summary.json)."""
        c, t = self.cfg.cluster, self.cfg.training
        t_start = time.monotonic()
        self.tracker = start_tracker(self.cfg, "server", self.wandb_group)
        try:
            self._wait_for_workers()
            logger.info(
                f"all {c.num_workers} workers joined; training {self.cfg.model.type} for "
                f"{self.total_steps} steps ({self.steps_per_epoch} per epoch)"
            )
            self.started = True
            params = wire.frame(MsgType.PARAMS, memoryview(self.flat.param_bytes), step=0, dtype=DType.F32)
            for peer in list(self.workers.values()):
                self._send(peer, params)
            t_train = time.monotonic()
            bar = Progress(self.total_steps, "server")
            for self.step in range(self.total_steps):
                metrics = self._train_step()
                bar.update(1, loss=f"{self.flat.loss:.4f}", workers=metrics["workers/present"])
            bar.close()
            train_s = time.monotonic() - t_train
            self._await_final_checksums()
            final = self._evaluate(self.total_steps / self.steps_per_epoch)
            summary = self._summary(final, time.monotonic() - t_start, train_s)
            self._save(summary)
            logger.info(f"test accuracy {final['test_accuracy']:.2f}% after {self.total_steps} steps; saved {t.out_dir}/model.safetensors")
            for peer in list(self.workers.values()):
                self._send(peer, wire.frame(MsgType.DONE, {"test_accuracy": final["test_accuracy"]}))
            self._drain()
            self.tracker.finish(summary)
            return summary
        except ClusterError as e:
            for peer in list(self.peers):
                self._send_error(peer, str(e))
            self.tracker.finish()
            raise
        finally:
            self.close()

    def _train_step(self) -> dict[str, Any]:
        """One step: collect, average, broadcast, apply; returns its metrics (also sent to the tracker)."""
        c, t = self.cfg.cluster, self.cfg.training
        self.stats = StepStats()
        t0 = time.monotonic()
        arrived = self._collect()
        t1 = time.monotonic()
        self._average(arrived)
        sent = self._broadcast_average()
        t2 = time.monotonic()
        optimizer_step(self.optimizer, t, self.step, self.total_steps)
        last = self.step == self.total_steps - 1
        if last or (c.checksum_steps and (self.step + 1) % c.checksum_steps == 0):
            self.checksums[self.step] = self.flat.checksum()
        t3 = time.monotonic()
        self.step_times.append(t3 - t0)
        metrics: dict[str, Any] = {
            "train/loss": self.flat.loss,
            "train/lr": learning_rate(t, self.step, self.total_steps),
            "train/epoch": (self.step + 1) / self.steps_per_epoch,
            "time/step_s": t3 - t0, "time/wait_s": t1 - t0, "time/communicate_s": t2 - t1,
            "time/compute_s": t3 - t2,
            "net/bytes_in": len(arrived) * (len(self.flat.grad_bytes) + wire.HEADER_SIZE),
            "net/bytes_out": sent,
            "workers/present": len(arrived), "workers/connected": len(self.workers),
            "workers/late_gradients": self.stats.late,
        }
        if t.track_gradients:
            metrics.update({f"grad_norm/{k}": v for k, v in self.flat.layer_grad_norms().items()})
        if not last and t.eval_steps and (self.step + 1) % t.eval_steps == 0:
            result = self._evaluate((self.step + 1) / self.steps_per_epoch)
            metrics.update({"test/loss": result["test_loss"], "test/accuracy": result["test_accuracy"]})
        self.tracker.log(metrics, self.step)
        return metrics

    def _save(self, summary: dict[str, Any]) -> None:
        out = Path(self.cfg.training.out_dir)
        save_model(self.model, self.cfg.model, out / "model.safetensors", {
            "smolcluster.dataset": json.dumps(dataclasses.asdict(self.cfg.dataset)),
            "smolcluster.seed": str(self.cfg.cluster.seed),
        })
        write_summary(summary, out / "summary.json")

    def _await_final_checksums(self) -> None:
        deadline = time.monotonic() + self.cfg.cluster.worker_timeout
        while set(self.workers) - self.checksum_acks and time.monotonic() < deadline:
            self._pump(deadline - time.monotonic())
        missing = sorted(set(self.workers) - self.checksum_acks)
        if missing:
            logger.warning(f"workers {missing} sent no final checksum; their replicas are unverified")

    def _drain(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while any(p.writer.pending for p in self.peers) and time.monotonic() < deadline:
            self._pump(deadline - time.monotonic())

    def _summary(self, final: dict[str, float], wall_s: float, train_s: float) -> dict[str, Any]:
        t = self.cfg.training
        samples = self.total_steps * t.batch_size * self.cfg.cluster.num_workers
        return {
            "test_accuracy": final["test_accuracy"],
            "test_loss": final["test_loss"],
            "steps": self.total_steps,
            "epochs": self.total_steps / self.steps_per_epoch,
            "workers": self.cfg.cluster.num_workers,
            "wall_s": round(wall_s, 3),
            "train_s": round(train_s, 3),
            "samples_per_s": round(samples / max(train_s, 1e-9), 1),
            "step_ms": step_ms_stats(self.step_times),
            "late_gradients": self.late_total,
            "replica_mismatches": self.replica_mismatches,
            "replicas_verified": sorted(self.checksum_acks),
            "evals": self.evals,
            "checksum": self.flat.checksum(),
            "config": self.cfg.to_dict(),
        }

    def close(self) -> None:
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
