"""smolcluster as a library: a user's own model, data and loss, defined outside the package
(tests/usercode/), trained by real processes from YAML import paths and from the Python API.

Parity as for the built-in models: with SGD, N workers at batch b end with the parameters of one
process at batch N*b over the same samples.
"""

from __future__ import annotations

import sys
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, Cluster

from smolcluster import data
from smolcluster.config import load_config

pytestmark = pytest.mark.timeout(150)

USERCODE = REPO / "tests" / "usercode"
sys.path.insert(0, str(USERCODE))

import mydata  # noqa: E402
import mynets  # noqa: E402

SGD = ["--set", "training.optimizer=sgd", "--set", "training.learning_rate=0.1", "--set", "training.lr_schedule=constant",
       "--set", "training.batch_size=16", "--set", "training.num_epochs=1", "--set", "cluster.step_timeout=60"]
YAML = ["--set", "model.type=mynets:mlp2", "--set", "model.hidden=10",
        "--set", "dataset.name=mydata:blobs", "--set", "dataset.n=640"]
USER_ENV = {"PYTHONPATH": str(USERCODE)}
TRAIN_SIZE = 512


def reference(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], workers: int, loss: Callable,
              seed: int = 42, batch: int = 16, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """One process, batch N*b: step i's batch is the union of every worker's batch i (the partition rule)."""
    x, y = (t[:TRAIN_SIZE] for t in train)  # the tests' job trains on the first 512 (dataset.train_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    shards = data.partition(len(y), workers, seed)
    per_worker = [shard[data.epoch_order(len(shard), seed, 0, k + 1)].split(batch) for k, shard in enumerate(shards)]
    for batches in zip(*per_worker):
        idx = torch.cat(batches)
        opt.zero_grad()
        loss(model(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def seeded(factory: Callable[[], torch.nn.Module], seed: int = 42) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def finished(cluster: Cluster) -> Cluster:
    codes = cluster.wait(120)
    assert set(codes.values()) == {0}, cluster.logs()
    return cluster


def assert_parity(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert not torch.allclose(value, initial[key]), "training did not move the parameters"
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("workers", [3])
def test_a_users_model_and_data_from_yaml_import_paths_match_one_process(tmp_path, workers):
    cluster = finished(Cluster(tmp_path, workers=workers, args=[*SGD, *YAML], extra_env=USER_ENV).start())
    factory = lambda: mynets.mlp2(hidden=10)  # noqa: E731
    expected = reference(seeded(factory), mydata.blobs(n=640)[0], workers, F.cross_entropy)
    assert_parity(cluster.server_params(), expected, seeded(factory).state_dict())
    cluster.assert_replicas_equal(list(range(1, workers + 1)))


def test_a_users_script_with_the_python_api_matches_one_process(tmp_path):
    import job  # tests/usercode/job.py: the same model, data and loss

    cluster = finished(Cluster(tmp_path, workers=2, args=SGD, program=[sys.executable, str(USERCODE / "job.py")]).start())
    train = mydata.blobs(n=768)[0]
    expected = reference(seeded(job.job.model), train, 2, job.smoothed)
    assert_parity(cluster.server_params(), expected, seeded(job.job.model).state_dict())
    cluster.assert_replicas_equal([1, 2])
    assert cluster.summary()["test_accuracy"] > 50  # four classes: it learned something


def test_batchnorm_statistics_are_identical_on_every_replica_and_the_server(tmp_path):
    small = ["--set", "dataset.train_size=512", "--set", "dataset.test_size=256", "--set", "training.batch_size=16",
             "--set", "training.num_epochs=1"]
    cluster = finished(Cluster(tmp_path, workers=2, args=small,
                               program=[sys.executable, str(USERCODE / "bn_job.py")]).start())
    server = cluster.server_params()
    assert "1.running_mean" in server and "1.running_var" in server
    # The statistics moved away from their initial values (0 and 1): they were averaged, not left alone.
    assert not torch.equal(server["1.running_mean"], torch.zeros_like(server["1.running_mean"]))
    summary = cluster.summary()
    assert int(server["1.num_batches_tracked"]) == summary["steps"]
    assert summary["replicas_verified"] == [1, 2] and summary["replica_mismatches"] == 0  # checksums cover buffers
    cluster.assert_replicas_equal([1, 2])  # every tensor of the state dict, buffers included


def test_a_worker_with_another_model_or_other_data_is_refused_naming_the_difference(tmp_path):
    # Same config, other data: each machine reads its own copy of the file (dataset.root is per machine).
    ours, theirs = tmp_path / "a", tmp_path / "b"
    for folder, last in ((ours, "0"), (theirs, "1")):
        folder.mkdir()
        rows = "\n".join(f"{i % 7},{i % 3},{i % 2}" for i in range(99))
        (folder / "t.csv").write_text(f"a,b,label\n{rows}\n1,2,{last}\n")
    csv = ["--set", "dataset.name=csv", "--set", "dataset.path=t.csv", "--set", "dataset.label_column=label",
           "--set", "model.type=SimpleNN", "--set", "model.hidden=8", "--set", "cluster.join_timeout=30"]
    cluster = Cluster(tmp_path / "run", workers=2, args=csv)
    cluster.start_server("--set", f"dataset.root={ours}")
    cluster.wait_for_log("server", "listening on")
    other_data = cluster.start_worker(1, "--set", f"dataset.root={theirs}", name="other data")
    other_model = cluster.start_worker(2, "--set", f"dataset.root={ours}", "--set", "model.hidden=9", name="other model")
    for proc in (other_data, other_model):
        assert proc.popen.wait(60) == 1, proc.output
    cluster.kill()
    assert "job differs from the server's: data.sha256: server has" in other_data.output, other_data.output
    assert "model.hidden: server has 8, worker has 9" in other_model.output, other_model.output
