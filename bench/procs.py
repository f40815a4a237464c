"""Child processes for one measurement: started together, waited for with a deadline, always reaped.

Every measurement (a DDP world, a pickle server and its workers, a smolcluster cluster, a proxy)
is a `Group`: leaving its `with` block kills whatever is still running, so a failed or timed-out
case never leaves processes behind. Children also exit on their own if the benchmark itself is
killed (smolcluster's `watch_parent`, switched on by SMOLCLUSTER_PARENT_PID).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[1]


class BenchError(RuntimeError):
    """A measurement failed (a child exited non-zero or ran past its deadline); says which and why."""


def child_env(**extra: str) -> dict[str, str]:
    """One torch thread per process, no W&B, unbuffered logs, and `bench` importable from anywhere."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
        "SMOLCLUSTER_PARENT_PID": str(os.getpid()), **extra,
    }


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def set_flags(overrides: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]: the config every child reads."""
    return [flag for o in overrides for flag in ("--set", o)]


class Group:
    """Processes of one measurement; logs go to `logs/NAME.log`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              stdout_pipe: bool = False) -> subprocess.Popen:
        """Start `argv` in its own session (so it and its children can be killed as one)."""
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env or child_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log, stderr=log, start_new_session=True,
            text=stdout_pipe,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait(self, names: list[str], timeout_s: float) -> None:
        """Wait for `names` to exit 0 within `timeout_s` seconds; the first failure raises BenchError."""
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        while pending:
            for name in list(pending):
                code = self.procs[name].poll()
                if code is None:
                    continue
                pending.remove(name)
                if code != 0:
                    raise BenchError(f"{name} exited with code {code}:\n{self.tail(name)}")
            others = [n for n in self.procs if n not in names and self.procs[n].poll() not in (None, 0)]
            if others:
                raise BenchError(f"{others[0]} died:\n{self.tail(others[0])}")
            if pending and time.monotonic() > deadline:
                raise BenchError(f"{pending} still running after {timeout_s:.0f} s:\n{self.tail(pending[0])}")
            time.sleep(0.05)

    def kill_all(self) -> None:
        """SIGTERM every child's process group, SIGKILL what is left after 3 s."""
        for proc in self.procs.values():
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill_all()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
