"""A worker: computes gradients on its own shard, sends them, applies the average it gets back.

The step loop is `_step`: forward, send the gradient bucket by bucket as backward produces it,
wait for the averages, apply them with the same optimizer as every other replica. Its one
connection to the server is a `Link` (link.py); joining is `handshake.join`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger

from smolcluster import auth, data, handshake, wire
from smolcluster.checkpoint import decode_state
from smolcluster.config import Config
from smolcluster.devices import batch_to, describe
from smolcluster.drift import digest
from smolcluster.errors import CheckpointError, ConfigError, ServerLost, WorkerError
from smolcluster.exchange import GradExchange
from smolcluster.faults import Fault, inject, perturb
from smolcluster.link import Link
from smolcluster.local import LocalSteps
from smolcluster.progress import Progress
from smolcluster.replica import usable_replica
from smolcluster.balance import BALANCE_STEPS, MAX_SCALE
from smolcluster.shard import Shard
from smolcluster.stats import StepClock, split
from smolcluster.results import headline, save_model
from smolcluster.tracking import NullTracker, Tracker, start_tracker
from smolcluster.train import apply_average, make_loss
from smolcluster.wire import DType, Header, MsgType, ProtocolError

if TYPE_CHECKING:
    from smolcluster.api import Job


class Resynced(Exception):
    """The server rolled its replica back and sent it to us: training goes on from `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(f"resynced to step {step}")
        self.step = step


class Worker:
    def __init__(
        self, cfg: Config, worker_id: int, host: str | None = None, faults: list[Fault] | None = None,
        save_params: Path | None = None, job: Job | None = None,
    ) -> None:
        c, t = cfg.cluster, cfg.training
        if not 1 <= worker_id <= c.num_workers:
            raise ConfigError(f"--id {worker_id}: expected 1..{c.num_workers} (cluster num_workers)")
        self.cfg, self.id = cfg, worker_id
        self.token = auth.load_token(c.token_file)
        self.faults = {f.step: f for f in faults or [] if f.kind not in ("perturb", "slow")}
        self.perturb = {f.step: f.arg for f in faults or [] if f.kind == "perturb"}
        """Steps after which this replica's parameters are nudged by a relative amount (a fault)."""
        self.save_params = save_params
        self.shard = Shard(cfg, worker_id, job.data if job else None)
        self.meta, self.train, self.schedule = self.shard.meta, self.shard.train, self.shard.schedule
        self._timings: list[float] = []
        """Compute seconds per sample of the first steps, for training.balance."""
        self._stats_sent = False
        self.clock = StepClock()
        """Each step's compute, wait and communicate seconds, reported about once a second (STATS)."""
        self._bytes = (0, 0)
        """Bytes sent and received through the connections before the current one."""
        self.loss = job.loss if job and job.loss else make_loss(t)
        self.replica = usable_replica(cfg, job.model if job else None, self.meta, data.sample(self.train), self.loss)
        self.device = self.replica.device
        logger.info(f"worker {worker_id} computes on {describe(self.device)}")
        self.model, self.flat, self.optimizer = self.replica.model, self.replica.flat, self.replica.optimizer
        self.buckets = self.replica.buckets
        self.rounds = LocalSteps(self.flat, t) if t.algorithm != "sync" else None
        """The local modes' inner optimizer and round state (None: sync)."""
        self.address = (c.server_address(host), c.port)
        self.peer = f"server {self.address[0]}:{self.address[1]}"
        self.state_limit = self.replica.state_limit
        self.exchange: GradExchange | None = None
        self.link: Link | None = None
        self._lost_at: float | None = None  # when the server went away, while we try to get it back
        self._training = False  # a PARAMS frame now is a resync after the server rolled back
        self.slow = {f.step: f.arg for f in faults or [] if f.kind == "slow"}
        """An injected fault: from that step on, compute takes this many seconds more per sample."""
        self._slow = 0.0

    # --- I/O ------------------------------------------------------------------------------------

    def _target(self, header: Header, step: int) -> memoryview:
        if header.type == MsgType.AVG and self.exchange is not None:
            return self.exchange.target(header)
        if header.type == MsgType.PARAMS and header.dtype == DType.F32:
            return memoryview(self.flat.param_bytes)
        if header.type == MsgType.STATE and header.length <= self.state_limit:
            return memoryview(bytearray(header.length))
        raise ProtocolError(f"{self.peer}: unexpected {header.type.name} of {header.length} bytes for "
                            f"step {header.step} (at step {step})")

    def _read(self, step: int, timeout: float) -> tuple[Header, memoryview]:
        """The next frame (tensor payloads land in place); a PARAMS frame mid-training is a resync."""
        assert self.link is not None
        while True:
            header, payload = self.link.read(step, timeout, lambda h: self._target(h, step))
            if header.type == MsgType.PARAMS and self._training:
                self._resync(header.step)
            if header.type != MsgType.PLAN:
                return header, payload
            self._apply_plan(header.step, wire.decode_json(payload, header, self.peer))

    def _resync(self, step: int) -> None:
        """The parameters already landed in place; take the optimizer state too, then start over at `step`."""
        _, state = self._expect(MsgType.STATE, step, self.cfg.cluster.worker_timeout)
        try:
            decode_state(self.optimizer, bytes(state), self.peer, self.flat.buffers)
        except CheckpointError as e:
            raise WorkerError(str(e)) from None
        self.flat.push()
        assert self.exchange is not None
        self.exchange.restart()  # every bucket of the abandoned step has left before the acknowledgement
        self.flat.count_steps(step)
        self._send_checksum(step - 1, resynced=True)  # from here on, our gradients count again
        logger.warning(f"the server resynced this replica to its parameters; training on from step {step}")
        raise Resynced(step)

    def _send_checksum(self, step: int, resynced: bool = False) -> None:
        """Our replica after `step`, for the server to compare with its own (drift.py)."""
        assert self.link is not None
        body = digest(self.flat, self.cfg.cluster.seed).to_json()
        self.link.send(MsgType.CHECKSUM, {**body, "resynced": True} if resynced else body, step=step)

    def _expect(self, mtype: MsgType, step: int, timeout: float) -> tuple[Header, memoryview]:
        while True:
            header, payload = self._read(step, timeout)
            if header.type == mtype:
                return header, payload
            if header.type != MsgType.HEARTBEAT:
                raise WorkerError(f"expected {mtype.name} from the {self.peer} at step {step}, got {header.type.name}")

    # --- training -------------------------------------------------------------------------------

    def _sync(self) -> int:
        """Receive the parameters and optimizer state to start from; returns the step they are at."""
        c = self.cfg.cluster
        header, _ = self._expect(MsgType.PARAMS, 0, c.join_timeout + c.worker_timeout)
        _, state = self._expect(MsgType.STATE, header.step, c.worker_timeout)
        try:
            decode_state(self.optimizer, bytes(state), self.peer, self.flat.buffers)
        except CheckpointError as e:
            raise WorkerError(str(e)) from None
        self.flat.push()
        self.flat.count_steps(header.step)
        return header.step

    def run(self) -> dict[str, Any]:
        """Train until the server says DONE; returns its final metrics."""
        self.tracker: Tracker = NullTracker()
        self._tracking = False
        try:
            done = self._session()
            while done is None:  # the server went away and cluster.reconnect is on
                assert self._lost_at is not None
                waited = time.monotonic() - self._lost_at
                if waited > self.cfg.cluster.connect_timeout:
                    raise WorkerError(f"the {self.peer} did not come back within {waited:.0f} s "
                                      "(cluster.connect_timeout)")
                time.sleep(0.2)
                done = self._session()
            if self.save_params:
                save_model(self.model, self.cfg.model, self.save_params, meta=self.meta)
            self.tracker.finish(done)
            return done
        except BaseException:
            self.tracker.finish()
            raise

    def _session(self) -> dict[str, Any] | None:
        """One connection's worth of training; None if it broke and we should reconnect."""
        c = self.cfg.cluster
        self.link, welcome = handshake.join(c, self.address, self.peer, self.id, self.token,
                                            self.replica.fingerprint, since=self._lost_at,
                                            device=describe(self.device))
        try:
            if not self._tracking:  # the server names the W&B group this worker's run belongs to
                self.tracker = start_tracker(self.cfg, f"worker-{self.id}", welcome.get("wandb_group"),
                                             device=describe(self.device))
                self._tracking = True
            total = welcome["total_steps"]
            plan = welcome.get("plan")
            if isinstance(plan, dict) and isinstance(plan.get("step"), int):  # we rejoin a balanced run
                self._apply_plan(plan["step"], plan)
                self._stats_sent = True
            logger.info(f"joined the {self.peer} as worker {self.id}: shard of {len(self.train)} samples, "
                        f"{total} steps; waiting for the parameters")
            self.link.start_heartbeats(c.heartbeat_s)
            # Local steps run backward many times a round: nothing to overlap, and no hooks wanted.
            overlap = c.overlap and self.rounds is None
            self.exchange = GradExchange(self.flat, self.buckets, c.compression, c.int8_chunk, overlap,
                                         self.id, self.link.send_frames, self.peer)
            start = self._sync()
            self._lost_at = None
            logger.info(f"received the parameters and optimizer state; training from step {start}")
            self._training = True
            self._train(start, total)
            while True:
                try:
                    header, payload = self._expect(MsgType.DONE, total, c.worker_timeout)
                    break
                except Resynced:  # resynced to the run's final parameters (acknowledged in _resync)
                    pass
            done = wire.decode_json(payload, header, self.peer)
            logger.info(f"training done; the server reports {headline(done)}")
            return done
        except ServerLost as e:
            if not c.reconnect:
                raise
            if self._lost_at is None:
                logger.warning(f"{e}; reconnecting (cluster.reconnect is on)")
                self._lost_at = time.monotonic()
            return None
        finally:
            self._training = False
            self._bytes = (self._bytes[0] + self.link.bytes_sent, self._bytes[1] + self.link.bytes_received)
            if self.exchange is not None:
                self.exchange.close()
                self.exchange = None
            self.link.close()

    def _train(self, start: int, total: int) -> None:
        bar = Progress(total, f"worker {self.id}", initial=start)
        step = start
        try:
            while step < total:
                try:
                    self._step(step, total)
                except Resynced as r:  # this step is abandoned; the server goes on at r.step
                    bar.update(r.step - step)
                    step = r.step
                    self.shard.close()
                    continue
                bar.update(1, loss=f"{self.flat.loss:.4f}")
                step += 1
        finally:
            self.shard.close()
        bar.close()

    def _forward(self, index: int) -> tuple[torch.Tensor, int]:
        """Forward on this worker's batch number `index` (of its own passes over its shard)."""
        x, y = self.shard.batch(index)
        if self._slow:
            time.sleep(self._slow * len(y))
        x, y = batch_to(x, self.device), batch_to(y, self.device)
        self.shard.seed_step(index)
        self.flat.zero_grad()
        return self.loss(self.model(x), y), len(y)

    def _round(self, r: int, total: int) -> tuple[float, int]:
        """The local modes: local_steps steps on our own, then the round's change is what we send.
        Returns our mean loss over the round and the samples it trained on."""
        assert self.rounds is not None
        t, h = self.cfg.training, self.schedule.local_steps(r)
        first = self.schedule.first_draw(r)
        self.rounds.begin()
        loss_sum, samples = 0.0, 0
        for j in range(h):
            loss, n = self._forward(first + j)
            if j == 0:
                loss = self._inject(r, loss)
            loss_sum += float(loss) * n
            samples += n
            # The learning-rate schedule runs over local steps; a worker with more of them (shares) spreads its own.
            self.rounds.step(loss, r * t.local_steps + (j * t.local_steps) // h, total * t.local_steps)
        self.rounds.end(r)
        self.flat.loss = loss_sum / samples
        return self.flat.loss, samples

    def _step(self, step: int, total: int) -> None:
        c, t = self.cfg.cluster, self.cfg.training
        assert self.exchange is not None
        if step in self.slow:
            self._slow = self.slow.pop(step)
            logger.warning(f"step {step}: injecting fault slow {self._slow:g}: {self._slow * 1e3:g} ms more per sample")
        t0 = time.monotonic()
        if self.rounds is None:
            loss, count = self._forward(step)
            self.flat.loss = loss.item()
            loss = self._inject(step, loss)
            own_loss = self.flat.loss
            self.exchange.begin(step, count)
            loss.backward()
        else:
            own_loss, count = self._round(step, total)
            self.exchange.begin(step, count)
        t_bw = time.monotonic()
        self.exchange.finish_backward()
        t1 = time.monotonic()
        assert self.link is not None
        received = self.link.received_s
        while True:
            header, _ = self._expect(MsgType.AVG, step, c.worker_timeout)
            if self.exchange.land(header):
                break
        t2 = time.monotonic()
        self.flat.land()  # the averages, to the GPU if the model is on one
        apply_average(self.optimizer, t, step, total)
        self.flat.count_steps(step + 1)
        if self.rounds is not None:
            self.rounds.adapt(self.flat.loss)
        if step in self.perturb:  # an injected fault: this replica drifts from the others
            perturb(self.flat, self.perturb.pop(step), c.seed + self.id)
        if step == total - 1 or (c.checksum_steps and (step + 1) % c.checksum_steps == 0):
            self._send_checksum(step)
        t3 = time.monotonic()
        compute, wait, comm = split(t0, t_bw, t1, t2, t3, self.link.received_s - received, self.exchange.sent_at)
        row = {"worker/loss": own_loss, "worker/global_loss": self.flat.loss, "time/compute_s": compute,
               "time/wait_s": wait, "time/communicate_s": comm, "time/step_s": t3 - t0}
        timing = self.clock.add(compute, wait, comm)
        if timing is not None:  # about once a second, for the dashboard
            self.link.send(MsgType.STATS, {"timing": timing, "bytes_sent": self._bytes[0] + self.link.bytes_sent,
                                           "bytes_received": self._bytes[1] + self.link.bytes_received}, step=step)
        if t.balance:
            self._measure(step, compute / count)
        if self.shard.val is not None and (step == total - 1 or (t.eval_steps and (step + 1) % t.eval_steps == 0)):
            row.update(self.shard.validate(self.model, self.loss, step))
        self.tracker.log(row, step)

    def _measure(self, step: int, per_sample: float) -> None:
        """training.balance: our compute seconds per sample over BALANCE_STEPS steps after the
        first (which warms up), sent to the server once; it answers with a PLAN (see `_read`)."""
        if self._stats_sent:
            return
        self._timings.append(per_sample)
        if len(self._timings) > BALANCE_STEPS:
            assert self.link is not None
            self.link.send(MsgType.STATS, {"s_per_sample": statistics.median(self._timings[1:])}, step=step)
            self._stats_sent = True

    def _apply_plan(self, step: int, plan: dict[str, Any]) -> None:
        """The server's sizing of our work (training.balance), from round `step` on."""
        batch, local = plan.get("batch"), plan.get("local_steps")
        t = self.cfg.training
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SCALE * n
                   for v, n in ((batch, t.batch_size), (local, t.local_steps))):
            raise ProtocolError(f"{self.peer}: PLAN with batch {batch!r} and local steps {local!r}")
        self.schedule.change(step, batch, local)  # type: ignore[arg-type]
        logger.info(f"balanced by the server from step {step} on: batch {batch}"
                    + (f", {local} local steps per round" if t.algorithm != "sync" else ""))

    def _inject(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Apply this step's injected fault, after forward and before anything of the step is sent."""
        fault = self.faults.pop(step, None)  # once: a rejoined worker does not repeat it
        if fault is None:
            return loss
        assert self.link is not None
        return inject(fault, step, loss, self.link, self.flat, self.buckets[-1])
