"""The dashboard seen from a terminal: `smolcluster status URL` prints a running server's state
(its /api/status), and `smolcluster hosts --dashboard` the line `launch.sh status` ends with,
saying where the dashboard is and how to reach it."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from smolcluster.config import ClusterConfig, SshHost


def where_to_look(c: ClusterConfig, name: str, server: SshHost) -> str:
    """launch.sh status's last line: the dashboard's URL on the server host `name` (reached over
    ssh as `server`), and, bound to loopback there (the default), the ssh tunnel that reaches it."""
    port = c.http_port
    if not port:
        return "dashboard: off (cluster.http_port is 0)"
    if c.http_bind not in ("127.0.0.1", "localhost", "::1"):
        host = server.address if c.http_bind in ("0.0.0.0", "::", "") else c.http_bind
        return f"dashboard: http://{host}:{port}/"
    ssh = ["ssh", "-N", "-L", f"{port}:127.0.0.1:{port}", *(["-p", str(server.port)] if server.port else []),
           *(["-i", os.path.expanduser(server.key)] if server.key else []),
           f"{server.user}@{server.address}" if server.user else str(server.address)]
    return (f"dashboard: on {name} at http://127.0.0.1:{port}/, bound to {c.http_bind} (cluster.http_bind): "
            f"from here, {' '.join(ssh)} and open http://127.0.0.1:{port}/")


def _worker_numbers(w: dict[str, Any]) -> str:
    """A worker's step parts (ms per step) and bytes (MB), where it reported them."""
    out = ""
    if all(isinstance(w.get(k), (int, float)) for k in ("compute_s", "wait_s", "comm_s")):
        out += f"  compute {1e3 * w['compute_s']:.1f} / wait {1e3 * w['wait_s']:.1f} / comm {1e3 * w['comm_s']:.1f} ms"
    if all(isinstance(w.get(k), int) for k in ("bytes_sent", "bytes_received")):
        out += f"  sent {w['bytes_sent'] / 1e6:.1f} MB, received {w['bytes_received'] / 1e6:.1f} MB"
    return out


def print_status(url: str) -> int:
    """`smolcluster status URL`: the dashboard's state as text, for a terminal over ssh."""
    import urllib.error
    import urllib.request

    target = url.rstrip("/") + "/api/status"
    try:
        with urllib.request.urlopen(target, timeout=10) as r:
            s = json.loads(r.read(1 << 24))
    except (urllib.error.URLError, OSError, ValueError) as e:
        logger.error(f"no status from {target}: {getattr(e, 'reason', e)} (is the server running with cluster.http_port?)")
        return 1
    c = s["cluster"]
    print(f"step {c.get('step', 0)}/{c.get('total_steps', '?')}  epoch {c.get('epoch', 0)}  "
          f"{c.get('steps_per_s', 0)} steps/s  ETA {c.get('eta_s', '?')} s  {c.get('algorithm', '?')} "
          f"{c.get('compression', '?')}  workers {c.get('workers_present', 0)}/{c.get('workers_expected', '?')}  "
          f"loss {c.get('loss', float('nan')):.4f}")
    for w in s["workers"]:
        print(f"  worker {w['id']}: {w.get('state', '?'):8} last step {w.get('last_step', '-')}  "
              f"{w.get('host', '?')} {w.get('addr', '')}  {w.get('device', '?')}{_worker_numbers(w)}")
    if s["evals"]:
        last = s["evals"][-1]
        print("  last evaluation: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in last.items() if k.startswith("test_")))
    bad = {k: v for k, v in s["counters"].items() if v}
    print("  counters: " + (", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "nothing lost or refused"))
    for e in s["events"][-5:]:
        print(f"  {time.strftime('%H:%M:%S', time.localtime(e['t']))} {e['kind']}: {e['text']}")
    return 0
