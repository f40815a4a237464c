"""End to end: a real cluster logging to W&B offline, read back from the runs' `.wandb` files.

The same job also runs with W&B disabled; tracking must not change training by a single bit.
"""

from __future__ import annotations

import json

import pytest

from helpers import Cluster, assert_same_params
from smolcluster.config import ModelConfig
from smolcluster.models import build_model
from wandb_log import offline_runs

pytestmark = pytest.mark.timeout(240)

JOB = ["--set", "training.eval_steps=10", "--set", "training.track_gradients=true",
       "--set", "dataset.validation_split=0.125"]
STEPS = 28  # 512 samples / 2 workers, 1/8 of each shard held out: 224 / batch 16 = 14 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Cluster]:
    """The job twice, at once: W&B offline, and W&B disabled (helpers' default)."""
    offline = Cluster(tmp_path_factory.mktemp("offline"), args=[*JOB, "--set", "wandb.mode=offline"],
                      extra_env={"WANDB_MODE": "offline"})
    disabled = Cluster(tmp_path_factory.mktemp("disabled"), args=JOB)
    clusters = {"offline": offline.start(), "disabled": disabled.start()}
    for name, cluster in clusters.items():
        codes = cluster.wait(timeout=180)
        assert all(code == 0 for code in codes.values()), f"{name}: {codes}\n{cluster.logs()}"
    return clusters


def test_every_process_is_one_run_of_one_group(runs):
    found = offline_runs(runs["offline"].out)
    assert sorted(found) == ["server", "worker-1", "worker-2"], found
    groups = {r.group for r in found.values()}
    assert len(groups) == 1 and groups.pop().endswith("-SimpleNN-2w")
    assert {r.name: r.job_type for r in found.values()} == {"server": "server", "worker-1": "worker", "worker-2": "worker"}
    for run in found.values():
        assert run.project == "smolcluster" and run.exit_code == 0
        assert run.config["training"]["track_gradients"] is True
        assert run.config["dataset"]["name"] == "synthetic"
        assert run.config["cluster"]["num_workers"] == 2
        assert run.config["device"].startswith("cpu (")  # what the process computes on


def test_the_server_logs_one_row_per_step_with_every_metric(runs):
    server = offline_runs(runs["offline"].out)["server"]
    rows = server.history
    norms = {f"grad_norm/{name}" for name, _ in build_model(ModelConfig(), 42).named_parameters()}
    assert [r["_step"] for r in rows] == list(range(STEPS))
    for row in rows:
        for key in ("train/loss", "train/lr", "time/step_s", "time/wait_s", "time/communicate_s",
                    "time/compute_s", "net/bytes_in", "net/bytes_out", "workers/late_gradients"):
            assert key in row, (key, row)
        assert row["workers/present"] == 2
        assert norms <= set(row), sorted(row)  # every layer, in the step's one row
    evals = [r["_step"] for r in rows if "test/accuracy" in r]
    assert evals == [9, 19]  # eval_steps=10; the last step's eval is the final one, in the summary
    assert all("test/loss" in rows[s] for s in evals)
    summary = json.loads((runs["offline"].out / "summary.json").read_text())
    assert server.summary["test_accuracy"] == summary["test_accuracy"]
    assert server.summary["checksum"] == summary["checksum"]
    assert server.summary["step_ms"] == summary["step_ms"]


def test_workers_log_their_own_loss_and_the_global_one(runs):
    found = offline_runs(runs["offline"].out)
    server = found["server"].history
    workers = [found[f"worker-{k}"].history for k in (1, 2)]
    for rows in workers:
        assert [r["_step"] for r in rows] == list(range(STEPS))
        assert all({"worker/loss", "time/compute_s", "time/communicate_s"} <= set(r) for r in rows)
    for step in range(STEPS):
        # The averaged loss slot: the server's train/loss is the same float every worker got back.
        assert workers[0][step]["worker/global_loss"] == server[step]["train/loss"]
        mean = (workers[0][step]["worker/loss"] + workers[1][step]["worker/loss"]) / 2
        assert server[step]["train/loss"] == pytest.approx(mean, rel=1e-5)
    assert found["worker-1"].summary["test_accuracy"] == found["server"].summary["test_accuracy"]


def test_the_server_says_how_to_upload_the_offline_runs(runs):
    log = runs["offline"].procs["server"].output
    line = next(line for line in log.splitlines() if "wandb sync" in line)
    run_dir = line.rsplit("wandb sync ", 1)[1].strip()
    assert run_dir.startswith(str(runs["offline"].out / "wandb" / "offline-run-")), line


def test_disabled_writes_nothing_and_trains_bit_identically(runs):
    offline, disabled = runs["offline"], runs["disabled"]
    assert not (disabled.out / "wandb").exists()
    assert "W&B" not in disabled.procs["server"].output
    assert_same_params(offline.server_params(), disabled.server_params(), "W&B offline vs disabled (server)")
    for k in (1, 2):
        assert_same_params(offline.worker_params(k), disabled.worker_params(k), f"W&B offline vs disabled (worker {k})")


def test_every_worker_logs_its_own_validation_metrics(runs):
    """dataset.validation_split: each worker evaluates the part of its shard it held out."""
    found = offline_runs(runs["offline"].out)
    for k in (1, 2):
        rows = [r for r in found[f"worker-{k}"].history if "val/loss" in r]
        steps = [r["_step"] for r in rows]
        assert steps == [9, 19, STEPS - 1], steps  # every eval_steps (10) and after the last step
        assert all(0 <= r["val/accuracy"] <= 100 and r["val/loss"] > 0 for r in rows), rows
    first = [r["val/loss"] for r in found["worker-1"].history if "val/loss" in r]
    other = [r["val/loss"] for r in found["worker-2"].history if "val/loss" in r]
    assert first != other  # two workers, two held-out parts of two shards
    log = runs["offline"].procs["worker 1"].output
    assert "validation loss" in log and "(32 samples of worker 1's shard)" in log, log[-2000:]
