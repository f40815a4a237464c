"""`smolcluster run`: a whole cluster (server + N workers) as child processes on this machine.

The children are real processes talking over loopback TCP, exactly as on separate machines. The
parent draws their progress, copies their logs to out_dir/logs/, stops everyone if anyone fails,
and never leaves a child behind (children also exit on their own if the parent disappears).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from loguru import logger
from tqdm import tqdm

from smolcluster.config import Config
from smolcluster.progress import PROGRESS_PREFIX

STOP_GRACE_S = 5.0
PLAIN_EVERY_S = 10.0
"""Seconds between progress lines when stderr is not a terminal (a terminal gets live bars)."""
# What a terminal or a process manager sends: each stops the cluster the way Ctrl-C does.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """`run` got a stop signal; it exits with 128 + the signal's number, as a shell expects."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Child:
    """One child process, its log file, its progress bar and the tail of its output."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, position: int) -> None:
        self.name = name
        self.tail: deque[str] = deque(maxlen=30)
        self.log = log_path.open("w")
        self.bar: tqdm | None = None
        self.position = position
        self.last_plain = time.monotonic()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, text=True, bufsize=1,
        )
        self.reader = threading.Thread(target=self._pump, daemon=True, name=f"read-{name}")
        self.reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROGRESS_PREFIX):
                self._progress(line[len(PROGRESS_PREFIX):])
                continue
            self.log.write(line)
            self.log.flush()
            self.tail.append(line.rstrip())
            tqdm.write(line.rstrip(), file=sys.stderr)

    def _progress(self, text: str) -> None:
        try:
            state = json.loads(text)
        except json.JSONDecodeError:
            return
        if not sys.stderr.isatty():
            # No bars in a log file or a CI console: the server's progress as a line now and then.
            now = time.monotonic()
            if self.position == 0 and state["n"] > 0 and now - self.last_plain >= PLAIN_EVERY_S:
                self.last_plain = now
                fields = "".join(f", {k} {v}" for k, v in state.items() if k not in ("desc", "n", "total"))
                logger.info(f"server at step {state['n']}/{state['total']}{fields}")
            return
        if self.bar is None:
            self.bar = tqdm(total=state["total"], desc=f"{self.name:>9}", position=self.position,
                            file=sys.stderr, dynamic_ncols=True, leave=False)
        self.bar.n = state["n"]
        self.bar.set_postfix({k: v for k, v in state.items() if k not in ("desc", "n", "total")}, refresh=False)
        self.bar.refresh()

    def why(self) -> str:
        """How it ended: the signal that killed it, and its last error line (else its last line)."""
        code = self.proc.returncode
        killed = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else ""
        last = next((line for line in reversed(self.tail) if "ERROR" in line or "Error" in line), None)
        if last is None:
            last = f"its last output: {self.tail[-1]}" if self.tail else "no output"
        return f"{killed}; {last}" if killed else last

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.reader.join(timeout=2.0)
        if self.bar is not None:
            self.bar.close()
        self.log.close()


def stop_all(children: list[Child]) -> None:
    """SIGTERM everyone, then SIGKILL whoever is still there after STOP_GRACE_S seconds
    (at once if another stop signal comes meanwhile: a second Ctrl-C means now)."""
    for child in children:
        child.stop(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        for child in children:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # grace is over, or a second Ctrl-C
        pass
    for child in children:
        if child.proc.poll() is None:
            child.stop(signal.SIGKILL)
            child.proc.wait()


class PortInUse(OSError):
    """The port asked for with `--set cluster.port=N` is taken."""


def run_local(cfg: Config, config_args: list[str], port: int | None = None, program: list[str] | None = None,
              resume: bool = False) -> int:
    """Start and supervise the cluster; returns the exit code for the shell. `resume`: go on from
    the last checkpoint in out_dir/checkpoints (the server's --resume; rank 0's on the torch backend).

    `port`: the one to use (it must be free); default: any free port, so that two local runs, or
    a run beside a real server on the default port, never meet. `program`: the command that is
    the server or a worker with the subcommand after it (default: `python -m smolcluster`).
    """
    c, t = cfg.cluster, cfg.training
    if t.device not in ("auto", "cpu"):  # every process runs here: refuse a missing GPU once, up front
        from smolcluster.devices import resolve

        resolve(t.device)
    if port is None:
        port = free_port()
    elif not port_is_free("127.0.0.1", port):
        raise PortInUse(f"port {port} on 127.0.0.1 is in use (another server?); choose another "
                        "cluster.port, or leave it unset and `run` picks a free one")
    threads = t.threads or max(1, (os.cpu_count() or 1) // c.num_workers)
    torch_backend = c.backend == "torch"  # no server: worker 1 (rank 0) holds the rendezvous and leads
    http = [] if not c.http_port or torch_backend else ["--set", f"cluster.http_port={free_port()}"]
    common = [
        *config_args, *http, "--set", f"cluster.port={port}", "--set", "cluster.host_ip=127.0.0.1",
        "--set", "cluster.bind=127.0.0.1", "--set", f"training.threads={threads}",
    ]
    out = Path(t.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    resume = ["--resume"] if resume else []
    # A token of this run's own: a worker can then only ever join its own server, even if another
    # process takes the port in the seconds before this server binds it.
    env = {**os.environ, "SMOLCLUSTER_PROGRESS": "json", "SMOLCLUSTER_PARENT_PID": str(os.getpid()),
           "PYTHONUNBUFFERED": "1", "SMOLCLUSTER_TOKEN": secrets.token_hex(16)}
    base = program or [sys.executable, "-m", "smolcluster"]  # a Job's own script runs as its processes
    who = f"{c.num_workers} torch.distributed ranks" if torch_backend else f"1 server + {c.num_workers} workers"
    logger.info(f"starting a local cluster: {who} on 127.0.0.1:{port}, logs in {out / 'logs'}")
    if http:
        logger.info(f"dashboard: http://{c.http_bind}:{http[1].split('=')[1]}/")
    children: list[Child] = []
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    try:
        if not torch_backend:
            children.append(Child("server", [*base, "server", *resume, *common], env, out / "logs" / "server.log", 0))
        for k in range(1, c.num_workers + 1):
            children.append(Child(f"worker {k}", [*base, "worker", "--id", str(k), *(resume if torch_backend else []),
                                                  *common], env, out / "logs" / f"worker-{k}.log", k - torch_backend))
        return _supervise(children, out)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        logger.warning(f"{signal.Signals(signum).name}: stopping the server and every worker")
        return 128 + signum
    finally:
        stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Last bar first: clearing a bar below the first leaves the cursor mid-line, and clearing
        # the first (the server's) returns it to the start of the line.
        for child in reversed(children):
            child.close()


def _supervise(children: list[Child], out: Path) -> int:
    server = children[0]  # the server, or on the torch backend worker 1: it leads, and ends the run
    while True:
        for child in children:
            code = child.proc.poll()
            if code not in (None, 0):
                logger.error(f"{child.name} exited with code {code}: {child.why()}")
                logger.error(f"stopping the rest; full logs in {out / 'logs'}")
                stop_all(children)
                return 1
        if server.proc.poll() == 0:
            deadline = time.monotonic() + 30.0
            while any(ch.proc.poll() is None for ch in children) and time.monotonic() < deadline:
                time.sleep(0.1)
            failed = [ch for ch in children if ch.proc.poll() not in (0,)]
            for ch in failed:
                logger.error(f"{ch.name} did not finish cleanly ({ch.proc.poll()}): {ch.why()}")
            return 1 if failed else 0
        time.sleep(0.1)


def watch_parent() -> None:
    """In a child of `run`: exit if the parent died (a SIGKILLed parent cannot clean up)."""
    pid = os.environ.get("SMOLCLUSTER_PARENT_PID")
    if not pid:
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.5):
            if os.getppid() != int(pid):
                os._exit(1)

    thread = threading.Thread(target=loop, daemon=True, name="watch-parent")
    thread.start()

    def join() -> None:  # a daemon thread still running at interpreter exit can abort it
        stop.set()
        thread.join(timeout=2.0)

    atexit.register(join)
