"""A worker: computes gradients on its own shard, sends them, applies the average it gets back.

Blocking I/O on purpose: a worker has exactly one peer and strictly alternates send/receive, so
the plain loop below *is* the protocol. Every wait is bounded by a cluster timeout.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from smolcluster import data, wire
from smolcluster.config import Config, ConfigError
from smolcluster.faults import Fault
from smolcluster.flat import FlatModel
from smolcluster.models import build_model, layout
from smolcluster.progress import Progress
from smolcluster.results import save_model
from smolcluster.tracking import NullTracker, Tracker, start_tracker
from smolcluster.train import build_optimizer, loss_fn, optimizer_step, set_threads
from smolcluster.wire import DType, Header, MsgType, ProtocolError


class WorkerError(RuntimeError):
    """The worker cannot go on: unreachable, refused, or the server failed; the message says why."""


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """Dial the server, retrying with backoff (0.1 s doubling to 2 s) until `timeout_s` seconds pass."""
    deadline = time.monotonic() + timeout_s
    delay, told = 0.1, False
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=min(5.0, timeout_s))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            if time.monotonic() + delay > deadline:
                hint = " (macOS Local Network privacy? see README troubleshooting)" if e.errno == 65 else ""
                raise WorkerError(
                    f"could not reach the server at {host}:{port} within {timeout_s:.0f} s: {e}{hint}; "
                    "is it running, and is the port open in the firewall?"
                ) from None
            if not told:
                logger.info(f"waiting for the server at {host}:{port} ({e.strerror or e}); retrying")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class Worker:
    def __init__(
        self, cfg: Config, worker_id: int, host: str | None = None, faults: list[Fault] | None = None,
        save_params: Path | None = None,
    ) -> None:
        c, t = cfg.cluster, cfg.training
        if not 1 <= worker_id <= c.num_workers:
            raise ConfigError(f"--id {worker_id}: expected 1..{c.num_workers} (cluster num_workers)")
        self.cfg, self.id = cfg, worker_id
        self.faults = {f.step: f for f in faults or []}
        self.save_params = save_params
        set_threads(t.threads)
        self.model = build_model(cfg.model, c.seed)
        self.flat = FlatModel(self.model)
        self.optimizer = build_optimizer(self.model, t)
        n_train = data.split_size(cfg.dataset, "train")
        self.shard = data.partition(n_train, c.num_workers, c.seed)[worker_id - 1]
        self.train = data.load_split(cfg.dataset, "train", c.seed, indices=self.shard)
        self.steps_per_epoch = data.steps_per_epoch(n_train, c.num_workers, t.batch_size)
        self.address = (c.server_address(host), c.port)
        self.peer = f"server {self.address[0]}:{self.address[1]}"
        self.sock: socket.socket | None = None

    # --- I/O ------------------------------------------------------------------------------------

    def _send(self, mtype: MsgType, payload: Any = b"", **fields: Any) -> None:
        assert self.sock is not None
        try:
            wire.send_frame(self.sock, wire.frame(mtype, payload, worker=self.id, **fields))
        except OSError as e:
            raise WorkerError(f"lost the connection to the {self.peer} while sending {mtype.name}: {e}") from None

    def _target(self, header: Header, step: int) -> memoryview:
        if header.type == MsgType.AVG and header.step == step and header.dtype == DType.F32:
            return memoryview(self.flat.grad_bytes)
        if header.type == MsgType.PARAMS and header.dtype == DType.F32:
            return memoryview(self.flat.param_bytes)
        raise ProtocolError(f"{self.peer}: unexpected {header.type.name} for step {header.step} (at step {step})")

    def _read(self, step: int, timeout: float) -> tuple[Header, dict[str, Any]]:
        """The next frame; ERROR and REJECT become WorkerError. Tensor payloads land in place."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            header, payload = wire.read_frame(self.sock, self.peer, lambda h: self._target(h, step))
        except socket.timeout:
            raise WorkerError(f"no word from the {self.peer} for {timeout:.0f} s at step {step}") from None
        except (wire.ConnectionClosed, OSError) as e:
            raise WorkerError(f"lost the connection to the {self.peer} at step {step}: {e}") from None
        if header.dtype != DType.NONE:
            return header, {}
        body = wire.decode_json(payload, header, self.peer) if header.length else {}
        if header.type == MsgType.ERROR:
            raise WorkerError(f"the server failed: {body.get('error', '?')}")
        if header.type == MsgType.REJECT:
            raise WorkerError(f"the server refused worker {self.id}: {body.get('reason', '?')}")
        return header, body

    def _expect(self, mtype: MsgType, step: int, timeout: float) -> tuple[Header, dict[str, Any]]:
        while True:
            header, body = self._read(step, timeout)
            if header.type == mtype:
                return header, body
            if header.type != MsgType.HEARTBEAT:
                raise WorkerError(f"expected {mtype.name} from the {self.peer} at step {step}, got {header.type.name}")

    # --- training -------------------------------------------------------------------------------

    def _handshake(self) -> dict[str, Any]:
        hello = {
            "worker_id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "fingerprint": {**self.cfg.fingerprint(), "layout": layout(self.model)},
        }
        self._send(MsgType.HELLO, hello)
        _, welcome = self._expect(MsgType.WELCOME, 0, self.cfg.cluster.worker_timeout)
        logger.info(
            f"joined the {self.peer} as worker {self.id}: shard of {len(self.train)} samples, "
            f"{welcome['total_steps']} steps; waiting for the others"
        )
        return welcome

    def _inject(self, step: int) -> None:
        fault = self.faults.get(step)
        if fault is None:
            return
        logger.warning(f"step {step}: injecting fault {fault.kind}{f' {fault.arg:g}' if fault.arg else ''}")
        assert self.sock is not None
        if fault.kind == "sleep":
            time.sleep(fault.arg)
        elif fault.kind == "exit":
            self._send(MsgType.BYE, step=step)
            self.sock.close()
            sys.exit(0)
        elif fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.kind == "disconnect":
            frames = wire.frame(MsgType.GRAD, memoryview(self.flat.grad_bytes), step=step, worker=self.id,
                                count=1, dtype=DType.F32)
            wire.send_frame(self.sock, [frames[0], frames[1][: len(frames[1]) // 2]])
            self.sock.close()
            sys.exit(3)
        elif fault.kind == "garbage":
            self.sock.sendall(random.Random(step).randbytes(256))
        elif fault.kind == "nan":
            self.flat.grads[0] = float("nan")

    def run(self) -> dict[str, Any]:
        """Train until the server says DONE; returns its final metrics."""
        c = self.cfg.cluster
        self.sock = connect(*self.address, c.connect_timeout)
        self.tracker: Tracker = NullTracker()
        try:
            welcome = self._handshake()
            # After the handshake: the server names the W&B group this worker's run belongs to.
            self.tracker = start_tracker(self.cfg, f"worker-{self.id}", welcome.get("wandb_group"))
            header, _ = self._expect(MsgType.PARAMS, 0, c.join_timeout + c.worker_timeout)
            logger.info(f"received the initial parameters; training from step {header.step}")
            self._train(header.step, welcome["total_steps"])
            _, done = self._expect(MsgType.DONE, welcome["total_steps"], c.worker_timeout)
            logger.info(f"training done; the server reports test accuracy {done.get('test_accuracy', 0):.2f}%")
            if self.save_params:
                save_model(self.model, self.cfg.model, self.save_params)
            self.tracker.finish(done)
            return done
        except BaseException:
            self.tracker.finish()
            raise
        finally:
            self.sock.close()

    def _train(self, start: int, total: int) -> None:
        c, t = self.cfg.cluster, self.cfg.training
        bar = Progress(total, f"worker {self.id}", initial=start)
        epoch, batches = -1, []
        for step in range(start, total):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                batches = list(data.epoch_order(len(self.train), c.seed, epoch, self.id).split(t.batch_size))
            idx = batches[step % self.steps_per_epoch]
            t0 = time.monotonic()
            self.flat.zero_grad()
            loss = loss_fn(self.model(self.train.x[idx]), self.train.y[idx])
            loss.backward()
            self.flat.loss = loss.item()
            self._inject(step)
            t1 = time.monotonic()
            self._send(MsgType.GRAD, memoryview(self.flat.grad_bytes), step=step, count=len(idx), dtype=DType.F32)
            self._expect(MsgType.AVG, step, c.worker_timeout)
            t2 = time.monotonic()
            optimizer_step(self.optimizer, t, step, total)
            if step == total - 1 or (c.checksum_steps and (step + 1) % c.checksum_steps == 0):
                self._send(MsgType.CHECKSUM, {"crc": self.flat.checksum()}, step=step)
            t3 = time.monotonic()
            self.tracker.log({
                "worker/loss": loss.item(), "worker/global_loss": self.flat.loss,
                "time/compute_s": (t1 - t0) + (t3 - t2), "time/communicate_s": t2 - t1, "time/step_s": t3 - t0,
            }, step)
            bar.update(1, loss=f"{self.flat.loss:.4f}")
        bar.close()
