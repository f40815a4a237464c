"""The local modes (local_sgd / FedAvg, diloco) with real processes: built right (one local step
is a synchronous step), deterministic, every replica equal to the server after every round, and
a server killed mid-run resumes to the parameters of an uninterrupted run.

The inner optimizer is plain SGD here: it keeps no state on the workers, so a resumed run can be
compared bit for bit (DiLoCo's outer momentum lives on every replica and in the checkpoints).
"""

from __future__ import annotations

import signal

import pytest
import torch

from helpers import Cluster, assert_same_params, wait_for

pytestmark = pytest.mark.timeout(240)

# synthetic, 512 samples, 2 workers at batch 16, 2 epochs: 32 local steps each (helpers.FAST)
SGD = ["--set", "training.optimizer=sgd", "--set", "training.learning_rate=0.05", "--set", "training.lr_schedule=constant"]
MODES = {
    "local_sgd": ["--set", "training.algorithm=local_sgd"],
    "diloco": ["--set", "training.algorithm=diloco"],  # outer lr 0.7, Nesterov momentum 0.9
}
ROUNDS = [*SGD, "--set", "training.local_steps=4", "--set", "cluster.checksum_steps=1"]  # 8 rounds
RESUME = ["--set", "cluster.checkpoint_steps=2", "--set", "cluster.step_timeout=60", "--set", "cluster.reconnect=true",
          "--set", "cluster.connect_timeout=90", "--set", "cluster.heartbeat_s=0.5"]


def finished(cluster: Cluster, names: list[str] | None = None, timeout: float = 200) -> Cluster:
    codes = cluster.wait(timeout)
    for name in names or list(codes):
        assert codes[name] == 0, f"{name} exited {codes[name]}:\n{cluster.logs()}"
    return cluster


def test_one_local_step_is_a_synchronous_step(tmp_path):
    """H=1, plain SGD, an outer step of lr 1 without momentum: local_sgd and diloco give sync's parameters."""
    one = [*SGD, "--set", "training.local_steps=1"]
    runs = {name: Cluster(tmp_path / name, workers=2, args=[*one, *flags]).start() for name, flags in {
        "sync": [],
        "local_sgd": MODES["local_sgd"],
        "diloco": [*MODES["diloco"], "--set", "training.outer_lr=1", "--set", "training.outer_momentum=0"],
    }.items()}
    for cluster in runs.values():
        finished(cluster)
    sync = runs["sync"].server_params()
    for name in ("local_sgd", "diloco"):
        got = runs[name].server_params()
        assert runs[name].summary()["steps"] == runs["sync"].summary()["steps"] == 32
        for key, value in sync.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def rounds(tmp_path_factory) -> dict[str, Cluster]:
    """Each mode uninterrupted, at once; then each mode again with its server killed after round 5
    and resumed from the checkpoint of round 4 (the workers reconnect and are resynced). The second
    run is a rerun too: it replays rounds 0-4 from the start before its server dies."""
    out = {}
    for mode, flags in MODES.items():
        out[f"{mode}-a"] = Cluster(tmp_path_factory.mktemp(f"{mode}-a"), workers=2,
                                   args=[*ROUNDS, *RESUME, *flags]).start()
    for mode, flags in MODES.items():
        resumed = Cluster(tmp_path_factory.mktemp(f"{mode}-resumed"), workers=2, args=[*ROUNDS, *RESUME, *flags])
        resumed.start_server("--fault", "5:kill")
        for k in (1, 2):
            resumed.start_worker(k)
        out[f"{mode}-resumed"] = resumed
    for name, cluster in out.items():
        if name.endswith("resumed"):
            wait_for(lambda: cluster.procs["server"].popen.poll() is not None, 120, "the server to crash")
            assert cluster.procs["server"].popen.returncode == -signal.SIGKILL
            cluster.spawn("server again", cluster.procs["server"].popen.args[:3] + ["server", "--resume", *cluster.common()])
            finished(cluster, ["server again", "worker 1", "worker 2"])
        else:
            finished(cluster)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_every_round_leaves_every_replica_equal(rounds, mode):
    a = rounds[f"{mode}-a"]
    summary = a.summary()
    assert summary["steps"] == 8 and summary["replica_mismatches"] == 0  # a checksum after every round
    assert summary["replicas_verified"] == [1, 2]
    a.assert_replicas_equal([1, 2])
    assert f"training {'SimpleNN'} for 8 rounds of 4 local steps" in a.procs["server"].output


@pytest.mark.parametrize("mode", list(MODES))
def test_a_rerun_resumed_after_a_crash_ends_bit_identical_to_an_uninterrupted_one(rounds, mode):
    """Bit-identical reruns and a lossless resume at once: any difference in either would show."""
    resumed = rounds[f"{mode}-resumed"]
    assert "resuming from" in resumed.procs["server again"].output
    assert_same_params(rounds[f"{mode}-a"].server_params(), resumed.server_params(), f"{mode}: resumed")
    resumed.assert_replicas_equal([1, 2])


def test_balance_gives_a_slow_machine_less_work_in_sync_and_in_local_modes(tmp_path):
    """Worker 2 is made 1 ms per sample slower: after measuring, the server hands it the smaller
    batch (sync) or fewer local steps (local_sgd); the runs finish with every replica equal. The
    local run also sends its changes as int8 with error feedback, and worker 1's change of round 3
    is NaN: refused for that round like a NaN gradient."""
    base = ["--set", "training.balance=true", "--set", "dataset.train_size=1024"]
    local = [*MODES["local_sgd"], "--set", "training.local_steps=2", "--set", "cluster.compression=int8"]
    runs = {mode: Cluster(tmp_path / mode, workers=2, args=[*base, *flags]).start(
                {2: ["--fault", "0:slow:0.001"], **({1: ["--fault", "3:nan"]} if flags else {})})
            for mode, flags in {"sync": [], "local_sgd": local}.items()}
    for mode, cluster in runs.items():
        finished(cluster)
        plans = cluster.summary()["balance"]["plans"]
        key = "batch" if mode == "sync" else "local_steps"
        assert plans["1"][key] > plans["2"][key], (mode, plans)
        assert "balanced by the server from step" in cluster.procs["worker 2"].output
        assert cluster.summary()["replicas_verified"] == [1, 2]
        cluster.assert_replicas_equal([1, 2])
    assert runs["local_sgd"].summary()["nonfinite_gradients"] == 1
    assert "step 3: rejected a non-finite (NaN/Inf) gradient from worker 1" in runs["local_sgd"].procs["server"].output
