"""A worker's STATS frame: what it says about itself, and how the server checks what it says.

Each field is optional:

- `s_per_sample`: its compute seconds per sample over its first steps, sent once (training.balance);
- `timing`: about once a second (REPORT_S), its step time in three parts, in seconds per step
  averaged over the `steps` since its last report (the dashboard's worker rows, /metrics);
- `bytes_sent`, `bytes_received`: every byte of every frame through its connections so far.

A step's three parts, as the worker sees them (`split`), add up to the step's time:

- compute: forward and backward (every local step's, in the local modes), then applying the
  average (the optimizer step, and a checksum when one is due);
- communicate: sending the gradient, as far as it was not hidden behind backward (with overlap,
  buckets leave while backward runs), and receiving the averages' bytes once they come;
- wait: blocked for the server's averages beyond that: for the slowest worker, and for the
  server's own averaging.

The server believes none of it blindly: every field must be finite, non-negative and bounded, or
the frame is a ProtocolError naming the peer (and the connection is closed, as for any bad frame).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from smolcluster.errors import cut
from smolcluster.wire import ProtocolError

REPORT_S = 1.0
"""Seconds between a worker's timing reports (time-based: a fast step loop sends no more)."""
PARTS = ("compute_s", "wait_s", "comm_s")
MAX_SECONDS = 86_400.0
"""A part of one step longer than a day is not a measurement."""
MAX_BYTES = 1 << 62
MAX_STEPS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Stats:
    s_per_sample: float | None = None
    timing: dict[str, float] | None = None
    """compute_s, wait_s, comm_s (seconds per step) and steps (how many they average over)."""
    bytes_sent: int | None = None
    bytes_received: int | None = None

    def row(self) -> dict[str, float]:
        """The dashboard's worker-row fields this report sets."""
        out: dict[str, float] = {k: round(self.timing[k], 6) for k in PARTS} if self.timing else {}
        for k in ("bytes_sent", "bytes_received"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def _number(peer: str, key: str, value: Any, high: float, integer: bool = False, positive: bool = False) -> float:
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not (0 < value if positive else 0 <= value) or value > high:
        bound = f"{'an integer' if integer else 'a number'} {'>' if positive else '>='} 0 and <= {high:g}"
        raise ProtocolError(f"{peer}: STATS {key}={cut(repr(value), 60)}: expected {bound}")
    return value


def parse_stats(body: dict[str, Any], peer: str) -> Stats:
    """A worker's STATS body, checked field by field; ProtocolError (naming `peer`) if any is off."""
    unknown = sorted(set(body) - {"s_per_sample", "timing", "bytes_sent", "bytes_received"})
    if unknown or not body:
        raise ProtocolError(f"{peer}: STATS with {f'unknown fields {cut(str(unknown), 80)}' if unknown else 'nothing in it'}")
    timing = body.get("timing")
    if "timing" in body:
        if not isinstance(timing, dict) or set(timing) != {*PARTS, "steps"}:
            raise ProtocolError(f"{peer}: STATS timing: expected an object of {', '.join(PARTS)} and steps, "
                                f"got {cut(repr(timing), 120)}")
        timing = {k: _number(peer, f"timing.{k}", timing[k], MAX_SECONDS) for k in PARTS} | {
            "steps": _number(peer, "timing.steps", timing["steps"], MAX_STEPS, integer=True, positive=True)}
    moved = {k: int(_number(peer, k, body[k], MAX_BYTES, integer=True))
             for k in ("bytes_sent", "bytes_received") if k in body}
    speed = _number(peer, "s_per_sample", body["s_per_sample"], 3600.0, positive=True) if "s_per_sample" in body else None
    return Stats(s_per_sample=speed, timing=timing, **moved)


def split(t0: float, backward_done: float, sent: float, landed: float, end: float, received_s: float,
          last_sent: float) -> tuple[float, float, float]:
    """A step's (compute, wait, communicate) seconds from the worker's clock readings (monotonic):
    it started at `t0`, backward finished at `backward_done`, the main thread's sending (without
    overlap) at `sent`; the averages it then waited for had `landed` by then, and the step ended
    at `end`. `received_s` of that wait went into reading the averages' bytes; `last_sent` is
    when the gradient's last bucket left (with overlap, possibly after backward)."""
    tail = max(0.0, min(last_sent, landed) - sent)  # the sender thread still at it after backward
    wait = max(0.0, (landed - sent) - tail - received_s)
    return (backward_done - t0) + (end - landed), wait, (sent - backward_done) + tail + received_s


class StepClock:
    """The worker's side: sums each step's parts and, once REPORT_S passed, hands out their means."""

    def __init__(self, period_s: float = REPORT_S) -> None:
        self.period_s = period_s
        self._sums = [0.0, 0.0, 0.0]
        self._steps = 0
        self._since = time.monotonic()

    def add(self, compute: float, wait: float, comm: float) -> dict[str, Any] | None:
        """Count one step; the `timing` field of a STATS body when a report is due, else None."""
        for i, v in enumerate((compute, wait, comm)):
            self._sums[i] += v
        self._steps += 1
        now = time.monotonic()
        if now - self._since < self.period_s:
            return None
        n, sums = self._steps, self._sums
        self._sums, self._steps, self._since = [0.0, 0.0, 0.0], 0, now
        return {**{k: s / n for k, s in zip(PARTS, sums)}, "steps": n}
