"""Tracking: the W&B mode decision, a real offline run read back, and W&B failures that stop nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from loguru import logger

from smolcluster.config import Config, WandbConfig, load_config
from smolcluster.tracking import NullTracker, WandbTracker, decide_mode, has_api_key, start_tracker
from wandb_log import offline_runs

pytestmark = pytest.mark.timeout(60)

KEY = "k" * 40


@pytest.fixture
def logs():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"), level="INFO")
    yield lines
    logger.remove(sink)


@pytest.fixture
def clean_env(tmp_path):
    """No W&B credentials anywhere and HOME an empty folder; the environment is restored after
    (start_tracker sets WANDB_MODE for wandb's sake)."""
    saved = dict(os.environ)
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "NETRC"):
        os.environ.pop(name, None)
    os.environ["HOME"] = str(tmp_path / "home")
    yield
    os.environ.clear()
    os.environ.update(saved)


def flush_wandb() -> None:
    """Stop wandb's service process, which writes the .wandb file out; a process does this at exit
    (run.finish in offline mode returns before the file is flushed)."""
    import wandb

    wandb.teardown()


@pytest.fixture
def real_wandb():
    """Shut wandb's service process down after the test (the reaper would kill it mid-flight)."""
    yield
    flush_wandb()


def cfg_for(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, None, ["dataset.name=synthetic", f"training.out_dir={tmp_path / 'out'}", *overrides])


# --- the mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("asked, env_mode, key, expected, warns", [
    ("offline", None, False, "offline", False),
    ("offline", None, True, "offline", False),  # a key alone never sends data anywhere
    ("online", None, True, "online", False),
    ("online", None, False, "offline", True),
    ("disabled", None, True, "disabled", False),
    ("offline", "disabled", False, "disabled", False),  # an explicit WANDB_MODE wins
    ("disabled", "offline", False, "offline", False),
    ("offline", "online", True, "online", False),
    ("offline", "online", False, "offline", True),
    ("online", "dryrun", True, "offline", False),
    ("offline", "bogus", True, "offline", True),
    ("online", "", True, "online", False),  # WANDB_MODE= (empty) counts as unset
])
def test_decide_mode(asked, env_mode, key, expected, warns, tmp_path):
    environ = {"HOME": str(tmp_path)}
    if env_mode is not None:
        environ["WANDB_MODE"] = env_mode
    if key:
        environ["WANDB_API_KEY"] = KEY
    mode, warning = decide_mode(WandbConfig(mode=asked), environ)
    assert mode == expected
    assert (warning is not None) == warns, warning


def test_an_api_key_is_found_in_netrc_for_the_right_host(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    netrc.chmod(0o600)
    assert has_api_key({"NETRC": str(netrc)})
    assert not has_api_key({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"})
    (tmp_path / ".netrc").write_text(netrc.read_text())
    (tmp_path / ".netrc").chmod(0o600)
    assert has_api_key({"HOME": str(tmp_path)})
    assert not has_api_key({"HOME": str(tmp_path / "nowhere")})
    netrc.write_text("machine")  # unreadable: no key, no crash
    assert not has_api_key({"NETRC": str(netrc)})


def test_disabled_never_imports_wandb(monkeypatch, tmp_path, clean_env):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now raise
    tracker = start_tracker(cfg_for(tmp_path, "wandb.mode=disabled"), "server")
    assert isinstance(tracker, NullTracker)
    tracker.log({"train/loss": 1.0}, 0)
    tracker.finish({"test_accuracy": 1.0})
    assert not (tmp_path / "out").exists()


# --- a real offline run --------------------------------------------------------------------


def test_an_offline_run_records_metrics_config_group_and_summary(tmp_path, clean_env, logs, real_wandb):
    cfg = cfg_for(tmp_path, "wandb.project=unit", "training.batch_size=8")
    tracker = start_tracker(cfg, "server", "g-unit")
    assert isinstance(tracker, WandbTracker)
    for step in range(3):
        tracker.log({"train/loss": 1.0 / (step + 1), "grad_norm/0.weight": 0.5, "workers/present": 2}, step)
    tracker.finish({"test_accuracy": 91.5, "step_ms": {"median": 2.0}, "config": cfg.to_dict()})
    flush_wandb()
    run = offline_runs(tmp_path / "out")["server"]
    assert (run.group, run.job_type, run.project, run.exit_code) == ("g-unit", "server", "unit", 0)
    assert run.config["training"]["batch_size"] == 8 and run.config["wandb"]["project"] == "unit"
    assert [r["train/loss"] for r in run.history] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert run.summary["test_accuracy"] == 91.5 and run.summary["step_ms"] == {"median": 2.0}
    assert "config" not in run.summary  # it is the run's config already
    sync = [line for line in logs if "wandb sync" in line]
    assert len(sync) == 1 and sync[0].endswith(str(run.path.parent)), logs


def test_online_without_a_key_goes_offline_with_one_warning(tmp_path, clean_env, logs, real_wandb):
    tracker = start_tracker(cfg_for(tmp_path, "wandb.mode=online", f"wandb.dir={tmp_path / 'wb'}"), "worker-3")
    tracker.log({"worker/loss": 2.0}, 0)
    tracker.finish()
    flush_wandb()
    assert [line for line in logs if line.startswith("WARNING")] == [
        "WARNING wandb.mode asks for online W&B but there is no API key (WANDB_API_KEY or ~/.netrc; "
        "`wandb login` writes one); logging offline instead"
    ]
    run = offline_runs(tmp_path / "wb")["worker-3"]  # under wandb.dir, not out_dir
    assert run.job_type == "worker" and run.history[0]["worker/loss"] == 2.0
    assert not (tmp_path / "out").exists()


# --- W&B failing ---------------------------------------------------------------------------


def failing_init(**kwargs: Any) -> Any:
    raise RuntimeError("wandb exploded")


def test_an_init_that_raises_leaves_a_null_tracker(tmp_path, clean_env, logs):
    tracker = start_tracker(cfg_for(tmp_path), "server", init=failing_init)
    assert isinstance(tracker, NullTracker)
    tracker.log({"train/loss": 1.0}, 0)
    tracker.finish({})
    warnings = [line for line in logs if line.startswith("WARNING")]
    assert len(warnings) == 1 and "wandb exploded" in warnings[0] and "goes on without W&B" in warnings[0]


def test_an_init_that_hangs_is_abandoned_after_init_timeout(tmp_path, clean_env, logs):
    late: list[Any] = []
    release = threading.Event()

    class LateRun:
        def finish(self, exit_code: int | None = None) -> None:
            late.append(exit_code)

    returned = threading.Event()

    def hanging_init(**kwargs: Any) -> Any:
        release.wait(60)  # hangs until the test has seen start_tracker give up
        returned.set()
        return LateRun()

    tracker = start_tracker(cfg_for(tmp_path, "wandb.init_timeout=0.2"), "server", init=hanging_init)
    assert not returned.is_set(), "start_tracker waited for the hanging init instead of giving up"
    release.set()
    assert isinstance(tracker, NullTracker)
    assert any("init_timeout=0.2" in line for line in logs), logs
    deadline = time.monotonic() + 5
    while not late and time.monotonic() < deadline:
        time.sleep(0.05)
    assert late == [1], "the run that arrived after the timeout was not closed"


class BrokenRun:
    """A run whose log or finish raises, as wandb might on a full disk or a dead service."""

    def __init__(self, broken: str) -> None:
        self.broken, self.calls = broken, []
        self.summary: dict[str, Any] = {}
        self.settings = SimpleNamespace(sync_dir="/nowhere")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.calls.append(("log", step))
        if self.broken == "log":
            raise OSError("No space left on device")

    def finish(self, exit_code: int | None = None) -> None:
        self.calls.append(("finish", exit_code))
        if self.broken == "finish":
            raise ConnectionError("service gone")


@pytest.mark.parametrize("broken", ["log", "finish"])
def test_a_failing_run_is_switched_off_after_one_warning(broken, tmp_path, clean_env, logs):
    run = BrokenRun(broken)
    tracker = start_tracker(cfg_for(tmp_path), "worker-1", init=lambda **kw: run)
    for step in range(3):
        tracker.log({"worker/loss": 1.0}, step)
    tracker.finish({"test_accuracy": 1.0})
    tracker.finish()
    expected = [("log", 0)] if broken == "log" else [("log", 0), ("log", 1), ("log", 2), ("finish", None)]
    assert run.calls == expected
    warnings = [line for line in logs if line.startswith("WARNING")]
    assert len(warnings) == 1 and "goes on without W&B" in warnings[0], warnings


def test_real_wandb_with_a_key_and_a_dead_server_gives_up_in_time(tmp_path):
    """The hazard W&B really has: a key, no network, and wandb.init waits ~90 s. A server that
    accepts connections and never answers stands in for the network; the whole process must
    start, give up on W&B, and exit within seconds."""
    script = f"""
import socket, time
from smolcluster.config import load_config
from smolcluster.tracking import start_tracker
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64)
import os; os.environ["WANDB_BASE_URL"] = f"http://127.0.0.1:{{s.getsockname()[1]}}"
cfg = load_config(None, None, ["dataset.name=synthetic", "training.out_dir={tmp_path}",
                               "wandb.mode=online", "wandb.init_timeout=1"])
t0 = time.monotonic()
tracker = start_tracker(cfg, "server")
tracker.log({{"train/loss": 1.0}}, 0)
tracker.finish({{}})
print("tracker", type(tracker).__name__, round(time.monotonic() - t0, 1), flush=True)
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=50)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert "tracker NullTracker" in out.stdout, out.stdout + out.stderr
    assert "W&B could not start" in out.stderr
    assert took < 25, f"the process took {took:.0f} s to start, give up on W&B and exit"
