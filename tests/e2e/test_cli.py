"""The `smolcluster` command as a user types it: real processes, hard timeouts, no mocks.

`run` must finish a job and report it, stop every child it started whichever way it is stopped
(Ctrl-C in a terminal, SIGINT or SIGTERM to it alone, a child dying), and say who failed and why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from helpers import FAST, REPO, env, smolcluster, wait_for

pytestmark = pytest.mark.timeout(120)

ACCURACY = re.compile(r"^test accuracy: (\d+\.\d+)%", re.MULTILINE)
GONE_S = 10.0
"""Children must be gone this soon after `run` is told to stop (it waits 5 s before SIGKILL)."""
# 512 samples, batch 16, 2 workers: 16 steps per epoch; 2000 epochs outlast any test.
LONG = [*FAST, "--set", "training.num_epochs=2000", "--set", "cluster.checkpoint_steps=0"]


@dataclass
class Run:
    """`smolcluster run` in its own process group, as a shell starts a foreground job."""

    popen: subprocess.Popen
    out: Path
    stdout: Path
    stderr: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"`run` did not exit within {timeout} s:\n{self.err()[-3000:]}") from None

    def out_text(self) -> str:
        return self.stdout.read_text()

    def err(self) -> str:
        return self.stderr.read_text()

    def training(self, workers: int = 2, timeout: float = 90.0) -> list[psutil.Process]:
        """Wait until every worker trains; returns every descendant (server, workers, theirs)."""
        logs = [self.out / "logs" / f"worker-{k}.log" for k in range(1, workers + 1)]

        def under_way() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"`run` exited with {self.popen.returncode}:\n{self.err()[-3000:]}")
            return all(p.exists() and "training from step 0" in p.read_text() for p in logs)

        wait_for(under_way, timeout, "training to start", interval=0.2)
        children = psutil.Process(self.popen.pid).children(recursive=True)
        assert len(children) >= workers + 1, children
        return children


def start_run(tmp_path: Path, *args: str, environ: dict[str, str] | None = None) -> Run:
    out = tmp_path / "out"
    stdout, stderr = tmp_path / "run.stdout", tmp_path / "run.stderr"
    with stdout.open("w") as o, stderr.open("w") as e:
        popen = subprocess.Popen(smolcluster("run", *args, "--out", str(out)), stdout=o, stderr=e,
                                 env=environ or env(), cwd=REPO, start_new_session=True)
    return Run(popen, out, stdout, stderr)


def assert_gone(procs: list[psutil.Process], what: str) -> None:
    _, alive = psutil.wait_procs(procs, timeout=GONE_S)
    assert not alive, f"still running {GONE_S} s after {what}: {[' '.join(p.cmdline()[-6:]) for p in alive]}"


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(smolcluster(*args), capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)


# --- a whole job ---------------------------------------------------------------------------------


def test_run_trains_reports_and_saves_and_eval_agrees(tmp_path):
    # 6 steps: far from 100%, so the accuracy `eval` prints can only match if it is the same model.
    run = start_run(tmp_path, *FAST, "--set", "training.max_steps=6", "--set", "training.learning_rate=0.0003")
    assert run.wait(90) == 0, run.err()[-3000:]
    lines = run.out_text().splitlines()
    assert len(lines) == 1, f"stdout should be the one result line, got {lines}"
    reported = ACCURACY.search(lines[0])
    assert reported, lines
    assert "(6 steps, 2 workers" in lines[0] and str(run.out) in lines[0]

    summary = json.loads((run.out / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "steps", "epochs", "workers", "wall_s", "samples_per_s", "config"):
        assert key in summary, key
    assert f"{summary['test_accuracy']:.2f}" == reported.group(1)
    assert 10.0 < summary["test_accuracy"] < 99.0, "the check below needs an accuracy that is not trivial"
    assert (summary["steps"], summary["workers"], summary["epochs"]) == (6, 2, 6 / 16)
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    assert summary["config"]["training"]["out_dir"] == str(run.out)
    assert summary["config"]["dataset"]["name"] == "synthetic"
    for name in ("server", "worker-1", "worker-2"):
        assert (run.out / "logs" / f"{name}.log").read_text(), f"{name}.log is empty"

    evaluated = cli("eval", str(run.out / "model.safetensors"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert ACCURACY.search(evaluated.stdout).group(1) == reported.group(1), (evaluated.stdout, lines)


# --- stopping ------------------------------------------------------------------------------------


def real_default_env() -> dict[str, str]:
    """The environment of a user's shell: W&B in its default mode (offline), not the tests' disabled."""
    return {k: v for k, v in env().items() if k != "WANDB_MODE"}


STOPS = {
    # name: (args of `run`, environment, how the signal is sent, expected exit code)
    # Ctrl-C in a terminal: SIGINT to the foreground process group. The real default job (MNIST,
    # SimpleNN, W&B offline with its own helper processes), cut to 300 steps.
    "ctrl-c-default-job": (["--set", "training.max_steps=300"], real_default_env, "group", signal.SIGINT, 130),
    # What `kill PID`, systemd or a job scheduler sends, to `run` alone.
    "sigterm-to-run-only": (LONG, env, "parent", signal.SIGTERM, 143),
}


@pytest.mark.parametrize("name", list(STOPS))
def test_a_stopped_run_stops_every_child(tmp_path, name):
    args, environ, target, sig, code = STOPS[name]
    run = start_run(tmp_path, *args, environ=environ())
    children = run.training()
    # A terminal's Ctrl-C reaches `run` alone (SIGINT to `run` only is the same case): the children
    # live in process groups of their own, so `run` decides how they stop.
    assert all(os.getpgid(p.pid) != run.popen.pid for p in children)
    if target == "group":
        os.killpg(run.popen.pid, sig)
    else:
        os.kill(run.popen.pid, sig)
    assert_gone(children, f"{signal.Signals(sig).name} to {target}")
    assert run.wait(GONE_S) == code, run.err()[-3000:]
    assert f"{signal.Signals(sig).name}: stopping the server and every worker" in run.err()
    assert run.out_text() == ""


def test_children_of_a_killed_run_stop_by_themselves(tmp_path):
    run = start_run(tmp_path, *LONG)
    children = run.training()
    os.kill(run.popen.pid, signal.SIGKILL)  # nothing can clean up after this but the children
    assert_gone(children, "SIGKILL to run")
    assert run.wait(GONE_S) == -signal.SIGKILL


def test_a_dying_worker_stops_the_run_and_is_named(tmp_path):
    run = start_run(tmp_path, *LONG)
    children = run.training()
    worker2 = [p for p in children if p.cmdline()[1:6] == ["-m", "smolcluster", "worker", "--id", "2"]]
    assert len(worker2) == 1, [p.cmdline() for p in children]
    worker2[0].kill()
    assert run.wait(30) == 1, run.err()[-3000:]
    err = run.err()
    assert "worker 2 exited with code -9: killed by SIGKILL" in err, err[-3000:]
    assert "stopping the rest" in err
    assert_gone(children, "worker 2 died")
    assert run.out_text() == ""


# --- the command line itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "training.batch_sise=3"], "--set training.batch_sise: unknown key; known keys are batch_size"),
        (["--workers", "0"], "--workers (cluster.num_workers): expected an integer >= 1, got 0"),
        (["--set", "training.learning_rate=.nan"], "--set training.learning_rate: expected a finite number, got nan"),
        (["--set", "cluster.step_timeout=inf"], "--set cluster.step_timeout: expected a finite number, got 'inf'"),
    ],
)
def test_config_errors_exit_2_naming_the_key(args, message):
    t0 = time.monotonic()
    result = cli("run", *args)
    assert result.returncode == 2, result.stderr
    assert f"config error: {message}" in result.stderr
    assert result.stdout == ""
    assert time.monotonic() - t0 < 15, "a config error needs no torch and no child process"


def test_a_yaml_alias_bomb_is_exit_2_at_once_with_a_short_error(tmp_path):
    """'Billion laughs': 9 nested anchors of 9 aliases each, ~330 bytes standing for 9**9 values."""
    levels = [f"&a [{','.join(['lol'] * 9)}]"] + [f"&{b} [{','.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "nn.yaml"
    bomb.write_text(f"training:\n  batch_size: [{','.join(levels)}]\n")
    t0 = time.monotonic()
    result = cli("run", "--nn-config", str(bomb), timeout=30)
    seconds = time.monotonic() - t0
    assert result.returncode == 2 and seconds < 10, (result.returncode, seconds)
    assert f"config error: {bomb}: YAML aliases expand to more than 10000 values" in result.stderr
    assert len(result.stderr) < 1000 and "Traceback" not in result.stderr, result.stderr[:2000]


def test_run_on_a_busy_port_says_so(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("run", "--set", f"cluster.port={port}", "--out", str(tmp_path))
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert not (tmp_path / "logs").exists(), "nothing should have started"


@pytest.mark.parametrize("script, flag", [("server", "--resume"), ("worker", "--id K")])
def test_server_and_worker_scripts_are_installed(script, flag):
    path = Path(sys.executable).parent / script
    assert path.exists(), f"{path}: not installed (pyproject's [project.scripts])"
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"usage: smolcluster {script}" in result.stdout and flag in result.stdout
