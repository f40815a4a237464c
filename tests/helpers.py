"""Start real smolcluster processes for end-to-end tests: bench/cluster.py's harness, with a tiny job.

conftest.py puts the repository root on sys.path, so `bench` imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.cluster import REPO, Proc, assert_same_params, env, free_port, smolcluster, wait_for
from bench.cluster import Cluster as _Cluster

__all__ = ["FAST", "REPO", "Cluster", "Proc", "assert_same_params", "env", "free_port", "smolcluster", "wait_for"]

# A tiny job: synthetic data, 512 samples, quick to run in a few seconds per process.
FAST = [
    "--set", "dataset.name=synthetic", "--set", "dataset.train_size=512", "--set", "dataset.test_size=256",
    "--set", "training.batch_size=16", "--set", "training.num_epochs=2", "--set", "training.eval_steps=0",
    "--set", "training.threads=1", "--set", "wandb.mode=disabled", "--set", "cluster.checksum_steps=5",
    "--set", "cluster.connect_timeout=60", "--set", "cluster.worker_timeout=60",
    "--set", "cluster.join_timeout=60", "--set", "cluster.http_port=0",
]


@dataclass
class Cluster(_Cluster):
    """The harness, with the tiny job (FAST) before each test's own flags."""

    base: list[str] = field(default_factory=lambda: list(FAST))
