"""A worker: computes gradients on its own shard, sends them, applies the average it gets back.

Blocking I/O on purpose: a worker has exactly one peer and strictly alternates send/receive, so
the plain loop below *is* the protocol. Every wait is bounded by a cluster timeout; a small
thread sends heartbeats while the main loop computes, so the server can tell slow from dead.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from smolcluster import auth, data, wire
from smolcluster.admission import BUSY
from smolcluster.buckets import make_buckets
from smolcluster.errors import HandshakeCut, ServerLost, WorkerError
from smolcluster.checkpoint import CheckpointError, decode_state
from smolcluster.exchange import GradExchange
from smolcluster.config import Config, ConfigError
from smolcluster.faults import Fault
from smolcluster.flat import FlatModel
from smolcluster.models import build_model, layout
from smolcluster.progress import Progress
from smolcluster.results import save_model
from smolcluster.tlsio import SharedTLS
from smolcluster.tracking import NullTracker, Tracker, start_tracker
from smolcluster.train import build_optimizer, loss_fn, optimizer_step, set_threads
from smolcluster.wire import DType, Header, MsgType, ProtocolError


class Resynced(Exception):
    """The server rolled its replica back and sent it to us: training goes on from `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(f"resynced to step {step}")
        self.step = step


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """Dial the server, retrying with backoff (0.1 s doubling to 2 s) until `timeout_s` seconds pass."""
    start = time.monotonic()
    deadline = start + timeout_s
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
            if not told and time.monotonic() - start > 3.0:  # quiet while the server starts up
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
        self.token = auth.load_token(c.token_file)
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
        self.state_limit = 4 * self.flat.nbytes + (1 << 20)
        self.buckets = make_buckets([p.numel() for p in self.model.parameters() if p.requires_grad],
                                    max(1, int(c.bucket_mb * 2**20) // 4))
        self.exchange: GradExchange | None = None
        self.sock: socket.socket | SharedTLS | None = None
        self._send_lock = threading.Lock()
        self._last_send = time.monotonic()
        self._lost_at: float | None = None  # when the server went away, while we try to get it back
        self._training = False  # a PARAMS frame now is a resync after the server rolled back

    # --- I/O ------------------------------------------------------------------------------------

    def _dial(self, timeout: float | None = None) -> socket.socket | SharedTLS:
        c = self.cfg.cluster
        sock = connect(*self.address, timeout or c.connect_timeout)
        if not c.tls_ca:
            return sock
        ctx = ssl.create_default_context(cafile=c.tls_ca)
        try:
            return SharedTLS(ctx.wrap_socket(sock, server_hostname=c.tls_server_name or self.address[0]))
        except (ssl.SSLError, OSError) as e:
            sock.close()
            # Closed or reset mid-handshake: a flooded server sheds it. A TLS error proper stays an error.
            cut = isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or not isinstance(e, ssl.SSLError)
            raise (HandshakeCut if cut else WorkerError)(f"TLS with the {self.peer} failed: {e}") from None

    def _send(self, mtype: MsgType, payload: Any = b"", **fields: Any) -> None:
        self._send_frames(wire.frame(mtype, payload, worker=self.id, **fields))

    def _send_frames(self, frames: list[bytes | memoryview]) -> None:
        """Send whole frames under the lock (the heartbeat and gradient threads share the socket)."""
        assert self.sock is not None
        try:
            with self._send_lock:
                wire.send_frame(self.sock, frames)
                self._last_send = time.monotonic()
        except OSError as e:
            raise ServerLost(f"lost the connection to the {self.peer} while sending: {e}") from None

    def _heartbeats(self, sock: socket.socket | SharedTLS, stop: threading.Event) -> None:
        period = self.cfg.cluster.heartbeat_s
        while not stop.wait(period / 2):
            if time.monotonic() - self._last_send < period:
                continue
            try:
                with self._send_lock:
                    wire.send_frame(sock, wire.frame(MsgType.HEARTBEAT, worker=self.id))
                    self._last_send = time.monotonic()
            except OSError:
                return

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
        """The next frame; ERROR and REJECT become WorkerError. Tensor payloads land in place."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            header, payload = wire.read_frame(self.sock, self.peer, lambda h: self._target(h, step))
        except socket.timeout:
            raise ServerLost(f"no word from the {self.peer} for {timeout:.0f} s at step {step}") from None
        except (wire.ConnectionClosed, OSError) as e:
            raise ServerLost(f"lost the connection to the {self.peer} at step {step}: {e}") from None
        if header.type in (MsgType.ERROR, MsgType.REJECT):
            body = wire.decode_json(payload, header, self.peer)
            if header.type == MsgType.ERROR:
                raise WorkerError(f"the {self.peer} ended our session: {body.get('error', '?')}")
            raise WorkerError(f"the server refused worker {self.id}: {body.get('reason', '?')}")
        if header.type == MsgType.PARAMS and self._training:
            self._resync(header.step)
        return header, payload

    def _resync(self, step: int) -> None:
        """The parameters already landed in place; take the optimizer state too, then start over at `step`."""
        _, state = self._expect(MsgType.STATE, step, self.cfg.cluster.worker_timeout)
        try:
            decode_state(self.optimizer, bytes(state), self.peer)
        except CheckpointError as e:
            raise WorkerError(str(e)) from None
        assert self.exchange is not None
        self.exchange.restart()
        logger.warning(f"the server rolled back its replica; resynced to its parameters, training on from step {step}")
        raise Resynced(step)

    def _expect(self, mtype: MsgType, step: int, timeout: float) -> tuple[Header, memoryview]:
        while True:
            header, payload = self._read(step, timeout)
            if header.type == mtype:
                return header, payload
            if header.type != MsgType.HEARTBEAT:
                raise WorkerError(f"expected {mtype.name} from the {self.peer} at step {step}, got {header.type.name}")

    def _json(self, mtype: MsgType, timeout: float) -> dict[str, Any]:
        header, payload = self._expect(mtype, 0, timeout)
        return wire.decode_json(payload, header, self.peer)

    # --- training -------------------------------------------------------------------------------

    def _handshake(self) -> dict[str, Any]:
        """Prove the token (if any), present our config, and check the server proves it too."""
        timeout = self.cfg.cluster.handshake_timeout
        try:
            challenge = self._handshake_json(MsgType.CHALLENGE, timeout)
        except HandshakeCut as e:
            hint = "" if self.cfg.cluster.tls_ca else " (if the server uses TLS, set cluster.tls_ca)"
            raise HandshakeCut(f"no handshake from the {self.peer}: {e}{hint}") from None
        server_nonce, my_nonce = str(challenge.get("nonce", "")), auth.nonce()
        if challenge.get("auth") and self.token is None:
            raise WorkerError(f"the {self.peer} requires a cluster token: set ${auth.TOKEN_ENV} or cluster.token_file")
        if self.token is not None and not challenge.get("auth"):  # refuse before it could count us in
            raise WorkerError(f"the {self.peer} asks for no cluster token but we have one: it is not our "
                              f"cluster's server (or it was started without ${auth.TOKEN_ENV})")
        hello: dict[str, Any] = {
            "worker_id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "nonce": my_nonce,
            "fingerprint": {**self.cfg.fingerprint(), "layout": layout(self.model)},
        }
        if self.token is not None:
            hello["proof"] = auth.proof(self.token, "worker", server_nonce, my_nonce, self.id)
        try:
            self._send(MsgType.HELLO, hello)
        except ServerLost as e:
            raise HandshakeCut(str(e)) from None
        welcome = self._handshake_json(MsgType.WELCOME, timeout)
        if self.token is not None and not auth.verify(self.token, welcome.get("proof"), "server", server_nonce, my_nonce, self.id):
            raise WorkerError(f"the {self.peer} did not prove it knows the cluster token; not training with it")
        return welcome

    def _handshake_json(self, mtype: MsgType, timeout: float) -> dict[str, Any]:
        """A handshake frame; the connection lost or 'server busy' instead is a HandshakeCut."""
        try:
            return self._json(mtype, timeout)
        except HandshakeCut:
            raise
        except ServerLost as e:
            raise HandshakeCut(str(e)) from None
        except WorkerError as e:
            if BUSY in str(e):
                raise HandshakeCut(str(e)) from None
            raise

    def _join(self) -> dict[str, Any]:
        """Dial and handshake; while the server cuts the handshake short, try again with backoff
        until cluster.connect_timeout (counted from the loss when reconnecting)."""
        c = self.cfg.cluster
        deadline = (self._lost_at or time.monotonic()) + c.connect_timeout
        delay, tries = 0.1, 1
        while True:
            self.sock = None
            try:
                self.sock = self._dial(max(deadline - time.monotonic(), 1.0))
                welcome = self._handshake()
                break
            except HandshakeCut as e:
                if self.sock is not None:
                    self.sock.close()
                if time.monotonic() + delay > deadline:
                    raise WorkerError(f"{e}; gave up after {tries} tries in {c.connect_timeout:g} s "
                                      "(cluster.connect_timeout)") from None
                if tries == 1:
                    logger.warning(f"{e}; trying again until cluster.connect_timeout ({c.connect_timeout:g} s)")
            except BaseException:
                if self.sock is not None:
                    self.sock.close()
                raise
            time.sleep(delay * random.uniform(0.5, 1.0))  # jitter: retries of many workers spread out
            delay, tries = min(delay * 2, 2.0), tries + 1
        if tries > 1:
            logger.info(f"the handshake with the {self.peer} went through on try {tries}")
        return welcome

    def _sync(self) -> int:
        """Receive the parameters and optimizer state to start from; returns the step they are at."""
        c = self.cfg.cluster
        header, _ = self._expect(MsgType.PARAMS, 0, c.join_timeout + c.worker_timeout)
        _, state = self._expect(MsgType.STATE, header.step, c.worker_timeout)
        try:
            decode_state(self.optimizer, bytes(state), self.peer)
        except CheckpointError as e:
            raise WorkerError(str(e)) from None
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
                save_model(self.model, self.cfg.model, self.save_params)
            self.tracker.finish(done)
            return done
        except BaseException:
            self.tracker.finish()
            raise

    def _session(self) -> dict[str, Any] | None:
        """One connection's worth of training; None if it broke and we should reconnect."""
        c = self.cfg.cluster
        welcome = self._join()
        stop = threading.Event()
        beats = threading.Thread(target=self._heartbeats, args=(self.sock, stop), daemon=True, name="heartbeat")
        try:
            if not self._tracking:  # the server names the W&B group this worker's run belongs to
                self.tracker = start_tracker(self.cfg, f"worker-{self.id}", welcome.get("wandb_group"))
                self._tracking = True
            total = welcome["total_steps"]
            logger.info(f"joined the {self.peer} as worker {self.id}: shard of {len(self.train)} samples, "
                        f"{total} steps; waiting for the parameters")
            beats.start()
            self.exchange = GradExchange(self.flat, self.buckets, c.compression, c.int8_chunk, c.overlap,
                                         self.id, self._send_frames, self.peer)
            start = self._sync()
            self._lost_at = None
            logger.info(f"received the parameters and optimizer state; training from step {start}")
            self._training = True
            self._train(start, total)
            while True:
                try:
                    header, payload = self._expect(MsgType.DONE, total, c.worker_timeout)
                    break
                except Resynced:  # the last step was rolled back: confirm we hold what the server holds
                    self._send(MsgType.CHECKSUM, {"crc": self.flat.checksum()}, step=total - 1)
            done = wire.decode_json(payload, header, self.peer)
            logger.info(f"training done; the server reports test accuracy {done.get('test_accuracy', 0):.2f}%")
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
            stop.set()
            if beats.is_alive():
                beats.join(timeout=5.0)  # a daemon thread alive at exit can abort the interpreter
            if self.exchange is not None:
                self.exchange.close()
                self.exchange = None
            self.sock.close()

    def _train(self, start: int, total: int) -> None:
        bar = Progress(total, f"worker {self.id}", initial=start)
        self._epoch, self._batches = -1, []
        step = start
        while step < total:
            try:
                self._step(step, total)
            except Resynced as r:  # this step is abandoned; the server goes on at r.step
                bar.update(r.step - step)
                step = r.step
                continue
            bar.update(1, loss=f"{self.flat.loss:.4f}")
            step += 1
        bar.close()

    def _step(self, step: int, total: int) -> None:
        c, t = self.cfg.cluster, self.cfg.training
        if step // self.steps_per_epoch != self._epoch:
            self._epoch = step // self.steps_per_epoch
            self._batches = list(data.epoch_order(len(self.train), c.seed, self._epoch, self.id).split(t.batch_size))
        idx = self._batches[step % self.steps_per_epoch]
        t0 = time.monotonic()
        self.flat.zero_grad()
        loss = loss_fn(self.model(self.train.x[idx]), self.train.y[idx])
        self.flat.loss = loss.item()
        loss = self._inject(step, loss)
        assert self.exchange is not None
        own_loss = self.flat.loss
        self.exchange.begin(step, len(idx))
        loss.backward()
        self.exchange.finish_backward()
        t1 = time.monotonic()
        while True:
            header, _ = self._expect(MsgType.AVG, step, c.worker_timeout)
            if self.exchange.land(header):
                break
        t2 = time.monotonic()
        optimizer_step(self.optimizer, t, step, total)
        if step == total - 1 or (c.checksum_steps and (step + 1) % c.checksum_steps == 0):
            self._send(MsgType.CHECKSUM, {"crc": self.flat.checksum()}, step=step)
        t3 = time.monotonic()
        self.tracker.log({
            "worker/loss": own_loss, "worker/global_loss": self.flat.loss,
            "time/compute_s": (t1 - t0) + (t3 - t2), "time/communicate_s": t2 - t1, "time/step_s": t3 - t0,
        }, step)

    def _inject(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Apply this step's injected fault, after forward and before anything of the step is sent."""
        fault = self.faults.pop(step, None)  # once: a rejoined worker does not repeat it
        if fault is None:
            return loss
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
            last = self.buckets[-1]
            frames = wire.frame(MsgType.GRAD, memoryview(self.flat.grad_bytes)[4 * last.lo : 4 * last.hi], step=step,
                                worker=self.id, count=1, offset=last.lo, dtype=DType.F32)
            with self._send_lock:
                wire.send_frame(self.sock, [frames[0], frames[1][: len(frames[1]) // 2]])
            self.sock.close()
            sys.exit(3)
        elif fault.kind == "garbage":
            with self._send_lock:
                self.sock.sendall(random.Random(step).randbytes(256))
        elif fault.kind == "nan":
            self.flat.loss = float("nan")
            return loss * float("nan")  # every gradient of the step becomes NaN
        elif fault.kind == "scale":
            return loss * fault.arg  # backward is linear: every gradient of the step scales, the loss slot does not
        return loss
