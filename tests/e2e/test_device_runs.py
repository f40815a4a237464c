"""Devices, with real processes: the key's refusals, the path a GPU takes (copies at the step's
edges) giving the CPU's bits, and the drift policy of clusters whose devices round differently.

A GPU's path is taken on this CPU with SMOLCLUSTER_COPY_PATH=1 (devices.py); drift is injected
with the `perturb` fault. The tests that need a real CUDA GPU skip elsewhere.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from helpers import REPO, Cluster, assert_same_params, env, smolcluster

pytestmark = pytest.mark.timeout(180)

USER_ENV = {"PYTHONPATH": str(REPO / "tests" / "usercode")}
BN = ["--set", "model.type=mynets:bn_net", "--set", "model.width=6", "--set", "training.num_epochs=1"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def finished(cluster: Cluster, timeout: float = 150) -> Cluster:
    codes = cluster.wait(timeout)
    assert all(code == 0 for code in codes.values()), f"{codes}:\n{cluster.logs()}"
    return cluster


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_that_is_not_there_is_a_config_error_naming_the_key():
    done = subprocess.run(smolcluster("worker", "--id", "1", "--set", "training.device=cuda:0",
                                      "--set", "dataset.name=synthetic"),
                          capture_output=True, text=True, env=env(), cwd=REPO, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "training.device: cuda:0 asked for" in done.stderr, done.stderr[-2000:]


def test_the_gpu_path_gives_the_cpu_path_bits(tmp_path):
    """Model memory apart from the wire's, copies at the step's edges (BatchNorm buffers too):
    the same parameters, bit for bit, as the zero-copy CPU path, and the same replicas."""
    plain = Cluster(tmp_path / "plain", workers=2, args=BN, extra_env=USER_ENV).start()
    copied = Cluster(tmp_path / "copied", workers=2, args=[*BN, "--set", "training.device=cpu"],
                     extra_env={**USER_ENV, "SMOLCLUSTER_COPY_PATH": "1"}).start()
    finished(plain), finished(copied)
    assert_same_params(plain.server_params(), copied.server_params(), "copy path vs zero-copy path")
    summary = copied.summary()
    assert summary["checksum"] == plain.summary()["checksum"]
    assert summary["replicas_verified"] == [1, 2] and summary["replica_mismatches"] == 0
    assert summary["devices"]["1"].startswith("cpu")
    copied.assert_replicas_equal([1, 2])


def test_drift_is_measured_tolerated_when_small_resynced_when_large_and_replicas_end_equal(tmp_path):
    # 64 steps; checksums every 5 (steps 4, 9, 14, ...) and a forced resync every 25 steps.
    # Worker 1 drifts by 1e-6 of the parameters' norm after step 2 (within the tolerance of 1e-4)
    # and again after the last step (63: any difference there is resynced), worker 2 by 1e-2 after
    # step 12 (beyond the tolerance). They take the copy path a GPU takes.
    args = ["--set", "dataset.train_size=1024", "--set", "cluster.checksum_steps=5", "--set", "cluster.resync_steps=25"]
    cluster = Cluster(tmp_path, workers=2, args=args, extra_env={"SMOLCLUSTER_COPY_PATH": "1"})
    finished(cluster.start({1: ["--fault", "2:perturb:1e-6", "--fault", "63:perturb:1e-6"],
                            2: ["--fault", "12:perturb:1e-2"]}))
    log = cluster.procs["server"].output
    small = re.search(r"worker 1's parameters differ from the server's after step 4 by (\S+) of their norm.*"
                      r"it trains on", log)
    assert small and 3e-7 < float(small.group(1)) < 3e-6, log[-4000:]  # the sketch's estimate of 1e-6
    large = re.search(r"resyncing worker 2 to the server's parameters at step (\d+): worker 2's parameters "
                      r"differ from the server's after step 14 by (\S+) of their norm", log)
    assert large and 5e-3 < float(large.group(2)) < 2e-2, log[-4000:]
    assert "the server resynced this replica" in cluster.procs["worker 2"].output
    summary = cluster.summary()
    assert summary["drift_resyncs"] >= 1 and summary["periodic_resyncs"] >= 2, summary
    assert "resyncing worker 1 to the server's parameters at step 25: periodic resync" in log
    assert re.search(r"resyncing worker 1 to the server's parameters at step 64: .* after step 63 .* on the last step",
                     log), log[-3000:]
    assert summary["replicas_verified"] == [1, 2], summary
    cluster.assert_replicas_equal([1, 2])


@cuda
def test_a_cuda_cluster_trains_and_a_cpu_worker_beside_it_ends_equal(tmp_path):
    """Server and worker 1 on the GPU, worker 2 on the CPU: they round differently; the drift
    policy keeps them within the tolerance and the last step resyncs, so every replica ends equal."""
    cluster = Cluster(tmp_path, workers=2, args=[*BN, "--set", "training.device=cuda"], extra_env=USER_ENV)
    finished(cluster.start({2: ["--set", "training.device=cpu"]}))
    summary = cluster.summary()
    assert summary["devices"]["server"].startswith("cuda") and summary["devices"]["2"].startswith("cpu")
    assert summary["replicas_verified"] == [1, 2], summary
    cluster.assert_replicas_equal([1, 2])
    assert summary["test_accuracy"] > 50


@cuda
def test_a_cuda_cluster_matches_one_cuda_process_with_sgd(tmp_path):
    """Two CUDA workers at batch b against one at 2b: parameters equal to float tolerance."""
    sgd = [*BN, "--set", "training.device=cuda", "--set", "training.optimizer=sgd", "--set", "training.learning_rate=0.05",
           "--set", "training.lr_schedule=constant"]
    two = finished(Cluster(tmp_path / "two", workers=2, args=[*sgd, "--set", "training.batch_size=8"],
                           extra_env=USER_ENV).start())
    one = finished(Cluster(tmp_path / "one", workers=1, args=[*sgd, "--set", "training.batch_size=16"],
                           extra_env=USER_ENV).start())
    a, b = two.server_params(), one.server_params()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
