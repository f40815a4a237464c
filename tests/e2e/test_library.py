"""smolcluster as a library: a user's own model, data and loss from outside the package, by YAML
import path and by the Python API (tests/usercode/), trained by real processes."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import REPO, Cluster

pytestmark = pytest.mark.timeout(150)

USERCODE = REPO / "tests" / "usercode"
JOB = [sys.executable, str(USERCODE / "job.py")]
SMALL = ["--set", "dataset.train_size=512", "--set", "dataset.test_size=256", "--set", "training.batch_size=16",
         "--set", "training.num_epochs=1"]


def test_batchnorm_statistics_are_identical_on_every_replica_and_the_server(tmp_path):
    cluster = Cluster(tmp_path, workers=2, args=SMALL, program=JOB).start()
    codes = cluster.wait(120)
    assert codes == {"server": 0, "worker 1": 0, "worker 2": 0}, cluster.logs()
    server = cluster.server_params()
    assert "1.running_mean" in server and "1.running_var" in server
    # The statistics moved away from their initial values (0 and 1): they were averaged, not left alone.
    assert not torch.equal(server["1.running_mean"], torch.zeros_like(server["1.running_mean"]))
    assert int(server["1.num_batches_tracked"]) == cluster.summary()["steps"]
    cluster.assert_replicas_equal([1, 2])  # every tensor of the state dict, buffers included
