"""The server's state over HTTP, read-only: the dashboard page (/), /healthz, /api/status (JSON)
and /metrics (Prometheus).

The training loop writes a `Board` at each step boundary (a few assignments under a lock, nothing
is serialised there); a daemon thread answers requests from a copy of it, so a slow or hostile
client can only ever cost the HTTP thread. Only GET and HEAD exist; every other method, an unknown
path or a malformed request gets a 4xx; the standard library bounds request lines and headers
(64 KiB) and a request has a few seconds to arrive. A port that is taken is logged, and the run
goes on without HTTP. `Handler` and `listen` are shared with `smolcluster serve-model` (serve.py); what a terminal
shows of the dashboard is status.py.
"""

from __future__ import annotations

import collections
import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loguru import logger

HISTORY = 2000
"""Steps of loss and step time kept for the charts (older ones are thinned out)."""
EVENTS = 500
"""Events kept for the timeline."""


class Board:
    """What the dashboard shows; written by the training thread, read by the HTTP thread."""

    def __init__(self, cluster: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.cluster: dict[str, Any] = dict(cluster)
        self.workers: dict[str, dict[str, Any]] = {}
        self._before_late: dict[str, str] = {}
        self.counters: dict[str, int] = {}
        self.history: collections.deque[dict[str, float]] = collections.deque(maxlen=HISTORY)
        self.evals: list[dict[str, Any]] = []
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS)

    def event(self, kind: str, text: str, worker: int | None = None) -> None:
        with self._lock:
            self.events.append({"t": round(time.time(), 3), "kind": kind, "worker": worker, "text": text})

    def worker(self, wid: int, **fields: Any) -> None:
        with self._lock:
            self.workers.setdefault(str(wid), {"id": wid}).update(fields)

    def late(self, wid: int) -> None:
        """A gradient of this worker's came after its step was averaged: "late" until `on_time`."""
        with self._lock:
            row = self.workers.setdefault(str(wid), {"id": wid})
            if row.get("state") != "late":
                self._before_late[str(wid)] = row.get("state", "joined")
                row["state"] = "late"

    def on_time(self, wid: int, **fields: Any) -> None:
        """This worker's gradient counted in a step: set `fields`, and a late worker is back to
        the state it had before (joined or rejoined)."""
        with self._lock:
            row = self.workers.setdefault(str(wid), {"id": wid})
            row.update(fields)
            if row.get("state") == "late":
                row["state"] = self._before_late.pop(str(wid), "joined")

    def step(self, cluster: dict[str, Any], counters: dict[str, int], row: dict[str, float]) -> None:
        with self._lock:
            self.cluster.update(cluster)
            self.counters = dict(counters)
            self.history.append(row)

    def evaluation(self, result: dict[str, Any]) -> None:
        with self._lock:
            self.evals.append(dict(result))

    def snapshot(self) -> dict[str, Any]:
        """The /api/status document (schema in the README)."""
        with self._lock:
            return {"cluster": copy.deepcopy(self.cluster), "workers": [copy.deepcopy(w) for _, w in
                                                                       sorted(self.workers.items(), key=lambda kv: int(kv[0]))],
                    "counters": dict(self.counters), "history": list(self.history), "evals": list(self.evals),
                    "events": list(self.events), "uptime_s": round(time.time() - self.started, 3)}


def prometheus(status: dict[str, Any]) -> bytes:
    """/metrics: the run's counters and gauges, per worker where it has them, in Prometheus's text format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self):  # type: ignore[no-untyped-def]
            c = status["cluster"]
            yield CounterMetricFamily("smolcluster_steps", "Steps (rounds) completed", value=c.get("step", 0))
            yield CounterMetricFamily("smolcluster_samples", "Training samples averaged so far", value=c.get("samples", 0))
            yield CounterMetricFamily("smolcluster_bytes", "Bytes through the server's port", value=c.get("bytes", 0))
            yield GaugeMetricFamily("smolcluster_total_steps", "Steps (rounds) in the run", value=c.get("total_steps", 0))
            yield GaugeMetricFamily("smolcluster_workers_present", "Workers connected", value=c.get("workers_present", 0))
            yield GaugeMetricFamily("smolcluster_workers_expected", "cluster.num_workers", value=c.get("workers_expected", 0))
            if c.get("loss") is not None:
                yield GaugeMetricFamily("smolcluster_train_loss", "Averaged training loss of the last step", value=c["loss"])
            if status["evals"]:
                last = status["evals"][-1]
                for k, v in last.items():
                    if k.startswith("test_") and isinstance(v, (int, float)):
                        yield GaugeMetricFamily(f"smolcluster_{k}", f"Last evaluation's {k[5:]}", value=v)
            failures = CounterMetricFamily("smolcluster_failures", "Everything the run lost or refused, by kind",
                                           labels=["kind"])
            for kind, n in sorted(status["counters"].items()):
                failures.add_metric([kind], n)
            yield failures
            step_s = GaugeMetricFamily("smolcluster_worker_step_seconds",
                                       "A worker's step time by part, averaged over about its last second",
                                       labels=["worker", "part"])
            moved = {d: CounterMetricFamily(f"smolcluster_worker_{d}_bytes", f"Bytes a worker has {d} (as it reports)",
                                            labels=["worker"]) for d in ("sent", "received")}
            seen = GaugeMetricFamily("smolcluster_worker_last_step", "The last step a worker delivered", labels=["worker"])
            for w in status["workers"]:
                wid = str(w["id"])
                seen.add_metric([wid], w.get("last_step", -1))
                for part, key in (("compute", "compute_s"), ("wait", "wait_s"), ("communicate", "comm_s")):
                    if w.get(key) is not None:
                        step_s.add_metric([wid, part], w[key])
                for direction in ("sent", "received"):
                    if w.get(f"bytes_{direction}") is not None:
                        moved[direction].add_metric([wid], w[f"bytes_{direction}"])
            yield step_s
            yield seen
            yield from moved.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry)


def page(name: str) -> bytes:
    """One of the package's HTML pages, its script and styles inline (no CDN)."""
    from importlib.resources import files

    return files("smolcluster").joinpath(name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    """What every page smolcluster serves shares: a bounded wait for the request, plain-text
    refusals, one debug line per request. Methods a subclass does not define get 405."""

    timeout = 5.0  # seconds a request has to arrive (a slowloris ties up one thread, briefly)
    server_version = "smolcluster"
    allowed = "GET, HEAD"
    """What the 405 answer's Allow header lists."""

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if code == 405:
            self.send_header("Allow", self.allowed)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, code: int, text: str) -> None:
        self._send(code, text.encode() + b"\n", "text/plain; charset=utf-8")

    def _refuse(self, why: str = "") -> None:
        self._text(405, why or f"{self.command} is not served here: {self.allowed} only")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815 (the standard library's names)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's name)
        logger.debug(f"http {self.address_string()}: {format % args}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request thread never holds up the process's exit

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-answer (or worse) is one debug line, not a traceback on stderr."""
        import sys

        logger.debug(f"http {client_address[0]}: {sys.exc_info()[1]!r}")


def listen(handler: type[Handler], bind: str, port: int) -> ThreadingHTTPServer:
    """A threaded server on bind:port (0: any free port); OSError if it cannot have the port."""
    return _Server((bind, port), handler)


class _Dashboard(Handler):
    board: Board

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._send(200, page("dashboard.html"), "text/html; charset=utf-8")
        if path == "/healthz":
            return self._text(200, "ok")
        if path == "/api/status":
            return self._send(200, json.dumps(self.board.snapshot()).encode(), "application/json")
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            return self._send(200, prometheus(self.board.snapshot()), CONTENT_TYPE_LATEST)
        self._text(404, "not found")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()


def serve(board: Board, bind: str, port: int) -> ThreadingHTTPServer | None:
    """Start answering on bind:port in a daemon thread; None (logged) if the port cannot be had."""
    try:
        httpd = listen(type("Dashboard", (_Dashboard,), {"board": board}), bind, port)
    except OSError as e:
        logger.warning(f"dashboard: cannot listen on {bind}:{port} ({e.strerror or e}); the run goes on without it "
                       "(set cluster.http_port to a free port, or 0 to turn it off)")
        return None
    threading.Thread(target=httpd.serve_forever, daemon=True, name="http").start()
    host, bound = httpd.server_address[:2]
    logger.info(f"dashboard and metrics at http://{host}:{bound}/ (/api/status, /metrics)")
    return httpd
