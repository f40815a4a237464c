"""Connection floods on real runs, for the reliability report: `flood_rows(ctx)` gives its rows.

The job of the report runs four times in turn: clean (the reference), under 1,000 idle
connections, under 1,000 churning ones, and under 1,000 idle ones against a server started with
`ulimit -n 256` (macOS's default); all of that `rounds` times, so load that drifts on a shared
machine hits every kind alike. The flood (bench/hostile.py) starts once the server listens,
before the workers, and runs until the server is done. Each row gives the median step time over
the reference's of the same round, the server's peak of open descriptors, how many connections
it shed, the accuracy against the reference, and whether the replicas ended bit-identical.
"""

from __future__ import annotations

import re
import statistics
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.cluster import Cluster, nofile
from bench.hostile import Flood, FloodCounts

if TYPE_CHECKING:
    from bench.reliability import Ctx, Row

FLOOD_N = 1000
FLOOD_RATE = 200.0
"""New flood connections a second once the first FLOOD_N are open (each costs the server about
0.1 ms of CPU to accept, greet and shed: at 200/s, 2 % of a core)."""

FLOODS = {
    # key: (row title, flood mode, the server's open-file limit (None: as the report runs), log lines)
    "flood-idle": ("1,000 idle connections (never authenticate)", "idle", None,
                   [r"shed \d+ connections that had not authenticated .*"]),
    "flood-churn": ("1,000 churning connections (connect, close)", "churn", None,
                    [r"(shed|\d+ more unauthenticated connections closed) .*"]),
    "flood-idle-256": ("1,000 idle connections, server `ulimit -n 256`", "idle", 256,
                       [r"open files: soft limit 256 .*", r"shed \d+ connections that had not authenticated .*"]),
}


class FdPeak:
    """Samples a process's open descriptors every `every` s on a thread until stop(), which returns the peak."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        import psutil

        self.proc, self.every, self._stop = psutil.Process(pid), every, threading.Event()
        self.peak, self.samples = 0, 0
        self._thread = threading.Thread(target=self._sample, daemon=True, name="fd-peak")
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while True:
            try:
                self.peak = max(self.peak, self.proc.num_fds())
                self.samples += 1
            except psutil.Error:  # it exited
                return
            if self._stop.wait(self.every):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5.0)
        return self.peak


def sheds(log: str) -> int:
    """Connections the server shed, summed over its summary lines."""
    return sum(int(n) for n in re.findall(r"shed (\d+) connections that had not authenticated", log))


@dataclass
class Run:
    """One run of the job: its cluster, exit codes, the server's descriptor peak, the flood's counts."""

    cluster: Cluster
    codes: dict[str, int]
    fd_peak: int
    flood: FloodCounts | None

    @property
    def median_ms(self) -> float | None:
        try:
            return self.cluster.summary()["step_ms"]["median"]
        except (OSError, ValueError, KeyError):  # it failed: no summary.json
            return None


def flooded_run(ctx: Ctx, key: str, mode: str | None, limit: int | None) -> Run:
    """One run of the job, flooded from the moment the server listens (before the workers start)."""
    c = ctx.cluster(key)
    server = c.start_server(preexec=nofile(limit, limit) if limit else None)  # before any flood thread
    c.wait_for_log("server", "listening on", timeout=120)
    fds = FdPeak(server.popen.pid)
    flood = Flood(c.port, n=FLOOD_N, mode=mode, seconds=ctx.job.timeout_s, rate=FLOOD_RATE) if mode else None
    try:
        for k in range(1, ctx.job.workers + 1):
            c.start_worker(k)
        codes = c.wait(ctx.job.timeout_s)
    finally:
        counts = flood.stop() if flood else None
        peak = fds.stop()
    return Run(c, codes, peak, counts)


def ratio(runs: list[Run], refs: list[Run]) -> list[float]:
    """Median step time over the reference's of the same round, per round both finished."""
    return [r.median_ms / f.median_ms for r, f in zip(runs, refs) if r.median_ms and f.median_ms]


def flood_rows(ctx: Ctx, rounds: int = 2) -> list[Row]:
    """The reference and the three flooded runs as report rows (keys flood-clean, flood-idle,
    flood-churn, flood-idle-256), `rounds` times over in turn so load that drifts on a shared
    machine hits them all alike; speed and accuracy are against this call's own reference runs."""
    from bench.reliability import Row, completed

    keys = {"flood-clean": (None, None), **{k: (mode, limit) for k, (_, mode, limit, _) in FLOODS.items()}}
    runs: dict[str, list[Run]] = {k: [] for k in keys}
    for n in range(1, rounds + 1):
        for key, (mode, limit) in keys.items():
            runs[key].append(flooded_run(ctx, f"{key}-{n}", mode, limit))
    refs = runs["flood-clean"]
    ref = Row("flood-clean", "none (reference for the floods, run in turn with them)", "—", "—")
    first = completed(ctx, ref, refs[0].cluster, refs[0].codes, [])
    ref_ms = statistics.median(m for r in refs if (m := r.median_ms))
    ref.recovery = f"median step {ref_ms:.1f} ms (runs: {', '.join(f'{r.median_ms} ms' for r in refs)})"
    ref.notes.append(f"server's open descriptors peaked at {max(r.fd_peak for r in refs)}")
    ref.facts.update(median_ms=ref_ms, fd_peak=max(r.fd_peak for r in refs))
    rows = [ref]
    for key in FLOODS:
        rows.append(flood_row(ctx, key, runs[key], refs, first["test_accuracy"]))
    return rows


def flood_row(ctx: Ctx, key: str, runs: list[Run], refs: list[Run], ref_acc: float) -> Row:
    """One flood's row: the first round's run in the usual columns, speed over every round."""
    from bench.reliability import Row, completed

    title, mode, limit, patterns = FLOODS[key]
    how = f"`bench.hostile.flood(n={FLOOD_N}, mode={mode!r}, rate={FLOOD_RATE:g})` from server start"
    row = Row(key, title, how + (f"; server under `ulimit -n {limit}`" if limit else ""),
              "admission caps from the open-file limit: oldest unauthenticated shed ('server busy'); "
              "workers retry the handshake")
    s = completed(ctx, row, runs[0].cluster, runs[0].codes, [("server", p) for p in patterns])
    ratios = ratio(runs, refs)
    mean = statistics.fmean(ratios) if ratios else float("nan")
    ms = statistics.median(m for r in runs if (m := r.median_ms)) if ratios else float("nan")
    row.accuracy = f"{s['test_accuracy']:.2f} % ({s['test_accuracy'] - ref_acc:+.2f} vs reference)"
    row.recovery = f"median step {ms:.1f} ms = {mean:.2f}× reference (per round: {', '.join(f'{x:.2f}×' for x in ratios)})"
    shed = [sheds(r.cluster.procs["server"].output) for r in runs]
    counts = runs[0].flood
    assert counts is not None
    cpu = 100 * counts.cpu_s / max(counts.seconds, 1e-9)
    row.notes += [f"server's open descriptors peaked at {max(r.fd_peak for r in runs)}",
                  f"connections shed per run: {', '.join(map(str, shed))}",
                  f"flood of the first run: {counts.opened} opened, {counts.busy} told busy, {counts.closed} closed by "
                  f"the server, {counts.refused} refused, at most {counts.peak_open} open, {cpu:.0f} % of a core"]
    bad = [n for n, r in enumerate(runs[1:], 2) if any(v != 0 for v in r.codes.values())]
    if bad:
        row.notes.append(f"round(s) {bad} had a process exit non-zero: {[r.codes for r in runs]}")
    row.facts.update(median_ms=ms, ratio=mean, fd_peak=max(r.fd_peak for r in runs), sheds=shed[0],
                     accuracy_delta=s["test_accuracy"] - ref_acc, flood_cpu_pct=cpu, flood_opened=counts.opened)
    return row
