"""One replica of the job, built the same way on the server and on every worker.

A replica is the model with its parameters and gradients in flat buffers, the optimizer, the
gradient buckets, and the fingerprint that the handshake compares. Building all of it in one
place is what keeps the replicas identical: the server and the workers cannot drift apart in
how they make the model, order its parameters or bucket its gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from smolcluster.buckets import Bucket
    from smolcluster.config import Config
    from smolcluster.datasets import DataMeta
    from smolcluster.flat import FlatModel

ModelFactory = Callable[[], "nn.Module"]
"""A user's own model: called with no arguments under the run's seed (so every replica starts
from the same weights even before the server sends its parameters)."""


@dataclass(eq=False)
class Replica:
    model: nn.Module
    flat: FlatModel
    optimizer: torch.optim.Optimizer
    """What applies the average: the training optimizer (sync), or the outer one (local modes)."""
    buckets: list[Bucket]
    fingerprint: dict[str, Any]
    """What must agree between server and workers: the config's fingerprint, the model's layout and
    the data's identity (compared key by key at the handshake)."""
    device: torch.device

    @property
    def state_limit(self) -> int:
        """The largest optimizer-state frame we accept: a few copies of the parameters at most."""
        return 4 * self.flat.nbytes + (1 << 20)


def seeded(factory: ModelFactory, seed: int) -> nn.Module:
    """Call a user's model factory under `seed`, leaving the global RNG as it was."""
    import torch
    from torch import nn

    from smolcluster.errors import ConfigError

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_replica(cfg: Config, model_factory: ModelFactory | None = None, meta: DataMeta | None = None,
                  device: torch.device | None = None) -> Replica:
    """Model (seeded), flat buffers, optimizer, buckets and fingerprint for `cfg` and the data
    `meta` describes (its sizes fill in the model's; its identity joins the fingerprint), on
    `device` (default: the one training.device names on this machine)."""
    from smolcluster import devices
    from smolcluster.buckets import make_buckets
    from smolcluster.flat import FlatModel
    from smolcluster.models import build_model, layout
    from smolcluster.train import build_optimizer, build_outer, set_threads

    c, t = cfg.cluster, cfg.training
    set_threads(t.threads)
    device = devices.resolve(t.device) if device is None else device
    if model_factory is not None:
        model = seeded(model_factory, c.seed)
    else:
        model = build_model(cfg.model, c.seed, meta)
    flat = FlatModel(model, device)
    optimizer = build_optimizer(model, t) if t.algorithm == "sync" else build_outer(model, t)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    buckets = make_buckets(sizes, max(1, int(c.bucket_mb * 2**20) // 4), flat.nbuf)
    fingerprint = {**cfg.fingerprint(), "layout": layout(model)}
    if flat.buffer_layout:
        fingerprint["buffers"] = flat.buffer_layout
    if meta is not None:
        fingerprint["data"] = meta.identity
    return Replica(model, flat, optimizer, buckets, fingerprint, device)


def usable_replica(cfg: Config, model_factory: ModelFactory | None, meta: DataMeta | None,
                   sample: tuple[torch.Tensor, torch.Tensor], loss: Callable[..., torch.Tensor],
                   device: torch.device | None = None) -> Replica:
    """`build_replica`, on the CPU instead (with one log line) if the device lacks an operation the
    model needs: MPS does not implement every op, and the alternative is a crash at step 0.
    PYTORCH_ENABLE_MPS_FALLBACK=1 (the user's to set, never ours) runs just that op on the CPU."""
    import torch
    from loguru import logger

    from smolcluster.devices import lacks_op

    replica = build_replica(cfg, model_factory, meta, device)
    if replica.device.type == "cpu":
        return replica
    flat = replica.flat
    saved = flat.dev_buffers.clone()
    missing = lacks_op(replica.model, sample, loss, replica.device)  # undone right after:
    flat.dev_buffers.copy_(saved)
    flat.zero_grad()
    if not missing:
        return replica
    logger.warning(f"{replica.device} lacks an operation this model needs ({missing}); this process trains on "
                   "the CPU (on a Mac, PYTORCH_ENABLE_MPS_FALLBACK=1 would run just that operation on "
                   "the CPU instead)")
    return build_replica(cfg, model_factory, meta, torch.device("cpu"))
