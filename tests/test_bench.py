"""The benchmark's own machinery: the slow-link proxy for real, and `python -m bench --quick` end to end.

No wall-clock assertions: the benchmark's numbers are for people to read, not for CI to judge.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from helpers import REPO, env

sys.path.insert(0, str(REPO))

from bench.proxy import LinkSpec, Pacer  # noqa: E402

PAYLOAD_BYTES = 3 * 1024 * 1024 + 17  # several reads and pacing slices, and not a round number


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def proxy():
    """Start `python -m bench.proxy ARGS` in front of a fresh upstream listener; yields (port, upstream, stderr)."""
    procs = []

    def start(*args: str) -> tuple[int, socket.socket, subprocess.Popen]:
        upstream = socket.create_server(("127.0.0.1", 0))
        upstream.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.proxy", "--upstream", f"127.0.0.1:{upstream.getsockname()[1]}", *args],
            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append((proc, upstream))
        line = proc.stdout.readline().split()
        assert line[:1] == ["PROXY_PORT"], proc.stderr.read()
        return int(line[1]), upstream, proc

    yield start
    for proc, upstream in procs:
        proc.kill()
        proc.wait()
        upstream.close()


@pytest.mark.parametrize("args", [
    [],
    ["--mbit", "2000", "--delay-ms", "1"],
    ["--mbit", "2000", "--delay-ms", "0.5", "--per-connection", "--quantum", "4096"],
], ids=["unlimited", "paced-delayed", "per-connection"])
def test_proxy_forwards_bytes_intact_both_ways(proxy, args):
    port, upstream, _ = proxy(*args)
    up, down = os.urandom(PAYLOAD_BYTES), os.urandom(PAYLOAD_BYTES // 3)
    got: dict[str, bytes] = {}

    def server_side() -> None:
        conn, _ = upstream.accept()
        with conn:
            conn.settimeout(30)
            conn.sendall(down)  # both directions in flight at once
            got["server"] = _recv_all(conn)

    thread = threading.Thread(target=server_side)
    thread.start()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        sender = threading.Thread(target=lambda: (client.sendall(up), client.shutdown(socket.SHUT_WR)))
        sender.start()
        got["client"] = _recv_all(client)
        sender.join(30)
    thread.join(30)
    assert got["server"] == up, f"client->server: {len(got['server'])} of {len(up)} bytes, or corrupted"
    assert got["client"] == down, f"server->client: {len(got['client'])} of {len(down)} bytes, or corrupted"


def test_proxy_reports_the_link_it_was_asked_for(proxy):
    port, _, proc = proxy("--mbit", "100", "--delay-ms", "5", "--per-connection")
    proc.kill()
    text = proc.stderr.read()
    assert f"proxy 127.0.0.1:{port}" in text and "100 Mbit/s, delay 5 ms each way, per connection" in text, text


def test_pacer_spaces_bytes_at_the_rate_and_banks_at_most_one_burst():
    now = [100.0]
    pacer = Pacer(rate=1000.0, burst=100, clock=lambda: now[0])  # 1000 bytes/s
    # Idle for a long time: only `burst` bytes are free, the rest waits its turn.
    assert pacer.release(100) == pytest.approx(100.0)
    assert pacer.release(500) == pytest.approx(100.5)
    assert pacer.release(500, backlogged=True) == pytest.approx(101.0)
    # A thread that wakes late on a busy link is not charged for its oversleep.
    now[0] = 101.3
    assert pacer.release(200, backlogged=True) == pytest.approx(101.2)
    # After idling again, the clock restarts from now (minus one burst).
    now[0] = 200.0
    assert pacer.release(100) == pytest.approx(200.0)


def test_link_spec_from_mbit():
    spec = LinkSpec.from_mbit(100, delay_ms=0.5)
    assert spec.rate == pytest.approx(12.5e6) and spec.delay_s == pytest.approx(5e-4)
    assert LinkSpec.from_mbit(None).rate is None


@pytest.mark.timeout(120)
def test_quick_benchmark_writes_the_expected_json(tmp_path):
    """The smallest case end to end: SimpleNN, 2 workers, one process and smolcluster fp32 on loopback
    (one cluster launch; the proxy has its own tests above)."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--systems", "single,smolcluster", "--variants", "fp32",
           "--links", "none",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"meta", "loopback", "models", "rows", "notes", "targets"} <= results.keys()
    assert {"cpu", "cores", "os", "torch", "plan"} <= results["meta"].keys()
    assert results["loopback"]["MB_per_s"] > 0
    assert results["models"]["SimpleNN"]["params"] == 784 * 128 + 128 + 128 * 10 + 10
    rows = {(r["system"], r["link"]): r for r in results["rows"]}
    assert set(rows) == {("single b", "none"), ("single b*N", "none"), ("smolcluster fp32", "loopback")}
    for row in rows.values():
        assert row["runs"] and not row["errors"], row
        assert {"median", "min", "max"} <= row["step_ms"].keys() and row["samples_per_s"] > 0
    smol = rows[("smolcluster fp32", "loopback")]
    assert smol["bytes"]["total"] == 2 * 2 * (36 + 4 * (101_770 + 1) + 8)  # 2 workers x GRAD + AVG frames
    assert smol["wire_ms"] > 0 and smol["comm_ms"] is not None
    assert "| smolcluster fp32 |" in (tmp_path / "results.md").read_text()


@pytest.mark.bench
@pytest.mark.timeout(120)
def test_gpu_benchmark_rows_on_the_cpu(tmp_path):
    """bench/gpu.py end to end with `--device cpu` (there only for this): 3 steps of its MLP, made small
    (hidden 256, 128), on a small synthetic set; the single, smolcluster and DDP rows and the copy share. Without a GPU and
    without that flag it measures nothing and exits 2."""
    no_gpu = subprocess.run([sys.executable, "-m", "bench.gpu", "--models", "mlp", "--out", str(tmp_path / "x.json")],
                            cwd=REPO, env=env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=60)
    assert no_gpu.returncode == 2 and "needs a CUDA GPU" in no_gpu.stderr, no_gpu.stderr[-3000:]
    assert not (tmp_path / "x.json").exists()
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick", "--models", "mlp", "--steps", "3",
           "--set", "dataset.name=synthetic", "--set", "dataset.train_size=256", "--set", "model.hidden=[256,128]",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["device"] == "cpu" and result["meta"]["gpu"] is None
    assert {"torch", "cpu", "uptime_before", "uptime_after"} <= result["meta"].keys()
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"single-cpu", "smolcluster-cpu", "ddp-gloo-cpu"}
    for row in rows.values():
        assert row["runs"] and not row["errors"], row
        assert row["step_ms"]["median"] > 0 and row["samples_per_s"] > 0 and row["ratio_to_single"] > 0
    copy = rows["smolcluster-cpu"]["copy"]
    assert copy["copy_ms"] > 0 and 0 < copy["copy_share_pct"] < 100, copy
    assert "| smolcluster-cpu |" in out.with_suffix(".md").read_text()


@pytest.mark.bench
@pytest.mark.timeout(120)
def test_tta_quick_writes_rows_with_time_or_not_reached(tmp_path):
    """bench/tta.py end to end on loopback (no root needed): time to accuracy of sync fp32 and diloco,
    and the final accuracy of FedAvg on a dirichlet split, each a real 2-worker cluster."""
    cmd = [sys.executable, "-m", "bench.tta", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tta.json").read_text())
    assert {"meta", "plan", "links", "tta", "ratios", "noniid", "targets", "notes"} <= result.keys()
    assert {"cpu", "cores", "commit", "command", "uptime_before", "uptime_after"} <= result["meta"].keys()
    rows = {r["system"]: r for r in result["tta"]}
    assert set(rows) == {"sync fp32", "diloco H=4"}
    for row in rows.values():
        assert not row.get("error") and row["link"] == "loopback" and row["evals"], row
        assert 0 <= row["final_accuracy"] <= 100 and row["ended"] in ("target", "finished", "cap")
        accs = [e["test_accuracy"] for e in row["evals"]]
        if row["reached"]:  # time and bytes of the first evaluation at the target
            hit = next(i for i, e in enumerate(row["evals"]) if e["step"] == row["step"])
            assert accs[hit] >= result["plan"]["target"] > max(accs[:hit], default=0), accs
            assert row["time_s"] == row["evals"][hit]["time_s"] >= 0 and row["bytes"] == row["evals"][hit]["bytes"] > 0
        else:
            assert row["time_s"] is None and row["bytes"] is None
    assert [e["system"] for e in result["ratios"]] == ["diloco H=4"]
    assert {"fp32", "int8"} <= result["ratios"][0].keys()
    noniid = result["noniid"]
    assert [(r["alpha"], r["local"]) for r in noniid] == [(0.1, True)]
    for row in noniid:
        assert not row.get("error") and 0 <= row["test_accuracy"] <= 100 and row["bytes"] > 0, row
    md = (tmp_path / "tta.md").read_text()
    assert "| loopback | sync fp32 |" in md and "## Part 2" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # the plot needs the `bench` dependency group
    assert (tmp_path / "tta.png").stat().st_size > 0
