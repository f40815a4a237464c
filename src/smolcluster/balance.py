"""training.balance: size each worker's work to its speed, so a step waits for no one.

Workers measure their compute seconds per sample over their first steps (worker.py) and send
it once (STATS, stats.py). When every worker has (or after a while, with those that did: the others count
as the median), the server gives worker k the share speed_k / Σ speed of the cluster's work per
step: a batch of N·batch_size·share (sync), or N·local_steps·share local steps of batch_size
(local modes), at least 1 and at most MAX_SCALE times the configured size, from the next step on
(PLAN). The averages are weighted by samples, so the maths stays that of one big batch; and the
schedule (schedule.py) keeps every worker's draws through its shard in order.
"""

from __future__ import annotations

import math
import statistics

BALANCE_STEPS = 8
"""Steps (rounds) a worker measures, after a first one that warms up."""
MAX_SCALE = 4
"""The most a worker's batch or local steps may grow, times the configured size."""


def plan(s_per_sample: dict[int, float], workers: int, batch: int, local_steps: int,
         sync: bool) -> dict[int, tuple[int, int]]:
    """Worker id -> (batch, local steps per round) for workers 1..`workers`."""
    known = [v for v in s_per_sample.values() if math.isfinite(v) and v > 0]
    median = statistics.median(known) if known else 1.0
    speed = {k: 1.0 / s_per_sample.get(k, median) for k in range(1, workers + 1)}
    total = sum(speed.values())
    out = {}
    for k, v in speed.items():
        share = workers * v / total  # 1 for an average worker
        if sync:
            out[k] = (min(MAX_SCALE * batch, max(1, round(batch * share))), 1)
        else:
            out[k] = (batch, min(MAX_SCALE * local_steps, max(1, round(local_steps * share))))
    return out
