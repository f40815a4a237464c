"""The server's HTTP side during a real run: the state moves while it trains, hostile requests are
refused without disturbing it, /metrics parses with prometheus_client and, after a run with
injected faults, its counters equal summary.json's, which count those faults and nothing else."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Cluster, free_port, raw_http, wait_for

pytestmark = pytest.mark.timeout(180)

HOSTILE = {  # request bytes -> the status it must get (or the connection is closed without one)
    b"\x00\xff\xfe garbage\r\n\r\n": b"400",
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n": b"414",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"h" * 100_000 + b"\r\n\r\n": b"431",
    b"POST /api/status HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n{\"step\": 0}": b"405",
    b"PUT /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"p" * 5000: b"405",
    b"DELETE / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nall": b"405",
}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def _code(answer: bytes) -> bytes | None:
    """The status of an answer; a request line too broken to have a version is answered as
    HTTP/0.9 (no status line), the code is in the body then."""
    found = re.match(rb"HTTP/1\.\d (\d{3}) ", answer) or re.search(rb"Error code: (\d{3})", answer)
    return found.group(1) if found else None


def _attack(url: str, port: int) -> socket.socket:
    """Every hostile request at once, plus 60 honest GETs; returns a slowloris left hanging."""
    slow = socket.create_connection(("127.0.0.1", port), timeout=15)
    slow.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")  # half a request, then nothing
    with ThreadPoolExecutor(16) as pool:
        hostile = {data: pool.submit(raw_http, port, data) for data in HOSTILE}
        honest = [pool.submit(_get, url + path) for path in ("/api/status", "/metrics", "/healthz") * 20]
        for data, code in HOSTILE.items():
            answer = hostile[data].result()
            assert answer == b"" or _code(answer) == code, (data[:60], answer[:200])
        assert all(f.result() for f in honest)
    assert _get(url + "/healthz") == b"ok\n"  # right after, with the slowloris still hanging
    return slow


def test_status_moves_during_a_run_and_metrics_match_the_summary_after_faults(tmp_path):
    port = free_port()
    # 1024 samples, 2 workers: 64 steps; worker 2 sends NaN at step 5 and a late gradient at step 20.
    cluster = Cluster(tmp_path, workers=2, args=[
        "--set", f"cluster.http_port={port}", "--set", "cluster.http_linger_s=8", "--set", "dataset.train_size=1024",
        "--set", "cluster.step_timeout=0.5", "--set", "training.eval_steps=16"])
    cluster.start({2: ["--fault", "5:nan", "--fault", "20:sleep:2", "--fault", "30:sleep:0.05"]})
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ok(url), 60, "the dashboard to answer")
    seen, slow, attacked_at = [], None, 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (cluster.out / "summary.json").exists():
        status = json.loads(_get(url + "/api/status"))
        seen.append((status["cluster"].get("step", 0), status["cluster"].get("loss")))
        if slow is None and seen[-1][0] > 0:  # training has started: attack while it goes on
            slow, attacked_at = _attack(url, port), seen[-1][0]
        time.sleep(0.2)
    steps = [s for s, _ in seen]
    assert len(set(steps)) >= 3, seen  # it moved while we watched
    assert slow is not None and max(steps) > attacked_at, seen  # and went on after the attack
    assert b"<title>smolcluster</title>" in _get(url + "/")
    wait_for(lambda: (cluster.out / "summary.json").exists(), 60, "the run to end")
    time.sleep(0.5)
    summary = json.loads((cluster.out / "summary.json").read_text())
    status = json.loads(_get(url + "/api/status"))
    assert [w["id"] for w in status["workers"]] == [1, 2] and all(w["device"].startswith("cpu") for w in status["workers"])
    for w in status["workers"]:  # each reported its step's parts and its bytes (about once a second)
        assert all(0 <= w[k] < 5 for k in ("compute_s", "wait_s", "comm_s")), w
        assert w["bytes_sent"] > 0 and w["bytes_received"] > 0, w
    assert any(e["kind"] == "rejected" for e in status["events"]) and any(e["kind"] == "late" for e in status["events"])
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(_get(url + "/metrics").decode()) for s in f.samples}
    pairs = {"late": "late_gradients", "nonfinite": "nonfinite_gradients", "outliers": "outlier_gradients",
             "rollbacks": "rollbacks", "dropped": "workers_dropped", "rejoined": "workers_rejoined",
             "refused": "connections_refused", "replica_mismatches": "replica_mismatches",
             "drift_resyncs": "drift_resyncs", "periodic_resyncs": "periodic_resyncs"}
    for kind, key in pairs.items():
        assert metrics[("smolcluster_failures_total", (("kind", kind),))] == summary[key], kind
    # the injected faults and nothing else: the HTTP attack cost training nothing
    assert summary["nonfinite_gradients"] == 1 and summary["late_gradients"] >= 1
    assert not any(summary[key] for key in pairs.values() if key not in ("nonfinite_gradients", "late_gradients"))
    assert summary["connections_shed"] == 0
    assert metrics[("smolcluster_steps_total", ())] == summary["steps"] == 64
    assert metrics[("smolcluster_test_accuracy", ())] == summary["test_accuracy"]
    assert ("smolcluster_worker_step_seconds", (("part", "communicate"), ("worker", "2"))) in metrics
    assert metrics[("smolcluster_worker_sent_bytes_total", (("worker", "1"),))] > 0
    slow.settimeout(5)
    assert slow.recv(4096) == b""  # the slowloris was closed (after the handler's 5 s), unanswered
    slow.close()
    cluster.wait(60)


def _ok(url: str) -> bool:
    try:
        return _get(url + "/healthz") == b"ok\n"
    except OSError:
        return False
