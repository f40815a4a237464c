"""Reading smolcluster logs: when each line was written, and which steps went without which worker.

Log lines start `HH:MM:SS.mmm | LEVEL | role | message` (smolcluster/log.py), in local time, so
times here are seconds since local midnight and differences wrap around it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, overload

LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| \w+\s*\| [^|]+ \| (.*)$")
DAY = 24 * 3600


@dataclass
class Hit:
    t: float
    """Seconds since local midnight."""
    text: str
    """The message, without time, level and role."""
    match: re.Match


def lines(log: str) -> Iterator[tuple[float, str]]:
    for raw in log.splitlines():
        m = LINE.match(raw)
        if m:
            h, mi, s, ms, text = m.groups()
            yield int(h) * 3600 + int(mi) * 60 + int(s) + int(ms) / 1e3, text


@overload
def find(log: str, pattern: str, every: Literal[False] = False) -> Hit | None: ...
@overload
def find(log: str, pattern: str, every: Literal[True]) -> list[Hit]: ...
def find(log: str, pattern: str, every: bool = False) -> Hit | None | list[Hit]:
    """The first log line whose message matches `pattern` (re.search), or all of them."""
    rx = re.compile(pattern)
    hits = []
    for t, text in lines(log):
        m = rx.search(text)
        if m:
            if not every:
                return Hit(t, text, m)
            hits.append(Hit(t, text, m))
    return hits if every else None


def of_day(epoch: float) -> float:
    """A time.time() value as seconds since local midnight, like the log timestamps."""
    tm = time.localtime(epoch)
    return tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec + epoch % 1


def clock() -> float:
    return of_day(time.time())


def elapsed(a: float, b: float) -> float:
    """Seconds from time of day `a` to `b`, across midnight if need be."""
    d = b - a
    return d + DAY if d < -DAY / 2 else d - DAY if d > DAY / 2 else d


DROP = re.compile(r"worker (\d+) dropped at step (\d+)")
BACK = re.compile(r"worker (\d+) is back in lockstep from step (\d+)")
WAITED = re.compile(r"step (\d+): waited [\d.]+ s, still missing workers \[([\d, ]*)\]")
NONFINITE = re.compile(r"step (\d+): rejected a non-finite .* from worker (\d+)")


@dataclass
class Missing:
    """(step, worker) pairs: that worker's gradient is not in that step's average."""

    pairs: set[tuple[int, int]] = field(default_factory=set)

    @property
    def steps(self) -> int:
        return len({s for s, _ in self.pairs})

    def describe(self) -> str:
        """'425 (w2: 200–624)': steps short of a gradient, then each worker's missing steps as ranges."""
        if not self.pairs:
            return "0"
        parts = []
        for k in sorted({w for _, w in self.pairs}):
            runs: list[list[int]] = []
            for s in sorted(s for s, w in self.pairs if w == k):
                if runs and s == runs[-1][1] + 1:
                    runs[-1][1] = s
                else:
                    runs.append([s, s])
            ranges = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs)
            parts.append(f"w{k}: {ranges}")
        return f"{self.steps} ({'; '.join(parts)})"


def missing_steps(server_log: str, total_steps: int) -> Missing:
    """Which worker each step went without, from the server's drop, rejoin, deadline and NaN lines."""
    out, gone = Missing(), {}
    for _, text in lines(server_log):
        if m := DROP.search(text):
            gone[int(m[1])] = int(m[2])
        elif (m := BACK.search(text)) and int(m[1]) in gone:
            out.pairs |= {(s, int(m[1])) for s in range(gone.pop(int(m[1])), int(m[2]))}
        elif m := WAITED.search(text):
            out.pairs |= {(int(m[1]), int(k)) for k in m[2].split(",") if k.strip()}
        elif m := NONFINITE.search(text):
            out.pairs.add((int(m[1]), int(m[2])))
    for k, s in gone.items():
        out.pairs |= {(step, k) for step in range(s, total_steps)}
    return out
