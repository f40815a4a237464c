"""Connection floods: a server with few open files outlives 1,000 idle connections, workers get
through a flood (a killed one rejoins), and a worker whose handshake is cut tries again.

Every test asserts on numbers (descriptor peaks, shed counts, replicas bit-equal to the server),
never on wall-clock speed (that is bench/reliability_flood.py's job), and every wait has a deadline.
"""

from __future__ import annotations

import re
import resource
import socket
import sys
import threading

import pytest

from helpers import Cluster, free_port, wait_for

from bench.cluster import nofile
from bench.hostile import Flood
from bench.reliability_flood import FdPeak, sheds
from smolcluster import wire
from smolcluster.admission import BUSY_FRAME
from smolcluster.wire import MsgType

pytestmark = pytest.mark.timeout(240)

# 1536 samples, batch 16: 48 steps per epoch with 2 workers, 2 epochs.
BASE = ["--set", "dataset.train_size=1536", "--set", "cluster.worker_timeout=20",
        "--set", "cluster.heartbeat_s=0.5", "--set", "cluster.handshake_timeout=2"]


def finished(cluster: Cluster, ok: list[str], timeout: float = 180) -> None:
    codes = cluster.wait(timeout)
    for name in ok:
        assert codes[name] == 0, f"{name} exited {codes[name]}:\n{cluster.logs()}"


def test_a_server_with_256_open_files_outlives_1000_idle_connections(tmp_path):
    cluster = Cluster(tmp_path, workers=2, args=BASE)
    server = cluster.start_server(preexec=nofile(256, 256))  # before the flood's thread exists
    cluster.wait_for_log("server", "listening on")
    fds = FdPeak(server.popen.pid, every=0.02)
    flood = Flood(cluster.port, n=1000, mode="idle", seconds=200)
    try:
        wait_for(lambda: flood.counts.opened >= 1000, 30, "1,000 flood connections")
        for k in (1, 2):
            cluster.start_worker(k)
        finished(cluster, ["server", "worker 1", "worker 2"])
    finally:
        counts = flood.stop()
        peak = fds.stop()
    log = cluster.procs["server"].output
    assert "open files: soft limit 256 (the hard limit; cannot raise it)" in log, log[:2000]
    assert "cap 96 total, 16 per address" in log  # (256 - 64 reserved) // 2
    assert fds.samples > 20 and 0 < peak < 256, (fds.samples, peak)
    assert sheds(log) >= 900, log[-3000:]  # nearly all of the first 1,000, and the reopened ones
    assert counts.opened >= 1000 and counts.busy >= 900 and counts.closed >= 900, counts
    assert "Traceback" not in log
    cluster.assert_replicas_equal([1, 2])
    assert cluster.summary()["replica_mismatches"] == 0


def test_a_killed_worker_rejoins_during_a_churn_flood(tmp_path):
    # Worker 1 stalls at step 12 so the restarted worker has time to start (it takes seconds).
    cluster = Cluster(tmp_path, workers=2, args=[*BASE, "--set", "cluster.step_timeout=60"])
    cluster.start_server()
    cluster.wait_for_log("server", "listening on")
    flood = Flood(cluster.port, n=1000, mode="churn", seconds=200)
    try:
        cluster.start_worker(1, "--fault", "12:sleep:15")
        cluster.start_worker(2, "--fault", "10:kill")
        cluster.wait_for_log("server", "worker 2 dropped at step 10", timeout=120)
        cluster.start_worker(2, name="worker 2 again")
        finished(cluster, ["server", "worker 1", "worker 2 again"])
    finally:
        counts = flood.stop()
    log = cluster.procs["server"].output
    assert "worker 2 rejoined" in log and "worker 2 is back in lockstep from step 13" in log, log[-3000:]
    assert counts.opened >= 2000 and counts.challenges >= 500, counts  # it churned all along
    assert re.search(r"(shed|more unauthenticated connections closed) .* in the last", log), log[-3000:]
    cluster.assert_replicas_equal([1, 2])
    summary = cluster.summary()
    assert summary["workers_rejoined"] == 1 and summary["replicas_verified"] == [1, 2]


HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


@pytest.mark.skipif(HARD != resource.RLIM_INFINITY and HARD <= 256, reason="the hard open-file limit is 256 or less")
def test_the_server_raises_its_soft_open_file_limit(tmp_path):
    want = 10240 if HARD == resource.RLIM_INFINITY else min(HARD, 10240)
    cluster = Cluster(tmp_path, workers=1, args=BASE)
    server = cluster.start_server(preexec=nofile(256))
    cluster.wait_for_log("server", "listening on")
    log = cluster.procs["server"].output
    assert f"open files: soft limit raised 256 -> {want}" in log, log[:2000]
    assert "cap 128 total, 16 per address" in log
    if sys.platform == "linux":
        import psutil

        assert psutil.Process(server.popen.pid).rlimit(psutil.RLIMIT_NOFILE) == (want, HARD)
    cluster.kill()


class Bouncer:
    """Stands in front of the server and cuts the first handshakes short as a flooded server does
    (`cuts`: 'busy' answers HELLO with the server's busy ERROR, 'close' closes instead of WELCOME),
    then passes connections through."""

    def __init__(self, upstream: int, cuts: list[str]) -> None:
        self.upstream, self.cuts = upstream, list(cuts)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            if self.cuts:
                self._cut(conn, self.cuts.pop(0))
                continue
            up = socket.create_connection(("127.0.0.1", self.upstream))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _cut(self, conn: socket.socket, how: str) -> None:
        with conn:
            wire.send_frame(conn, wire.frame(MsgType.CHALLENGE, {"nonce": "n" * 32, "auth": False}))
            wire.read_frame(conn, "worker", lambda h: memoryview(bytearray(h.length)))  # its HELLO
            if how == "busy":
                conn.sendall(BUSY_FRAME)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            a.settimeout(None)
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()


def test_a_worker_whose_handshake_is_cut_tries_again_and_joins(tmp_path):
    upstream = free_port()
    bouncer = Bouncer(upstream, ["busy", "close"])
    try:
        cluster = Cluster(tmp_path, workers=1, port=bouncer.port, args=BASE)
        cluster.start_server("--set", f"cluster.port={upstream}")
        cluster.wait_for_log("server", "listening on")
        cluster.start_worker(1)
        finished(cluster, ["server", "worker 1"])
    finally:
        bouncer.close()
    log = cluster.procs["worker 1"].output
    assert "server busy: too many connections waiting for a handshake; retry; trying again until " \
           "cluster.connect_timeout" in log, log[-3000:]
    assert "went through on try 3" in log, log[-3000:]


HUB_OUT_OF_FILES = r'''
import json, os, resource, sys
from smolcluster import wire
from smolcluster.hub import Hub
from smolcluster.wire import MsgType

resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


class Stub:
    """The server's handshake in short: CHALLENGE on connect; any HELLO authenticates."""

    def on_connect(self, peer):
        hub.send(peer, wire.frame(MsgType.CHALLENGE, {"nonce": "n" * 32, "auth": False}))

    def target(self, peer, header):
        return None

    def on_frame(self, peer, header, payload):
        peer.worker_id = len([p for p in hub.peers if p.worker_id]) + 1

    def on_drop(self, peer, why):
        pass


hub = Hub("127.0.0.1", 0, Stub(), heartbeat_s=60, silence_s=60, handshake_s=60)
failures = []
accept_failed = hub._accept_failed
hub._accept_failed = lambda e: failures.append(e.errno) or accept_failed(e)
files = []
while True:  # use up every descriptor but 3
    try:
        files.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
for fd in files[:3]:
    os.close(fd)
print("PORT", hub.port, flush=True)
while not os.path.exists(sys.argv[1]):
    hub.pump(0.05)
print(json.dumps({"failures": len(failures), "shed": hub.admission.shed_total,
                  "workers": sum(1 for p in hub.peers if p.worker_id), "pending": sum(1 for p in hub.peers if not p.worker_id)}))
'''


def test_out_of_descriptors_the_server_sheds_or_rests_and_never_dies(tmp_path):
    import json
    import subprocess
    import time

    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", HUB_OUT_OF_FILES, str(stop)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        workers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        for w in workers:  # the 3 free descriptors: accepted, and they authenticate
            wire.read_frame(w, "hub", lambda h: memoryview(bytearray(h.length)))
            wire.send_frame(w, wire.frame(MsgType.HELLO, {}))
        time.sleep(0.3)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(10)]
        time.sleep(2.0)  # accept() fails with EMFILE and nothing is left to shed: the hub rests, not spins
        for s in idle:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)  # not accepted: no CHALLENGE
        workers.pop().close()  # one descriptor frees up: each newcomer now sheds the one before it
        told = 0
        for s in idle[:-1]:
            s.settimeout(10)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            told += b"server busy" in data
        assert told >= 8, told
        stop.touch()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["workers"] == 2 and stats["pending"] == 1 and stats["shed"] >= 9, stats
    assert 2 <= stats["failures"] < 60, stats  # about 4 rests in 2 s, then one per shed; a spin makes thousands
    assert err.count("cannot accept connections: Too many open files") == 1, err[-3000:]
