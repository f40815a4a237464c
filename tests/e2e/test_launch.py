"""launch.sh end to end, over a real sshd with host-key checking on.

The test starts sshd on a free loopback port with a throwaway host key and client key; three hosts
(alpha: the server, beta and gamma: workers 1 and 2) are all 127.0.0.1 under different names. alpha
and beta share a folder (one copy of the code) and run the test's own Python (the `python` option);
gamma gets its own folder and a real `uv sync` (offline, from the warm uv cache).

Secrets: WANDB_API_KEY and SMOLCLUSTER_TOKEN are set for launch.sh; a watcher samples every
process's command line while launch.sh works and must never see them, yet the started server must
have them in its environment.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from helpers import FAST, REPO, free_port, wait_for

SSHD = Path("/usr/sbin/sshd")
LAUNCH = REPO / "launch.sh"
IN_CI = bool(os.environ.get("CI"))

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not IN_CI and not (SSHD.exists() and shutil.which("ssh-keygen")),
                       reason="needs openssh-server (apt-get install openssh-server); CI installs it"),
    pytest.mark.skipif(not IN_CI and os.geteuid() != 0, reason="runs sshd, which needs root here"),
]

SECRETS = {"WANDB_API_KEY": f"wandb-secret-{uuid.uuid4().hex}", "SMOLCLUSTER_TOKEN": f"token-{uuid.uuid4().hex}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Keys and host folders shared by the module's tests (the second `up` reuses the synced env)."""
    root = tmp_path_factory.mktemp("launch")
    for name in ("hostkey", "clientkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    return root


@dataclass
class Site:
    """One sshd and the cluster config, ssh config and environment launch.sh runs with."""

    root: Path
    port: int
    sshd: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.root / "state"

    def launch(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        return subprocess.run([str(LAUNCH), *args, "--state", str(self.state)], env=self.env, cwd=self.root,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str, timeout: float = 150) -> str:
        r = self.launch(*args, timeout=timeout)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"launch.sh {' '.join(args)} exited {r.returncode}:\n{out}\n{self.sshd_log()}"
        return out

    def up(self, *extra: str) -> str:
        return self.ok("up", "--cluster-config", str(self.root / "cluster.yaml"), *FAST,
                       "--set", f"cluster.port={free_port()}", *extra, "--timeout", "90")

    def sshd_log(self) -> str:
        log = self.root / f"sshd-{self.port}.log"
        return f"--- sshd log ---\n{log.read_text()[-3000:]}" if log.exists() else ""

    def ours(self) -> list[str]:
        """Command lines of every live process that runs from one of the host folders."""
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if str(self.root / "host-") in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid}: {cmd}")
        return found


def write_configs(root: Path, port: int, known_hosts: str) -> None:
    (root / "known_hosts").write_text(known_hosts)
    python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    # Test plumbing, not launch.sh's: no network (uv sync from the cache) and the same Python.
    (root / "ssh_config").write_text(
        f"UserKnownHostsFile {root / 'known_hosts'}\nStrictHostKeyChecking yes\n"
        f"SetEnv UV_OFFLINE=1 UV_PYTHON={python}\n"
    )
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is not on PATH"
    # host_ip is a map without a default: a worker not told its host name (--host) could not start.
    (root / "cluster.yaml").write_text(f"""\
host_ip: {{alpha: 127.0.0.1, beta: 127.0.0.1, gamma: 127.0.0.1}}
bind: 127.0.0.1
server: alpha
workers: [beta, gamma]
ssh:
  default: {{address: 127.0.0.1, user: {getpass.getuser()}, port: {port}, key: {root / 'clientkey'}}}
  alpha: {{dir: {root / 'host-a'}, python: {sys.executable}}}
  beta: {{dir: {root / 'host-a'}, python: {sys.executable}}}
  gamma: {{dir: {root / 'host-b'}, uv: {uv}}}
""")


def start_sshd(root: Path, trusted: bool = True) -> Site:
    if not SSHD.exists():
        pytest.fail("CI must install openssh-server (.ci/run does)")
    port = free_port()
    config = root / f"sshd-{port}.conf"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'hostkey'}\n"
        f"AuthorizedKeysFile {root / 'clientkey.pub'}\nUsePAM no\nStrictModes no\nPidFile none\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nAcceptEnv UV_OFFLINE UV_PYTHON\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    log = (root / f"sshd-{port}.log").open("w")
    sshd = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    host_key = (root / "hostkey.pub").read_text().split()
    write_configs(root, port, f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n" if trusted else "")
    site = Site(root, port, sshd)
    site.env = {**os.environ, **SECRETS, "SMOLCLUSTER_SSH_CONFIG": str(root / "ssh_config"),
                "SMOLCLUSTER_SEND_ENV": "SMOLCLUSTER_TEST_MARK", "SMOLCLUSTER_TEST_MARK": "sent"}

    def listening() -> bool:
        assert sshd.poll() is None, f"sshd exited with {sshd.returncode}\n{site.sshd_log()}"
        return any(c.laddr.port == port for c in psutil.net_connections("tcp") if c.status == "LISTEN")

    wait_for(listening, 20, f"sshd on port {port}")
    return site


@pytest.fixture
def site(root):
    site = start_sshd(root)
    try:
        yield site
    finally:
        if (site.state / "hosts").exists():
            site.launch("down", timeout=60)
        for line in site.ours():  # last resort, so a failing test leaks nothing
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        site.sshd.terminate()
        site.sshd.wait(timeout=10)


class Watch:
    """Samples every process's command line, and the secrets file's mode, while launch.sh works."""

    def __init__(self, root: Path) -> None:
        self.root, self.leaks, self.modes, self.samples = root, [], set(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in psutil.process_iter(["cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                self.leaks += [f"{name} in `{cmd}`" for name, v in SECRETS.items() if v in cmd]
            for env in self.root.glob("host-*/launch/env"):
                try:
                    self.modes.add(stat.S_IMODE(env.stat().st_mode))
                except FileNotFoundError:
                    pass
            self.samples += 1
            time.sleep(0.05)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def test_up_wait_status_logs_down(site, tmp_path):
    with Watch(site.root) as watch:
        out = site.up()
    assert "server on alpha: listening on 127.0.0.1:" in out, out
    assert "worker-2 on gamma: joined the server" in out, out
    assert watch.samples > 10 and not watch.leaks, watch.leaks
    assert watch.modes == {0o600}, f"the secrets file was seen with modes {watch.modes} (or never)"
    assert not list(site.root.glob("host-*/launch/env")), "up must delete the secrets file when done"

    out = site.ok("wait", "--timeout", "90")
    for proc in ("server on alpha", "worker-1 on beta", "worker-2 on gamma"):
        assert f"{proc}: exited 0" in out, out
    out = site.ok("status")
    assert out.count("exited 0") == 3, out
    assert out.rstrip().endswith("dashboard: off (cluster.http_port is 0)"), out

    site.ok("logs", str(tmp_path / "logs"))
    assert "test accuracy:" in (tmp_path / "logs" / "server.log").read_text()
    for k in (1, 2):
        assert "training done" in (tmp_path / "logs" / f"worker-{k}.log").read_text()

    # A pid file that names someone else's process by now: down must leave that process alone.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (site.root / "host-b" / "launch" / "worker-2.exit").unlink()
        (site.root / "host-b" / "launch" / "worker-2.pid").write_text(f"{bystander.pid}\n")
        out = site.ok("down")
        assert "worker-2 on gamma: not running" in out and "left alone" in out, out
        assert bystander.poll() is None, "down killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()
    assert site.ours() == []


def test_up_wait_logs_down_on_the_torch_backend(site, tmp_path):
    """No server: worker 1 (rank 0) holds the rendezvous, leads, and writes the result."""
    out = site.up("--set", "cluster.backend=torch")
    assert "server on alpha" not in out, out
    for proc, host in (("worker-1", "beta"), ("worker-2", "gamma")):
        assert f"{proc} on {host}: joined the rendezvous at 127.0.0.1:" in out, out
    out = site.ok("wait", "--timeout", "90")
    assert out.count("exited 0") == 2 and "server on alpha" not in out, out
    site.ok("logs", str(tmp_path / "logs"))
    assert "test accuracy:" in (tmp_path / "logs" / "worker-1.log").read_text()
    assert not (tmp_path / "logs" / "server.log").exists()
    site.ok("down")
    assert site.ours() == []


def test_down_stops_a_running_cluster_and_secrets_travel_only_on_stdin(site):
    http = free_port()
    with Watch(site.root) as watch:
        site.up("--set", "training.num_epochs=100000", "--set", f"cluster.http_port={http}")
        out = site.ok("status")
        assert out.count("running (pid") == 3, out
        _open_the_dashboard_as_status_says(site, out, http)

        pids = {p: int((site.root / d / "launch" / f"{p}.pid").read_text())
                for p, d in (("server", "host-a"), ("worker-1", "host-a"), ("worker-2", "host-b"))}
        env = psutil.Process(pids["server"]).environ()
        for name, value in SECRETS.items():
            assert env.get(name) == value, f"{name} did not reach the server"
        assert env.get("SMOLCLUSTER_TEST_MARK") == "sent", "SMOLCLUSTER_SEND_ENV was not honoured"

        out = site.ok("down")
    assert not watch.leaks, watch.leaks
    # The server goes first; a worker may notice that and exit on its own before its turn comes.
    assert f"server on alpha: stopped pid {pids['server']}" in out, out
    for k, host in ((1, "beta"), (2, "gamma")):
        assert re.search(rf"worker-{k} on {host}: (stopped pid {pids[f'worker-{k}']}|not running \(exited)", out), out
    wait_for(lambda: site.ours() == [], 10, "every process launch.sh started to be gone")
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in pids.values())
    r = site.launch("status")
    assert r.returncode != 0 and "exited 0" not in r.stdout, r.stdout + r.stderr


def _open_the_dashboard_as_status_says(site: Site, status: str, http: int) -> None:
    """status's last line names the ssh tunnel to the server's loopback-only dashboard: open it
    (on another local port: here the dashboard itself has this one) and ask through it."""
    found = re.search(rf"^dashboard: on alpha at http://127.0.0.1:{http}/, bound to 127.0.0.1 \(cluster.http_bind\): "
                      rf"from here, (ssh -N -L {http}:127.0.0.1:{http} .*@127.0.0.1) and open http://127.0.0.1:{http}/$",
                      status, re.MULTILINE)
    assert found, status
    tunnel = free_port()
    argv = found.group(1).replace(f"-L {http}:", f"-L {tunnel}:").split()
    ssh = subprocess.Popen([argv[0], "-F", str(site.root / "ssh_config"), "-o", "BatchMode=yes",
                            "-o", "ExitOnForwardFailure=yes", *argv[1:]], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def answers() -> bool:
            assert ssh.poll() is None, ssh.stderr.read().decode()[-2000:] if ssh.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{tunnel}/healthz", timeout=5) as r:
                    return r.read() == b"ok\n"
            except OSError:
                return False

        wait_for(answers, 30, "the dashboard through the ssh tunnel")
    finally:
        ssh.terminate()
        ssh.wait(timeout=10)


def test_an_unknown_host_key_is_refused(root):
    site = start_sshd(root, trusted=False)
    try:
        r = site.launch("up", "--cluster-config", str(root / "cluster.yaml"), *FAST)
    finally:
        site.sshd.terminate()
        site.sshd.wait(timeout=10)
    assert r.returncode != 0
    assert "Host key verification failed" in r.stderr, r.stdout + r.stderr
