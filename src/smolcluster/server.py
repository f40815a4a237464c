"""The parameter server: waits for N workers, then averages their gradients step by step.

The server keeps its own replica and applies every average with the same optimizer, so it always
holds the authoritative parameters: it evaluates them, checkpoints them, saves them, and hands
them (with the optimizer state) to any worker that joins late or rejoins after a crash.

A step, seen from here:

    workers --GRAD(step, count)--> per-worker buffers --weighted mean--> avg --AVG(step)--> every worker
                                                                          \\--> optimizer.step() here
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from smolcluster import auth, data, handshake, wire
from smolcluster.admission import raise_fd_limit
from smolcluster.averaging import Averager
from smolcluster.config import Config
from smolcluster.devices import describe
from smolcluster.drift import Digest
from smolcluster.errors import ClusterError
from smolcluster.faults import Fault
from smolcluster.hub import Hub, Peer
from smolcluster.lead import Lead
from smolcluster.partition import layout
from smolcluster.web import Board, serve

if TYPE_CHECKING:
    from smolcluster.api import Job
from smolcluster.members import Membership
from smolcluster.progress import Progress
from smolcluster.results import Counters, headline
from smolcluster.rollback import Snapshot, replica_finite
from smolcluster.tracking import group_name, start_tracker
from smolcluster.replica import usable_replica
from smolcluster.train import apply_average, learning_rate, make_loss
from smolcluster.wire import MsgType


class Server(Membership, Lead):
    def __init__(self, cfg: Config, *, resume: bool = False, insecure: bool = False,
                 faults: list[Fault] | None = None, job: Job | None = None) -> None:
        self.cfg, self.job = cfg, job
        c, t = cfg.cluster, cfg.training
        self.token = auth.load_token(c.token_file)
        host = c.bind_address()
        if self.token is None and not auth.is_loopback(host):
            if not insecure:
                raise auth.AuthError(
                    f"refusing to listen on {host} without a cluster token: anyone who can reach the port "
                    f"could join. Set ${auth.TOKEN_ENV} (or cluster.token_file) on every machine, or pass "
                    "--insecure on a network you trust"
                )
            logger.warning(f"listening on {host} WITHOUT a cluster token (--insecure): anyone on the network can join")
        loaded = data.load_data(cfg.dataset, c.seed, job.data if job else None)
        self.meta, self.test = loaded.meta, data.eval_subset(loaded.test, t.eval_samples, c.seed)
        self.layout = layout(cfg, loaded.train, self.meta.task)
        del loaded  # the server trains on nothing: only the test set stays
        self.loss = job.loss if job and job.loss else make_loss(t)
        self.replica = usable_replica(cfg, job.model if job else None, self.meta, data.sample(self.test), self.loss)
        self.model, self.flat, self.optimizer = self.replica.model, self.replica.flat, self.replica.optimizer
        self.fingerprint = self.replica.fingerprint
        self.devices = {"server": describe(self.replica.device)}
        """What each process computes on (the server's, then each worker's from its HELLO)."""
        logger.info(f"the server computes on {self.devices['server']}")
        # A step of the server is a round in the local modes: local_steps optimizer steps per worker.
        self.per_round = per_round = 1 if t.algorithm == "sync" else t.local_steps
        self.steps_per_epoch = self.layout.steps_per_epoch / per_round
        total = self.layout.steps_per_epoch * t.num_epochs
        self.total_steps = math.ceil((min(total, t.max_steps) if t.max_steps else total) / per_round)
        self.max_count = max(b * h for b, h in zip(self.layout.batches, self.layout.local_steps))
        """The most samples a worker's contribution to one step may stand for."""
        self.avg = Averager(self.flat, self.replica.buckets, c.compression, c.int8_chunk, c.outlier_factor)
        self.snapshot = Snapshot(self.flat, self.optimizer)
        self.resync_step = -1
        """Gradients of steps before this one were computed from rolled-back parameters: dropped quietly."""
        self.progress: dict[int, int] = {}
        """Per worker: the last step it delivered a gradient for (or joined at)."""
        self.progress_at: dict[int, float] = {}
        self.first_arrival: float | None = None
        self.faults = {f.step: f for f in faults or []}
        self.step = 0
        self.healthy = True
        self.started = False
        self.workers: dict[int, Peer] = {}
        self.speeds: dict[int, float] = {}
        """training.balance: each worker's measured compute seconds per sample."""
        self.plans: dict[int, dict[str, int]] = {}
        """training.balance: each worker's batch and local steps, and the step they hold from."""
        self.start_step = 0
        self.checksums: dict[int, Digest] = {}
        """The server's replica after each checksummed step, to compare the workers' with."""
        self.final_acks: set[int] = set()
        self.counters = Counters()
        self.step_late = 0
        self.step_times: list[float] = []
        self.evals: list[dict[str, float]] = []
        self.t_train = time.monotonic()
        self.eval_s = 0.0
        self.bytes_moved = 0
        self.samples_done = 0
        """Gradient (or change) and average bytes through the server's port so far, frames whole."""
        """Seconds spent evaluating: left out of the evaluations' training time."""
        self.wandb_group = group_name(cfg)  # told to every worker, so all runs land in one W&B group
        Path(t.out_dir).mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        else:
            (Path(t.out_dir) / "evals.jsonl").unlink(missing_ok=True)
        fds = raise_fd_limit()  # before the hub: its caps on unauthenticated connections derive from it
        self.hub = Hub(host, c.port, self, heartbeat_s=c.heartbeat_s, silence_s=c.worker_timeout,
                       handshake_s=c.handshake_timeout, tls=handshake.server_tls(c), max_queue=self._queue_limit())
        self.port = self.hub.port
        self.board = Board({"algorithm": t.algorithm, "compression": c.compression, "model": cfg.model.type,
                            "total_steps": self.total_steps, "workers_expected": c.num_workers, "step": self.step})
        self.httpd = serve(self.board, c.http_bind, c.http_port) if c.http_port else None
        logger.info(f"open files: {fds}; connections waiting for a handshake: {self.hub.admission}")
        logger.info(f"listening on {host}:{self.port} for {c.num_workers} workers"
                    f"{' (TLS)' if c.tls_cert else ''}{' (token required)' if self.token else ''}")
        if c.host_ip is None:
            where = ", ".join(f"{a}:{self.port}" for a in c.reachable_at())
            logger.info(f"host_ip is null: workers can reach this server at {where} "
                        "(start each with --set cluster.host_ip=ADDRESS)")

    @property
    def _unit(self) -> str:
        t = self.cfg.training
        return "steps" if t.algorithm == "sync" else f"rounds of {t.local_steps} local steps"

    def _queue_limit(self) -> int:
        """Bytes of unread frames a worker may have queued before it is dropped (server memory bound)."""
        c = self.cfg.cluster
        if c.max_send_queue_mb:
            return int(c.max_send_queue_mb * 2**20)
        return max(16 << 20, 4 * sum(self.avg.nbytes))

    # --- connections (called by the hub) ----------------------------------------------------

    def _collect(self) -> list[Peer]:
        """Average the current step bucket by bucket as workers deliver, streaming each average back.

        Every bucket waits for every live worker; once `step_timeout` passed after the step's first
        gradient and at least min_workers delivered everything, the rest is averaged over what came.
        Returns the workers whose whole gradient counted.
        """
        c = self.cfg.cluster
        self.avg.begin(self.step)
        for peer in self.workers.values():
            peer.writer.own()  # a lagging worker keeps its own copy of the previous step's averages
        start, self.first_arrival = time.monotonic(), None
        while True:
            live = sorted((p for p in self.workers.values() if p.synced), key=lambda p: p.worker_id)
            self._drop_stalled(live)
            live = [p for p in live if p.worker_id in self.workers]
            if len(live) >= c.quorum:
                for b in self.avg.ready([p.inbox for p in live]):
                    self._reduce_and_send(b, live)
            complete = [p for p in live if p.inbox.complete(self.step)]
            if self.avg.done:
                return complete
            now = time.monotonic()
            first = self.first_arrival
            if first is not None and now - first >= c.step_timeout and len(complete) >= c.quorum:
                missing = self._missing({p.worker_id for p in complete})
                logger.warning(f"step {self.step}: waited {now - first:.1f} s, still missing workers {missing}; "
                               f"continuing with {len(complete)}/{c.num_workers} (min_workers={c.quorum})")
                for b, done in enumerate(self.avg.reduced):
                    if not done:
                        self._reduce_and_send(b, live)
                return complete
            if now - start >= c.worker_timeout and len(complete) < c.quorum:
                raise ClusterError(
                    f"step {self.step}: only {len(complete)} complete gradients (from workers "
                    f"{[p.worker_id for p in complete]}) after {c.worker_timeout:.0f} s with "
                    f"{len(self.workers)} workers connected; min_workers={c.quorum}")
            wait = min(c.worker_timeout - (now - start), c.heartbeat_s)
            if first is not None:
                wait = min(wait, c.step_timeout - (now - first))
            self.hub.pump(wait)

    def _reduce_and_send(self, b: int, live: list[Peer]) -> None:
        """Average bucket `b` and queue it to every synced worker (late ones too: replicas never diverge)."""
        t0 = time.monotonic()
        frames, rejected = self.avg.reduce(b, [p.inbox for p in live])
        for peer in [p for p in live if p.inbox in rejected]:
            self._count_rejection(peer, b)
        for peer in [p for p in self.workers.values() if p.synced]:
            self.hub.send(peer, frames)
            self.avg.bytes_out += sum(memoryview(f).nbytes for f in frames)
        self.comm_s += time.monotonic() - t0

    def _count_rejection(self, peer: Peer, b: int) -> None:
        """Log and count a rejected contribution once per worker and step, not per bucket."""
        inbox = peer.inbox
        if not inbox.finite[b] and inbox.bad_step != self.step:
            inbox.bad_step = self.step
            self.counters.nonfinite += 1
            logger.error(f"step {self.step}: rejected a non-finite (NaN/Inf) gradient from worker {peer.worker_id}")
            self.board.event("rejected", f"step {self.step}: non-finite gradient from worker {peer.worker_id}", peer.worker_id)
        elif inbox.outlier[b] and inbox.outlier_step != self.step:
            inbox.outlier_step = self.step
            self.counters.outliers += 1
            ratio = "beyond float32's range" if inbox.outlier[b] == float("inf") else f"{inbox.outlier[b]:.3g}x the limit"
            logger.error(f"step {self.step}: rejected an absurd gradient from worker {peer.worker_id} (bucket {b} norm "
                         f"{ratio}: cluster.outlier_factor={self.cfg.cluster.outlier_factor:g} times the usual norm)")
            self.board.event("rejected", f"step {self.step}: absurd gradient from worker {peer.worker_id}", peer.worker_id)

    def _check_replica(self) -> bool:
        """After the optimizer step: roll back to the last good snapshot if anything is not finite."""
        if replica_finite(self.flat, self.optimizer):
            if self.snapshot.due(self.step + 1):
                self.snapshot.take(self.step + 1)
            return True
        good = self.snapshot.restore()
        self.counters.rollbacks += 1
        self.checksums.pop(self.step, None)
        logger.error(f"step {self.step}: parameters or optimizer state are not finite after the update; rolled "
                     f"back to the state at the start of step {good} and resyncing every worker (the updates of "
                     f"steps {good}-{self.step + 1} are lost)")
        return False

    def _resync_all(self) -> None:
        """Step `self.step` is given up: every worker gets the rolled-back state to go on from the next.

        Workers are one step ahead of the server's rollback by now (they applied the bad average
        and sent gradients for this step from it); those gradients are dropped as stale."""
        self.resync_step = self.step + 1
        self.flat.count_steps(self.resync_step)
        self.checksums[self.resync_step - 1] = self._digest()  # what their acknowledgements must match
        self._send_replica([p for p in self.workers.values() if p.synced], self.resync_step)

    def _train_step(self) -> dict[str, Any]:
        """One step: collect, average, broadcast, apply; returns its metrics (also sent to the tracker)."""
        c, t = self.cfg.cluster, self.cfg.training
        self.step_late = 0
        self._sync_newcomers()
        if c.resync_steps and self.step % c.resync_steps == 0 and self.started:
            for peer in self.workers.values():
                if peer.synced and not peer.drift:
                    peer.drift = f"periodic resync (cluster.resync_steps={c.resync_steps})"
        self._resync_drifted(self.step)
        self._balance()
        self.started = True  # from the first step's collect on, a drop costs steps and a HELLO is a rejoin
        t0 = time.monotonic()
        self.comm_s = 0.0
        arrived = self._collect()
        t2 = time.monotonic()
        t1 = t2 - self.comm_s  # averaging and sending happen inside the wait, bucket by bucket
        self.bytes_moved += self.avg.bytes_in + self.avg.bytes_out
        self.samples_done += sum(p.inbox.count for p in arrived)
        if t.max_grad_norm:  # clipping rewrites the gradient buffer that queued AVG frames still point into
            for peer in self.workers.values():
                peer.writer.own()
        self.flat.land()  # the averages, to the GPU if the model is on one
        apply_average(self.optimizer, t, self.step, self.total_steps)
        self.flat.count_steps(self.step + 1)
        self.healthy = healthy = self._check_replica()
        last = self.step == self.total_steps - 1
        if healthy and (last or (c.checksum_steps and (self.step + 1) % c.checksum_steps == 0)):
            self.checksums[self.step] = self._digest()
        t3 = time.monotonic()
        self.step_times.append(t3 - t0)
        metrics: dict[str, Any] = {
            "train/loss": self.flat.loss,
            "train/lr": learning_rate(t, self.step * self.per_round, self.total_steps * self.per_round),
            "train/epoch": (self.step + 1) / self.steps_per_epoch,
            "time/step_s": t3 - t0, "time/wait_s": t1 - t0, "time/communicate_s": t2 - t1,
            "time/compute_s": t3 - t2,
            "net/bytes_in": self.avg.bytes_in,
            "net/bytes_out": self.avg.bytes_out,
            "workers/present": len(arrived), "workers/connected": len(self.workers),
            "workers/late_gradients": self.step_late,
            "workers/rejected_gradients": sum(1 for p in arrived if not all(p.inbox.finite) or any(p.inbox.outlier)),
            "train/rollbacks": self.counters.rollbacks,
        }
        if t.track_gradients:
            metrics.update({f"grad_norm/{k}": v for k, v in self.flat.layer_grad_norms().items()})
        if not last and t.eval_steps and (self.step + 1) % t.eval_steps == 0:
            result = self._evaluate()
            metrics.update({f"test/{k[5:]}": v for k, v in result.items() if k.startswith("test_")})
        if not last and c.checkpoint_steps and (self.step + 1) % c.checkpoint_steps == 0:
            self._checkpoint()
        self.tracker.log(metrics, self.step)
        self._post(metrics, arrived, t3 - t0)
        return metrics

    def _post(self, metrics: dict[str, Any], arrived: list[Peer], step_s: float) -> None:
        """The step, for the dashboard (web.py): a few assignments, no serialising here."""
        now = time.time()
        done = self.step + 1 - self.start_step
        rate = done / max(time.monotonic() - self.t_train, 1e-9)
        for peer in arrived:  # on time: a worker shown as late is back
            self.board.on_time(peer.worker_id, last_step=self.step, last_seen=round(now, 3))
        self.board.step({"step": self.step + 1, "epoch": round(metrics["train/epoch"], 4), "loss": self.flat.loss,
                         "steps_per_s": round(rate, 3), "eta_s": round((self.total_steps - self.step - 1) / max(rate, 1e-9), 1),
                         "workers_present": len(self.workers), "bytes": self.bytes_moved,
                         "samples": self.samples_done},
                        dataclasses.asdict(self.counters),
                        {"step": self.step + 1, "loss": self.flat.loss, "step_s": round(step_s, 6)})

    def _inject(self) -> None:
        fault = self.faults.get(self.step)
        if fault is not None and fault.kind == "kill":
            logger.warning(f"step {self.step}: injecting fault kill into the server")
            os.kill(os.getpid(), signal.SIGKILL)

    def run(self) -> dict[str, Any]:
        """Train to the end; returns the summary (also written to out_dir/summary.json)."""
        c = self.cfg.cluster
        t_start = time.monotonic()
        self.tracker = start_tracker(self.cfg, "server", self.wandb_group, device=self.devices["server"])
        try:
            self._wait_for_workers()
            logger.info(f"all {c.num_workers} workers joined; training {self.cfg.model.type} for "
                        f"{self.total_steps - self.step} {self._unit} ({self.steps_per_epoch:g} per epoch)")
            t_train = self.t_train = time.monotonic()
            start = self.start_step = self.step
            self.snapshot.take(start)
            bar = Progress(self.total_steps, "server", initial=start)
            resync = False
            for self.step in range(start, self.total_steps):
                if resync:  # this step's gradients were computed from the rolled-back parameters
                    self._resync_all()
                    resync = False
                    bar.update(1)
                    continue
                self._inject()
                metrics = self._train_step()
                resync = not self.healthy
                bar.update(1, loss=f"{self.flat.loss:.4f}", workers=metrics["workers/present"])
            bar.close()
            if resync:  # the last step was rolled back: hand the workers the state the run ends with
                self._resync_all()
            train_s = time.monotonic() - t_train
            self._await_final_checksums()
            final = self._evaluate()
            summary = self._summary(final, time.monotonic() - t_start, train_s, self.total_steps - start)
            self._save(summary)
            logger.info(f"{headline(final)} after {self.total_steps} steps; "
                        f"saved {self.cfg.training.out_dir}/model.safetensors")
            done = {k: v for k, v in final.items() if k.startswith("test_")}
            for peer in list(self.workers.values()):
                self.hub.send(peer, wire.frame(MsgType.DONE, done))
            self.hub.drain(10.0)
            self.tracker.finish(summary)
            if self.httpd is not None and c.http_linger_s:
                logger.info(f"the dashboard stays up for {c.http_linger_s:g} s (cluster.http_linger_s)")
                time.sleep(c.http_linger_s)
            return summary
        except ClusterError as e:
            for peer in list(self.hub.peers):
                self.hub.fail(peer, str(e))
            self.hub.drain(2.0)
            self.tracker.finish()
            raise
        finally:
            self.hub.close()
            if self.httpd is not None:
                self.httpd.shutdown()
                self.httpd.server_close()

    def _await_final_checksums(self) -> None:
        """Every worker's last checksum, equal to ours; one that differs is resynced and asked again."""
        deadline = time.monotonic() + self.cfg.cluster.worker_timeout
        while set(self.workers) - self.final_acks and time.monotonic() < deadline:
            self.hub.pump(min(deadline - time.monotonic(), self.cfg.cluster.heartbeat_s))
            self._resync_drifted(self.total_steps)
        missing = sorted(set(self.workers) - self.final_acks)
        if missing:
            logger.warning(f"workers {missing} sent no final checksum; their replicas are unverified")

    def _summary(self, final: dict[str, float], wall_s: float, train_s: float, steps_run: int) -> dict[str, Any]:
        t = self.cfg.training
        samples = steps_run * sum(b * h for b, h in zip(self.layout.batches, self.layout.local_steps))
        balance = {"balance": {"s_per_sample": {str(k): v for k, v in self.speeds.items()},
                               "plans": {str(k): v for k, v in self.plans.items()}}} if t.balance else {}
        return self._summary_of(final, wall_s, train_s, samples, connections_shed=self.hub.admission.shed_total,
                                **balance, replicas_verified=sorted(self.final_acks))
