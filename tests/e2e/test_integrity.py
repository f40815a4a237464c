"""Frame integrity with real processes: a joined worker that announces more gradient bytes than it
sends is named and dropped, and not one byte of its frame reaches the average.

The proof is numerical: the run ends with parameters bit-identical to the same run in which that
worker simply disconnects at the same point (its frame, read by its length, would otherwise have
averaged the next frame's header and a canary of 1e3s into every parameter of the bucket).
"""

from __future__ import annotations

import pytest

from helpers import Cluster, assert_same_params

from bench.hostile import joined, misannounced
from smolcluster.config import Config, load_config

pytestmark = pytest.mark.timeout(150)

# Admission by norm off: the canary must be refused by the frame check alone, not as an outlier.
ARGS = ["--set", "cluster.worker_timeout=20", "--set", "cluster.heartbeat_s=0.5",
        "--set", "cluster.handshake_timeout=10", "--set", "cluster.outlier_factor=0"]


def config_of(cluster: Cluster) -> Config:
    """The job exactly as the cluster's processes load it (every flag is a `--set`)."""
    flags = cluster.common()
    assert flags[0::2] == ["--set"] * (len(flags) // 2), flags
    return load_config(None, None, flags[1::2])


def run_with_rogue(cluster: Cluster, misbehave: bool) -> str:
    """Server + real worker 1; worker 2 is a raw socket that joins, then misannounces or just leaves."""
    cluster.start_server()
    cluster.wait_for_log("server", "listening on", 60)
    cluster.start_worker(1)
    cfg = config_of(cluster)
    sock = joined(cluster.port, cfg, 2)
    try:
        answer = misannounced(sock, cfg, 2) if misbehave else "disconnected"
    finally:
        sock.close()
    codes = cluster.wait(90)
    assert codes == {"server": 0, "worker 1": 0}, cluster.logs()
    return answer


def test_a_misannounced_gradient_is_refused_and_never_averaged(tmp_path):
    reference = Cluster(tmp_path / "leaves", workers=2, args=ARGS)
    run_with_rogue(reference, misbehave=False)
    cluster = Cluster(tmp_path / "misannounces", workers=2, args=ARGS)
    answer = run_with_rogue(cluster, misbehave=True)

    assert "GRAD frame for step 0 failed its checksum" in answer, answer
    log = cluster.procs["server"].output
    for line in ["protocol error from worker 2", "GRAD frame for step 0 failed its checksum",
                 "a frame announced more bytes than it carried?", "worker 2 dropped at step 0"]:
        assert line in log, f"server log lacks {line!r}:\n{log[-4000:]}"
    assert "Traceback" not in log
    summary = cluster.summary()
    assert summary["workers_dropped"] == 1 and summary["late_gradients"] == 0
    assert summary["nonfinite_gradients"] == 0 and summary["replica_mismatches"] == 0
    cluster.assert_replicas_equal([1])
    assert_same_params(cluster.server_params(), reference.server_params(), "misannounced run vs the rogue leaving")
