"""A worker that is alive but not working: its heartbeats go on, its gradients stop.

The worker's compute thread is stalled with `--fault STEP:sleep:S` (the heartbeat thread keeps
running, so the connection looks healthy). The server must drop it for making no progress, and
must never queue more than a bounded amount of averages for a peer that reads nothing.
"""

from __future__ import annotations

import pytest

from helpers import Cluster

from bench.cluster import PeakRss

pytestmark = pytest.mark.timeout(120)

BASE = ["--set", "dataset.train_size=2048", "--set", "cluster.heartbeat_s=0.5", "--set", "cluster.step_timeout=0.2"]


def stalled_run(tmp, *extra: str) -> tuple[Cluster, float]:
    cluster = Cluster(tmp, workers=2, args=[*BASE, *extra])
    cluster.start({2: ["--fault", "10:sleep:8"]})
    cluster.wait_for_log("worker 2", "injecting fault sleep")
    rss = PeakRss(cluster.procs["server"].popen.pid)
    cluster.wait_for_log("server", "worker 2 dropped at step", timeout=30)
    growth = rss.stop()
    codes = cluster.wait(90)
    assert codes["server"] == 0 and codes["worker 1"] == 0, cluster.logs()
    assert codes["worker 2"] == 1  # it wakes up to a closed connection (cluster.reconnect is off)
    cluster.assert_replicas_equal([1])
    return cluster, growth


def test_a_stalled_worker_with_live_heartbeats_is_dropped_for_making_no_progress(tmp_path):
    cluster, growth = stalled_run(tmp_path, "--set", "cluster.worker_timeout=3")
    log = cluster.procs["server"].output
    assert "worker 2 dropped at step" in log and "delivered no gradient for 3 s while the others went on" in log, log[-3000:]
    assert "injecting fault sleep" in cluster.procs["worker 2"].output
    assert growth < 16, f"server memory grew {growth:.0f} MiB while worker 2 stalled"
    assert cluster.summary()["workers_dropped"] == 1


def test_a_peer_that_reads_nothing_is_dropped_once_its_queue_passes_the_bound(tmp_path):
    # worker_timeout is long: only the queue bound (1 MiB here, ~3 steps of averages) can drop it.
    cluster, growth = stalled_run(tmp_path, "--set", "cluster.worker_timeout=60",
                                  "--set", "cluster.max_send_queue_mb=1")
    log = cluster.procs["server"].output
    assert "fell behind:" in log and "(limit 1 MiB, cluster.max_send_queue_mb)" in log, log[-3000:]
    assert growth < 16, f"server memory grew {growth:.0f} MiB while worker 2 stalled"
