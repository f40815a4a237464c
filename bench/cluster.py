"""Real smolcluster processes over loopback, started one by one as a user would in separate terminals.

Shared by the end-to-end tests (`tests/helpers.py` adds the tiny test job) and the reliability
report (`bench/reliability.py`, real MNIST). Nothing in the library imports this.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smolcluster(*args: str) -> list[str]:
    return [sys.executable, "-m", "smolcluster", *args]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "SMOLCLUSTER_TOKEN"}
    return {**base, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true", **extra}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)
    """Wall-clock time (time.time()) it was started at."""

    @property
    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@dataclass
class Cluster:
    """A server and workers started by hand; `base` + `args` are the `--set` flags every process gets."""

    tmp: Path
    workers: int = 2
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    base: list[str] = field(default_factory=list)
    program: list[str] = field(default_factory=lambda: smolcluster())
    """The command that is the server or a worker given the subcommand (a Job's script, say)."""

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def common(self) -> list[str]:
        return [*self.base, "--set", f"cluster.port={self.port}", "--set", f"cluster.num_workers={self.workers}",
                "--set", f"training.out_dir={self.out}", *self.args]

    def spawn(self, name: str, argv: list[str], preexec: Callable[[], None] | None = None) -> Proc:
        """Start a process logging to tmp/<name>.log; `preexec` runs in the child before exec (see nofile)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        log = self.tmp / f"{name.replace(' ', '-')}.log"
        with log.open("w") as f:
            popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env(**self.extra_env), cwd=REPO,
                                     start_new_session=True, preexec_fn=preexec)
        self.procs[name] = Proc(name, popen, log)
        return self.procs[name]

    def start_server(self, *extra: str, name: str = "server", preexec: Callable[[], None] | None = None) -> Proc:
        return self.spawn(name, [*self.program, "server", *self.common(), *extra], preexec)

    def start_worker(self, k: int, *extra: str, name: str | None = None) -> Proc:
        save = self.tmp / f"worker-{k}.safetensors"
        return self.spawn(name or f"worker {k}", [
            *self.program, "worker", "--id", str(k), "--save-params", str(save), *self.common(), *extra])

    def start(self, worker_extra: dict[int, list[str]] | None = None) -> Cluster:
        self.start_server()
        for k in range(1, self.workers + 1):
            self.start_worker(k, *(worker_extra or {}).get(k, []))
        return self

    def wait(self, timeout: float = 120.0) -> dict[str, int]:
        """Exit codes of every process; kills them all and fails loudly on timeout."""
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{name} did not finish within {timeout} s:\n{self.logs()}") from None
        return codes

    def wait_for_log(self, name: str, text: str, timeout: float = 60.0) -> None:
        proc = self.procs[name]
        wait_for(lambda: text in proc.output or proc.popen.poll() is not None, timeout, f"{name} to log {text!r}")
        assert text in proc.output, f"{name} exited before logging {text!r}:\n{proc.output[-3000:]}"

    def send_signal(self, name: str, sig: int) -> None:
        """Send `sig` to a process's whole group (it was started in a session of its own)."""
        os.killpg(self.procs[name].popen.pid, sig)

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def assert_replicas_equal(self, workers: list[int]) -> None:
        server = self.server_params()
        for k in workers:
            assert_same_params(self.worker_params(k), server, f"worker {k} vs the server")

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output[-4000:]}" for p in self.procs.values())

    def server_params(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "model.safetensors"))

    def worker_params(self, k: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.tmp / f"worker-{k}.safetensors"))


def nofile(soft: int, hard: int | None = None) -> Callable[[], None]:
    """A `preexec` for spawn: the child's open-file limit, as `ulimit -n` would set it (hard None: keep it).

    Start such a child before any thread of this process (a flood) runs: preexec_fn and threads mix badly.
    """
    def limit() -> None:
        keep = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, keep if hard is None else hard))

    return limit


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Bit-identical, tensor by tensor."""
    assert a.keys() == b.keys(), f"{what}: different tensors"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class PeakRss:
    """Samples a process's resident memory (and open descriptors) every `every` s until `stop()`."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        import psutil

        self.proc, self.every, self._stop = psutil.Process(pid), every, threading.Event()
        self.start = self.peak = self.last = self.proc.memory_info().rss
        self.fds_peak = self.proc.num_fds()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(self.every):
            try:
                self.last = self.proc.memory_info().rss
                self.fds_peak = max(self.fds_peak, self.proc.num_fds())
            except psutil.Error:
                return
            self.peak = max(self.peak, self.last)

    def stop(self) -> float:
        """Stop sampling; the growth of the peak over the start, in MiB."""
        self._stop.set()
        self.thread.join()
        return (self.peak - self.start) / 2**20
