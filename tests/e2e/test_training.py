"""End to end: real server and worker processes over 127.0.0.1, compared against one process.

Parity: N workers at batch b must end with the same parameters as one process at batch N*b over
the same samples (SGD, with and without momentum), because the server's weighted mean of the
workers' mean gradients is the mean gradient of the union of their batches.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import Cluster, assert_same_params
from smolcluster import data
from smolcluster.config import load_config
from smolcluster.models import build_model

pytestmark = pytest.mark.timeout(240)

SGD = ["--set", "training.optimizer=sgd", "--set", "training.learning_rate=0.05",
       "--set", "training.lr_schedule=constant", "--set", "cluster.step_timeout=60"]
CASES = {
    "sgd-2": (2, 0.0),
    "sgd-3": (3, 0.0),
    "sgd-momentum-2": (2, 0.9),
    "sgd-momentum-3": (3, 0.9),
}


def case_args(momentum: float) -> list[str]:
    return [*SGD, "--set", f"training.momentum={momentum}"]


def reference(workers: int, args: list[str]) -> dict[str, torch.Tensor]:
    """One process, batch N*b: batch i is the union of every worker's batch i (the partition rule)."""
    from helpers import FAST

    overrides = [v for flag, v in zip(FAST + args, (FAST + args)[1:]) if flag == "--set"]
    cfg = load_config(None, None, [*overrides, f"cluster.num_workers={workers}"])
    c, t = cfg.cluster, cfg.training
    model = build_model(cfg.model, c.seed)
    opt = torch.optim.SGD(model.parameters(), lr=t.learning_rate, momentum=t.momentum)
    train = data.load_split(cfg.dataset, "train", c.seed)
    shards = data.partition(len(train), workers, c.seed)
    for epoch in range(t.num_epochs):
        per_worker = [
            shard[data.epoch_order(len(shard), c.seed, epoch, k + 1)].split(t.batch_size)
            for k, shard in enumerate(shards)
        ]
        for batches in zip(*per_worker):
            idx = torch.cat(batches)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
            opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Cluster]:
    """Every case once, plus a second run of one case for the determinism check, all at once
    (each waits on its own sockets much of the time; the numbers do not depend on timing)."""
    out = {name: Cluster(tmp_path_factory.mktemp(name), workers=workers, args=case_args(momentum)).start()
           for name, (workers, momentum) in [*CASES.items(), ("sgd-momentum-2-again", CASES["sgd-momentum-2"])]}
    for name, cluster in out.items():
        codes = cluster.wait(timeout=240)
        assert all(code == 0 for code in codes.values()), f"{name}: {codes}\n{cluster.logs()}"
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_one_process_at_n_times_the_batch(runs, name):
    workers, momentum = CASES[name]
    expected = reference(workers, case_args(momentum))
    got = runs[name].server_params()
    initial = build_model(load_config(None, None, ["dataset.name=synthetic"]).model, 42).state_dict()
    for key, value in expected.items():
        assert not torch.allclose(value, initial[key]), "training did not move the parameters"
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", list(CASES))
def test_every_worker_ends_identical_to_the_server(runs, name):
    cluster = runs[name]
    cluster.assert_replicas_equal(list(range(1, cluster.workers + 1)))
    summary = json.loads((cluster.out / "summary.json").read_text())
    assert summary["replica_mismatches"] == 0
    assert summary["replicas_verified"] == list(range(1, cluster.workers + 1))


def test_two_runs_of_one_config_are_bit_identical(runs):
    assert_same_params(runs["sgd-momentum-2"].server_params(), runs["sgd-momentum-2-again"].server_params(),
                       "two runs of one config")


def test_a_worker_sleeping_past_the_deadline_is_averaged_without(tmp_path):
    args = ["--set", "cluster.step_timeout=1", "--set", "cluster.min_workers=1"]
    cluster = Cluster(tmp_path, workers=2, args=args).start({2: ["--fault", "3:sleep:4"]})
    codes = cluster.wait(timeout=150)
    assert all(code == 0 for code in codes.values()), cluster.logs()
    server_log = cluster.procs["server"].output
    assert "step 3: waited" in server_log and "still missing workers [2]" in server_log, server_log
    summary = json.loads((cluster.out / "summary.json").read_text())
    assert summary["late_gradients"] >= 1
    assert "dropped late gradient of step 3 from worker 2" in server_log
    cluster.assert_replicas_equal([1, 2])


MLP = ["--set", "model.type=MLP", "--set", "model.hidden=[128, 64, 32]"]


def test_overlap_and_bucketing_change_no_bit(tmp_path):
    """Element-wise averaging: any bucketing, sent during or after backward, gives the same bits."""
    runs = {
        "overlap, small buckets": ["--set", "cluster.overlap=true", "--set", "cluster.bucket_mb=0.01"],
        "plain, one bucket": ["--set", "cluster.overlap=false", "--set", "cluster.bucket_mb=64"],
    }
    params = {}
    for name, extra in runs.items():
        cluster = Cluster(tmp_path / name.replace(" ", "_").replace(",", ""), workers=2, args=[*SGD, *MLP, *extra])
        codes = cluster.start().wait(timeout=150)
        assert all(code == 0 for code in codes.values()), cluster.logs()
        cluster.assert_replicas_equal([1, 2])
        params[name] = cluster.server_params()
    assert_same_params(*params.values(), "overlapped small buckets vs one plain bucket")


@pytest.mark.parametrize("compression", ["int8"])  # bf16/fp16 share its path (codecs: tests/test_compress.py)
def test_compressed_runs_keep_replicas_identical_and_learn(tmp_path, compression):
    args = [*MLP, "--set", f"cluster.compression={compression}", "--set", "cluster.bucket_mb=0.05"]
    cluster = Cluster(tmp_path, workers=2, args=args).start()
    codes = cluster.wait(timeout=150)
    assert all(code == 0 for code in codes.values()), cluster.logs()
    cluster.assert_replicas_equal([1, 2])
    summary = json.loads((cluster.out / "summary.json").read_text())
    assert summary["replica_mismatches"] == 0 and summary["test_accuracy"] > 90.0, summary["test_accuracy"]
