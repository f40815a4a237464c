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
    buckets: list[Bucket]
    fingerprint: dict[str, Any]
    """What must agree between server and workers: the config's fingerprint, the model's layout and
    the data's identity (compared key by key at the handshake)."""

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


def build_replica(cfg: Config, model_factory: ModelFactory | None = None, meta: DataMeta | None = None) -> Replica:
    """Model (seeded), flat buffers, optimizer, buckets and fingerprint for `cfg` and the data
    `meta` describes (its sizes fill in the model's; its identity joins the fingerprint)."""
    from smolcluster.buckets import make_buckets
    from smolcluster.flat import FlatModel
    from smolcluster.models import build_model, layout
    from smolcluster.train import build_optimizer, set_threads

    c, t = cfg.cluster, cfg.training
    set_threads(t.threads)
    if model_factory is not None:
        model = seeded(model_factory, c.seed)
    else:
        model = build_model(cfg.model, c.seed, meta)
    flat = FlatModel(model)
    optimizer = build_optimizer(model, t)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    buckets = make_buckets(sizes, max(1, int(c.bucket_mb * 2**20) // 4), flat.nbuf)
    fingerprint = {**cfg.fingerprint(), "layout": layout(model)}
    if flat.buffer_layout:
        fingerprint["buffers"] = flat.buffer_layout
    if meta is not None:
        fingerprint["data"] = meta.identity
    return Replica(model, flat, optimizer, buckets, fingerprint)
