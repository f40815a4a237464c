"""web.py: the read-only HTTP side of the server, served for real on a loopback port; status.py's
`smolcluster status` reading it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import raw_http
from smolcluster.runner import free_port
from smolcluster.web import Board, serve


@pytest.fixture
def board_url():
    board = Board({"algorithm": "sync", "total_steps": 10, "workers_expected": 2})
    httpd = serve(board, "127.0.0.1", free_port())
    assert httpd is not None
    yield board, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_status_and_metrics_show_what_the_training_loop_posted(board_url):
    board, url = board_url
    board.worker(1, host="mini1", device="mps", state="joined")
    board.event("joined", "worker 1 joined", 1)
    board.step({"step": 3, "loss": 0.5, "bytes": 1234, "samples": 96, "workers_present": 1},
               {"late": 2, "nonfinite": 1}, {"step": 3, "loss": 0.5, "step_s": 0.01})
    board.worker(1, last_step=2)
    board.evaluation({"step": 3, "test_accuracy": 91.5, "test_loss": 0.3})
    assert _get(url + "/healthz") == (200, b"ok\n")
    status = json.loads(_get(url + "/api/status")[1])
    assert status["cluster"]["step"] == 3 and status["workers"][0]["device"] == "mps"
    assert status["counters"] == {"late": 2, "nonfinite": 1} and status["events"][0]["kind"] == "joined"
    families = {f.name: f for f in text_string_to_metric_families(_get(url + "/metrics")[1].decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("smolcluster_steps_total", ())] == 3
    assert samples[("smolcluster_failures_total", (("kind", "late"),))] == 2
    assert samples[("smolcluster_test_accuracy", ())] == 91.5
    assert samples[("smolcluster_worker_last_step", (("worker", "1"),))] == 2


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_it_is_read_only(board_url, method):
    assert _get(board_url[1] + "/api/status", method)[0] == 405


def test_unknown_paths_and_garbage_get_4xx_and_the_server_keeps_answering(board_url):
    _, url = board_url
    assert _get(url + "/etc/passwd")[0] == 404
    port = int(url.rsplit(":", 1)[1])
    for junk, code in ((b"\x00\xff garbage\r\n\r\n", b"400"), (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414")):
        answer = raw_http(port, junk)
        assert code in answer, answer[:200]
    assert _get(url + "/healthz")[0] == 200


def test_status_prints_the_state_and_fails_cleanly_without_a_server(board_url, capsys):
    from smolcluster.status import print_status

    board, url = board_url
    board.worker(2, host="mini2", device="cpu", state="dropped")
    board.step({"step": 4, "loss": 0.25, "workers_present": 1}, {"dropped": 1}, {"step": 4})
    assert print_status(url) == 0
    out = capsys.readouterr().out
    assert "step 4/10" in out and "worker 2: dropped" in out and "dropped 1" in out
    assert print_status(f"http://127.0.0.1:{free_port()}") == 1


def test_a_taken_port_is_logged_and_nothing_else(board_url):
    _, url = board_url
    assert serve(Board({}), "127.0.0.1", int(url.rsplit(":", 1)[1])) is None


def test_a_workers_step_parts_and_bytes_reach_metrics_and_status(board_url, capsys):
    from smolcluster.status import print_status

    board, url = board_url
    board.worker(1, host="mini1", device="cpu", state="joined")
    board.worker(1, compute_s=0.012, wait_s=0.003, comm_s=0.0015, bytes_sent=2_500_000, bytes_received=2_400_000)
    board.step({"step": 5, "loss": 0.4}, {}, {"step": 5})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(_get(url + "/metrics")[1].decode()) for s in f.samples}
    for part, value in (("compute", 0.012), ("wait", 0.003), ("communicate", 0.0015)):
        assert samples[("smolcluster_worker_step_seconds", (("part", part), ("worker", "1")))] == value
    assert samples[("smolcluster_worker_sent_bytes_total", (("worker", "1"),))] == 2_500_000
    assert samples[("smolcluster_worker_received_bytes_total", (("worker", "1"),))] == 2_400_000
    assert print_status(url) == 0
    out = capsys.readouterr().out
    assert "compute 12.0 / wait 3.0 / comm 1.5 ms  sent 2.5 MB, received 2.4 MB" in out, out


def test_a_late_worker_is_late_until_its_next_gradient_on_time():
    board = Board({})
    board.worker(1, state="rejoined")
    board.late(1)
    board.late(1)  # twice late: still back to what it was before
    assert board.snapshot()["workers"][0]["state"] == "late"
    board.on_time(1, last_step=7)
    row = board.snapshot()["workers"][0]
    assert row["state"] == "rejoined" and row["last_step"] == 7
    board.on_time(1, last_step=8)
    assert board.snapshot()["workers"][0]["state"] == "rejoined"
