"""The torch backend (`cluster.backend: torch`): a worker is one rank of a torch.distributed
process group, and DistributedDataParallel does the averaging.

Everything else is the `ps` backend's: the same shard and draw order (shard.py), the same replica
(seeded weights, flat buffers, optimizer: replica.py), the same learning-rate schedule and
optimizer step (train.py); and rank 0 (worker 1) leads as the ps server does (lead.py):
evaluations, checkpoints, model.safetensors and summary.json in the same formats. So the two
backends give the same parameters to float tolerance, and a checkpoint of either resumes on the
other. Where the arithmetic needs care to stay the ps server's:

- the server averages gradients weighted by samples, DDP takes the plain mean over ranks: each
  rank scales its loss by N * n_k / sum(n) (exactly 1, and left alone, when batches are equal);
- BatchNorm statistics are averaged after every step with the same weights, as the server does
  (DDP's default would broadcast rank 0's at each forward instead);
- a non-finite averaged gradient (some rank's NaN or Inf) is skipped by every rank alike, and
  counted, where the server would have rejected that rank's gradient.

Failure is torch's: a rank that dies stops the job (the others fail at once when its connections
close, or when a collective times out after cluster.worker_timeout); restart every process with
`--resume` and rank 0 goes on from the latest checkpoint.
"""

from __future__ import annotations

import inspect
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger

from smolcluster import auth, data, rendezvous
from smolcluster.checkpoint import decode_state, encode_state
from smolcluster.config import ClusterConfig, Config
from smolcluster.devices import batch_to, describe, resolve
from smolcluster.errors import CheckpointError, ConfigError, WorkerError
from smolcluster.lead import Lead
from smolcluster.progress import Progress
from smolcluster.replica import usable_replica
from smolcluster.results import Counters, headline, save_model
from smolcluster.schedule import Schedule
from smolcluster.shard import Shard
from smolcluster.tracking import NullTracker, Tracker, group_name, start_tracker
from smolcluster.train import learning_rate, make_loss, optimizer_step

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

    from smolcluster.api import Job


def check_config(cfg: Config) -> None:
    """What the torch backend does not do (yet): refused when the process starts, naming the key."""
    t = cfg.training
    if t.algorithm != "sync":
        raise ConfigError(f"training.algorithm: {t.algorithm} runs on cluster.backend ps only; "
                          "the torch backend averages every step (sync)")
    if t.balance:
        raise ConfigError("training.balance: runs on cluster.backend ps only (set dataset.shares by hand on torch)")
    c = cfg.cluster
    for key in ("tls_cert", "tls_ca"):
        if getattr(c, key):
            raise ConfigError(f"cluster.{key}: TLS is the ps backend's; torch.distributed's gloo and NCCL do not "
                              "encrypt (cluster.backend torch is for a network you trust)")
    default = ClusterConfig()
    ignored = [k for k in PS_ONLY if getattr(c, k) != getattr(default, k)]
    if ignored:
        logger.warning(f"cluster.backend torch ignores {', '.join(f'cluster.{k}' for k in ignored)} "
                       "(the parameter server's keys)")


PS_ONLY = ("min_workers", "step_timeout", "reconnect", "checksum_steps", "drift_tolerance", "resync_steps",
           "outlier_factor", "max_send_queue_mb", "http_linger_s")
"""Keys that mean something to the parameter server only: on torch they are ignored, with one line."""


def rank_device(spec: str, local_rank: int) -> torch.device:
    """training.device for this rank: `auto`/`cuda` on a machine with several GPUs gives each local
    rank its own (NCCL cannot put two ranks on one GPU)."""
    device = resolve(spec)
    if device.type == "cuda" and spec in ("auto", "cuda"):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


@dataclass
class Pending:
    """A step whose averaged loss is still on its way."""

    step: int
    row: dict[str, Any]
    """What the tracker gets for the step, less the averaged loss."""
    work: Any
    side: torch.Tensor
    """The averaged [BatchNorm statistics..., loss] once `work` is done."""


def _step_bytes(compression: str, chunk: int, numel: int, world: int) -> int:
    """Bytes every rank together sends per step: fp32 goes through DDP's ring allreduce (each rank
    2 (N-1)/N of the gradient); a codec's payload is all-gathered (each rank sends it N-1 times)."""
    if compression == "fp32":
        return 2 * (world - 1) * 4 * numel
    from smolcluster.compress import make_codec

    return world * (world - 1) * make_codec(compression, chunk).payload_nbytes(numel)


class Rank(Lead):
    def __init__(self, cfg: Config, worker_id: int | None, host: str | None = None, job: Job | None = None,
                 resume: bool = False, save_params: Path | None = None) -> None:
        c, t = cfg.cluster, cfg.training
        check_config(cfg)
        self.cfg, self.resume, self.save_params = cfg, resume, save_params
        self.launch = rendezvous.plan(c, worker_id, host)
        self.rank, self.world = self.launch.rank, self.launch.world
        self.id = self.rank + 1
        self.leads = self.rank == 0
        self.token = auth.load_token(c.token_file)
        self.shard = Shard(cfg, self.id, job.data if job else None, keep_test=self.leads)
        self.meta = self.shard.meta
        if self.shard.test is not None:
            self.test = self.shard.test
        self.loss = job.loss if job and job.loss else make_loss(t)
        device = rank_device(t.device, self.launch.local_rank)
        self.replica = usable_replica(cfg, job.model if job else None, self.meta, data.sample(self.shard.train),
                                      self.loss, device)
        self.device = self.replica.device
        self.model, self.flat, self.optimizer = self.replica.model, self.replica.flat, self.replica.optimizer
        self.fingerprint = self.replica.fingerprint
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.comm_device = self.device if self.backend == "nccl" else torch.device("cpu")
        """Where tensors for collectives live: gloo takes CPU tensors only (an MPS rank copies)."""
        logger.info(f"worker {self.id} (rank {self.rank} of {self.world}, {self.backend}) computes on "
                    f"{describe(self.device)}")
        lay = self.shard.layout
        self.steps_per_epoch = lay.steps_per_epoch
        total = lay.steps_per_epoch * t.num_epochs
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        sizes = [len(s) - data.held_out(len(s), cfg.dataset.validation_split) for s in lay.shards]
        self.schedules = [Schedule(n, b) for n, b in zip(sizes, lay.batches)]
        """Every rank's draws, so that each knows every rank's batch size at every step (the weights)."""
        self.step_bytes = _step_bytes(c.compression, c.int8_chunk, self.flat.numel, self.world)
        """What all ranks send in a step, estimated (gloo counts nothing): summary.json's bytes_moved."""
        # What Lead reads and writes:
        self.board = None
        self.step = 0
        self.evals: list[dict[str, Any]] = []
        self.counters = Counters()
        self.eval_s, self.bytes_moved = 0.0, 0
        self.t_train = time.monotonic()
        self.step_times: list[float] = []
        self.devices = {str(self.id): describe(self.device)}
        self.tracker: Tracker = NullTracker()

    # --- joining ----------------------------------------------------------------------------

    def _join(self) -> int:
        """Rendezvous, handshake and process group; returns the step to start at."""
        c = self.cfg.cluster
        rendezvous.check_network(c, self.launch)
        store = rendezvous.open_store(c, self.launch)
        run: dict[str, Any] = {}
        if self.leads:
            Path(self.cfg.training.out_dir).mkdir(parents=True, exist_ok=True)
            if self.resume:
                self._resume()
            else:
                (Path(self.cfg.training.out_dir) / "evals.jsonl").unlink(missing_ok=True)
            run = {"wandb_group": group_name(self.cfg), "start": self.step}
        hello = {"host": socket.gethostname(), "device": describe(self.device)}
        got = rendezvous.admit(store, c, self.launch, self.token, self.fingerprint, hello, run)
        logger.info(f"joined the rendezvous at {self.launch.address}:{self.launch.port} as rank {self.rank} "
                    f"of {self.world}")
        if self.leads:
            # Keyed like the server's summary: worker ids as text ("1", "2", ...).
            self.devices = {str(r + 1): str(v.get("device", "?")) for r, v in sorted(got["ranks"].items())}
        self.tracker = start_tracker(self.cfg, f"worker-{self.id}", got.get("wandb_group"), device=describe(self.device))
        rendezvous.init_group(store, self.launch, self.backend, c.worker_timeout)
        self._store = store  # rank 0 holds the rendezvous: it must outlive every rank's group
        start = got.get("start", 0)
        if not isinstance(start, int) or not 0 <= start <= self.total_steps:
            raise WorkerError(f"worker 1 (rank 0) says training starts at step {start!r} of {self.total_steps}")
        if start:
            self._share_state(start)
        return start

    def _share_state(self, start: int) -> None:
        """Rank 0 resumed from a checkpoint: every rank takes its parameters and optimizer state."""
        import torch.distributed as dist

        if self.leads:
            self.flat.pull()
            blob = torch.frombuffer(bytearray(encode_state(self.optimizer, self.flat.buffers)), dtype=torch.uint8)
            size = torch.tensor([blob.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        size = self._broadcast(size)
        if not self.leads:
            if not 0 < int(size) <= self.replica.state_limit:
                raise WorkerError(f"worker 1 (rank 0) sends {int(size)} bytes of optimizer state; "
                                  f"at most {self.replica.state_limit} expected")
            blob = torch.zeros(int(size), dtype=torch.uint8)
        blob = self._broadcast(blob)
        self.flat.params.copy_(self._broadcast(self.flat.params))
        if not self.leads:
            try:
                decode_state(self.optimizer, blob.numpy().tobytes(), "worker 1 (rank 0)", self.flat.buffers)
            except CheckpointError as e:
                raise WorkerError(str(e)) from None
            self.flat.push()
        self.flat.count_steps(start)
        dist.barrier()
        logger.info(f"took worker 1's resumed state: training from step {start}")

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every rank (through the device NCCL needs, where it does)."""
        import torch.distributed as dist

        moved = t.to(self.comm_device)
        dist.broadcast(moved, src=0)
        return moved.cpu()

    def _wrap(self) -> DistributedDataParallel:
        from torch.nn.parallel import DistributedDataParallel

        c = self.cfg.cluster
        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradient_as_bucket_view=False: DDP copies each averaged bucket into .grad, which stays a
        # view of the flat buffer that checksums, checkpoints and the optimizer see.
        # BatchNorm statistics are averaged by us after each step (like the server), not broadcast
        # from rank 0 at each forward; newer torch names that switch forward_sync_buffers.
        names = inspect.signature(DistributedDataParallel.__init__).parameters
        buffers = {"forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers": False}
        # DDP's own bucket size (25 MiB): cluster.bucket_mb (1 MiB) suits the server's streaming; for
        # an allreduce, small buckets are many more collectives, each with its fixed cost.
        ddp = DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=False, **buffers)
        if c.compression != "fp32" or self.device.type not in ("cpu", "cuda"):
            from smolcluster import ddp_hooks

            ddp_hooks.register(ddp, c.compression, chunk=c.int8_chunk, host=self.comm_device.type == "cpu")
        return ddp

    # --- training ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the end; rank 0 returns the summary (also in out_dir/summary.json), the others
        the final test metrics rank 0 shares."""
        import torch.distributed as dist

        t_start = time.monotonic()
        try:
            start = self._join()
            ddp = self._wrap()
            logger.info(f"all {self.world} ranks joined; training {self.cfg.model.type} for "
                        f"{self.total_steps - start} steps ({self.steps_per_epoch:g} per epoch)")
            self.t_train = time.monotonic()
            self._train(ddp, start)
            train_s = time.monotonic() - self.t_train
            verified = self._verify()
            done: dict[str, Any] = {}
            if self.leads:
                self.step = self.total_steps - 1
                final = self._evaluate()
                samples = (self.total_steps - start) * sum(self.shard.layout.batches)
                done = self._summary_of(final, time.monotonic() - t_start, train_s, samples,
                                        replicas_verified=verified)
                self._save(done)
                logger.info(f"{headline(final)} after {self.total_steps} steps; "
                            f"saved {self.cfg.training.out_dir}/model.safetensors")
            if self.save_params:
                save_model(self.model, self.cfg.model, self.save_params, meta=self.meta)
            dist.barrier()  # rank 0 holds the store: nobody may still need it when it exits
            self.tracker.finish(done or None)
            return done
        except BaseException:
            self.tracker.finish()
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    def _train(self, ddp: DistributedDataParallel, start: int) -> None:
        bar = Progress(self.total_steps, f"worker {self.id}", initial=start)
        pending: Pending | None = None
        try:
            for self.step in range(start, self.total_steps):
                done = self._step(ddp, self.step)
                if pending is not None:  # the previous step's loss has long arrived by now
                    self._settle(pending, bar)
                pending = done
            if pending is not None:
                self._settle(pending, bar)
        finally:
            self.shard.close()
        bar.close()

    def _settle(self, p: Pending, bar: Progress) -> None:
        """A step's averaged loss (it travels beside the next step's gradients): log it."""
        p.work.wait()
        self.flat.loss = loss = float(p.side[-1])
        p.row["worker/global_loss"] = loss
        if self.leads:
            p.row["train/loss"] = loss
        self.tracker.log(p.row, p.step)
        bar.update(1, loss=f"{loss:.4f}")

    def _shares(self, step: int) -> list[float]:
        """Each rank's part of this step's samples (the server's weights)."""
        counts = []
        for s in self.schedules:
            _, at = s.position(step)
            counts.append(min(s.batch(step), s.size - at))
        total = sum(counts)
        return [n / total for n in counts]

    def _step(self, ddp: DistributedDataParallel, step: int) -> Pending:
        import torch.distributed as dist

        c, t = self.cfg.cluster, self.cfg.training
        t0 = time.monotonic()
        x, y = self.shard.batch(step)
        x, y = batch_to(x, self.device), batch_to(y, self.device)
        self.shard.seed_step(step)
        self.flat.zero_grad()
        loss = self.loss(ddp(x), y)
        own = loss.item()
        share = self._shares(step)[self.rank]
        scale = self.world * share
        (loss if scale == 1.0 else loss * scale).backward()
        t1 = time.monotonic()
        # The loss and the BatchNorm statistics, weighted like the gradient, averaged beside the step:
        # the statistics are waited for (the next forward needs them), the loss only a step later.
        side = torch.empty(self.flat.nbuf + 1, dtype=torch.float32, device=self.comm_device)
        side[: self.flat.nbuf].copy_(self.flat.dev_buffers).mul_(share)
        side[-1] = own * share
        work = dist.all_reduce(side, async_op=True)
        # One pass: NaN and Inf survive a sum (a sum past float32's range, an absurd gradient, counts too).
        if bool(torch.isfinite(self.flat.dev_grads.sum())):
            optimizer_step(self.optimizer, t, step, self.total_steps)
        else:
            self.counters.nonfinite += 1
            logger.error(f"step {step}: the averaged gradient is not finite (some rank's NaN or Inf); "
                         "every rank skips this step")
        if self.flat.nbuf:
            work.wait()
            self.flat.dev_buffers.copy_(side[: self.flat.nbuf])
        self.flat.count_steps(step + 1)
        t2 = time.monotonic()
        self.step_times.append(t2 - t0)
        self.bytes_moved += self.step_bytes
        row: dict[str, Any] = {"worker/loss": own, "time/compute_s": t1 - t0, "time/step_s": t2 - t0}
        last = step == self.total_steps - 1
        if self.shard.val is not None and (last or (t.eval_steps and (step + 1) % t.eval_steps == 0)):
            row.update(self.shard.validate(self.model, self.loss, step))
        if self.leads:
            row.update({"train/lr": learning_rate(t, step, self.total_steps),
                        "train/epoch": (step + 1) / self.steps_per_epoch})
            if not last and t.eval_steps and (step + 1) % t.eval_steps == 0:
                result = self._evaluate()
                row.update({f"test/{k[5:]}": v for k, v in result.items() if k.startswith("test_")})
            if not last and c.checkpoint_steps and (step + 1) % c.checkpoint_steps == 0:
                self._checkpoint()
        return Pending(step, row, work, side)

    def _verify(self) -> list[int]:
        """Every rank's final checksum, compared with rank 0's: the workers whose replica is equal."""
        import torch.distributed as dist

        mine = torch.tensor([self.flat.checksum()], dtype=torch.int64, device=self.comm_device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        sums = [int(t) for t in every]
        differ = [r + 1 for r, s in enumerate(sums) if s != sums[0]]
        if differ and self.leads:
            self.counters.replica_mismatches += len(differ)
            logger.warning(f"workers {differ} end with parameters that differ from worker 1's")
        return [r + 1 for r, s in enumerate(sums) if s == sums[0]]
