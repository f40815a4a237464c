"""The server's HTTP side during a real run: the state moves while it trains, /metrics parses with
prometheus_client and, after a run with injected faults, its counters equal summary.json's."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Cluster, free_port, wait_for

pytestmark = pytest.mark.timeout(180)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def test_status_moves_during_a_run_and_metrics_match_the_summary_after_faults(tmp_path):
    port = free_port()
    # 1024 samples, 2 workers: 64 steps; worker 2 sends NaN at step 5 and a late gradient at step 20.
    cluster = Cluster(tmp_path, workers=2, args=[
        "--set", f"cluster.http_port={port}", "--set", "cluster.http_linger_s=8", "--set", "dataset.train_size=1024",
        "--set", "cluster.step_timeout=0.5", "--set", "training.eval_steps=16"])
    cluster.start({2: ["--fault", "5:nan", "--fault", "20:sleep:2", "--fault", "30:sleep:0.05"]})
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ok(url), 60, "the dashboard to answer")
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (cluster.out / "summary.json").exists():
        status = json.loads(_get(url + "/api/status"))
        seen.append((status["cluster"].get("step", 0), status["cluster"].get("loss")))
        time.sleep(0.2)
    steps = [s for s, _ in seen]
    assert len(set(steps)) >= 3, seen  # it moved while we watched
    assert b"<title>smolcluster</title>" in _get(url + "/")
    wait_for(lambda: (cluster.out / "summary.json").exists(), 60, "the run to end")
    time.sleep(0.5)
    summary = json.loads((cluster.out / "summary.json").read_text())
    status = json.loads(_get(url + "/api/status"))
    assert [w["id"] for w in status["workers"]] == [1, 2] and all(w["device"].startswith("cpu") for w in status["workers"])
    assert any(e["kind"] == "rejected" for e in status["events"]) and any(e["kind"] == "late" for e in status["events"])
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(_get(url + "/metrics").decode()) for s in f.samples}
    pairs = {"late": "late_gradients", "nonfinite": "nonfinite_gradients", "outliers": "outlier_gradients",
             "rollbacks": "rollbacks", "dropped": "workers_dropped", "rejoined": "workers_rejoined",
             "refused": "connections_refused", "replica_mismatches": "replica_mismatches",
             "drift_resyncs": "drift_resyncs", "periodic_resyncs": "periodic_resyncs"}
    for kind, key in pairs.items():
        assert metrics[("smolcluster_failures_total", (("kind", kind),))] == summary[key], kind
    assert summary["nonfinite_gradients"] == 1 and summary["late_gradients"] >= 1
    assert metrics[("smolcluster_steps_total", ())] == summary["steps"]
    assert metrics[("smolcluster_test_accuracy", ())] == summary["test_accuracy"]
    cluster.wait(60)


def _ok(url: str) -> bool:
    try:
        return _get(url + "/healthz") == b"ok\n"
    except OSError:
        return False
