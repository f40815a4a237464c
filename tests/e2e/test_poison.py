"""Absurd but finite gradients, a stalled worker, an unread send queue: real processes over loopback.

One gradient of 1e19 or 1e30 passes the NaN check; without the admission rule it drives Adam's
second moment to inf (or near it) and the model stops learning on every replica at once. These
runs use real MNIST (a small slice) so that a frozen model shows in the test accuracy.
"""

from __future__ import annotations

import time

import psutil
import pytest

from helpers import Cluster

pytestmark = pytest.mark.timeout(180)

# 3000 MNIST images over 2 workers, batch 16: 94 steps of Adam.
MNIST = ["--set", "dataset.name=MNIST", "--set", "dataset.train_size=3000", "--set", "dataset.test_size=1000",
         "--set", "training.num_epochs=1", "--set", "cluster.step_timeout=30", "--set", "cluster.heartbeat_s=0.5"]


def run(tmp, faults: dict[int, list[str]] | None = None, *extra: str) -> Cluster:
    cluster = Cluster(tmp, workers=2, args=[*MNIST, *extra])
    cluster.start({k: [a for f in fs for a in ("--fault", f)] for k, fs in (faults or {}).items()})
    codes = cluster.wait(150)
    assert codes == {"server": 0, "worker 1": 0, "worker 2": 0}, cluster.logs()
    return cluster


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("clean")).summary()


@pytest.mark.parametrize("fault", ["3:scale:1e19", "40:scale:1e30"])
def test_an_absurd_gradient_is_rejected_and_the_run_ends_as_a_clean_one(tmp_path, clean, fault):
    # Step 3 is judged against the other worker's norm (warm-up), step 40 against the running median.
    cluster = run(tmp_path, {2: [fault]})
    step = fault.split(":")[0]
    log = cluster.procs["server"].output
    assert f"step {step}: rejected an absurd gradient from worker 2" in log, log[-3000:]
    summary = cluster.summary()
    assert summary["outlier_gradients"] == 1 and summary["rollbacks"] == 0
    assert abs(summary["test_accuracy"] - clean["test_accuracy"]) <= 0.5, (summary["test_accuracy"], clean["test_accuracy"])
    cluster.assert_replicas_equal([1, 2])


def test_a_non_finite_optimizer_state_is_rolled_back_and_every_worker_resynced(tmp_path, clean):
    # With the admission rule off, 1e30 reaches Adam: its second moment overflows to inf.
    cluster = run(tmp_path, {2: ["50:scale:1e30"]}, "--set", "cluster.outlier_factor=0")
    log = cluster.procs["server"].output
    assert "step 50: parameters or optimizer state are not finite after the update; rolled back" in log, log[-3000:]
    for k in (1, 2):
        assert "resynced this replica to its parameters; training on from step 52" in cluster.procs[f"worker {k}"].output
    summary = cluster.summary()
    assert summary["rollbacks"] == 1 and summary["replica_mismatches"] == 0
    assert summary["replicas_verified"] == [1, 2]
    cluster.assert_replicas_equal([1, 2])
    # Up to 20 steps are lost (the snapshot's age) plus the abandoned one, of 94.
    assert summary["test_accuracy"] >= clean["test_accuracy"] - 3.0, (summary["test_accuracy"], clean["test_accuracy"])
