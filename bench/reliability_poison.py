"""Report scenarios for workers that poison or stall a run: absurd gradients, rollback, a frame
that lies about its length, stalls.

Registered in bench/reliability.py's SCENARIOS; each returns one table row (bench/reliability.py's
`Row`) measured on a real cluster of the report's job.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

from bench.cluster import PeakRss
from bench.logtimes import clock, elapsed, find

if TYPE_CHECKING:
    from bench.reliability import Ctx, Row

ABSURD = {
    # key: (row title, --fault kind, extra --set, policy, the server's reaction)
    "scale-1e19": ("absurd gradient: ×1e19", "scale:1e19", [],
                   "admission: bucket norm > `outlier_factor` (10) × the running median of accepted norms → "
                   "rejected like NaN, counted", r"step \d+: rejected an absurd gradient from worker 2.*"),
    "scale-1e30": ("absurd gradient: ×1e30", "scale:1e30", [],
                   "admission: a norm past float32's range is always rejected",
                   r"step \d+: rejected an absurd gradient from worker 2.*"),
    "scale-early": ("absurd gradient at step 3 (warm-up)", "scale:1e19", [],
                    "admission during warm-up: against the lower median of the step's own norms",
                    r"step 3: rejected an absurd gradient from worker 2.*"),
    "scale-off": ("×1e19 with admission off (`outlier_factor: 0`)", "scale:1e19", ["cluster.outlier_factor=0"],
                  "none: shows what the rule prevents (Adam's second moment jumps ~1e35; the model stops moving)",
                  None),
    "rollback": ("×1e30 with admission off: optimizer state overflows", "scale:1e30", ["cluster.outlier_factor=0"],
                 "last line of defence: non-finite parameters/optimizer state after the step → roll back to the "
                 "last snapshot (every 20 steps), resync every worker",
                 r"step \d+: parameters or optimizer state are not finite after the update; rolled back.*"),
}


def absurd(ctx: Ctx, key: str) -> Row:
    from bench.reliability import Row, completed, ms, need

    title, kind, sets, policy, reaction = ABSURD[key]
    step = 3 if key == "scale-early" else ctx.job.fault_step
    c = ctx.cluster(key, *sets).start({2: ["--fault", f"{step}:{kind}"]})
    codes = c.wait(ctx.job.timeout_s)
    row = Row(key, title, f"`worker --fault {step}:{kind}`" + "".join(f", `{s}`" for s in sets), policy)
    expect = [("server", reaction)] if reaction else []
    if key == "rollback":
        expect += [(f"worker {k}", r"the server rolled back its replica; resynced .*") for k in (1, 2)]
    s = completed(ctx, row, c, codes, expect)
    row.late += f", {s['outlier_gradients']} absurd, {s['rollbacks']} rollbacks"
    fault = need(find(c.procs["worker 2"].output, rf"step {step}: injecting fault"), "the injection")
    if reaction:
        seen = need(find(c.procs["server"].output, reaction), "the server's reaction")
        done = "rolled back" if key == "rollback" else "rejected"
        row.recovery = f"{ms(elapsed(fault.t, seen.t))}: fault → {done}"
    if key == "rollback":
        back = need(find(c.procs["worker 1"].output, r"resynced this replica to its parameters; training on from step \d+"), "resync")
        row.recovery += f"; +{ms(elapsed(seen.t, back.t))} → workers resynced"
    return row


def stall(ctx: Ctx, key: str) -> Row:
    """A worker whose compute hangs while its heartbeats go on; the server's memory sampled throughout.

    `stall`: the report's policy; dropped for making no progress after `worker_timeout`.
    `stall-queue`: `worker_timeout` longer than the hang, so only the send-queue bound can act.
    """
    from bench.reliability import Row, completed, ms, need

    step, hang = ctx.job.fault_step, ctx.job.hang_s
    sets = ["cluster.worker_timeout=900"] if key == "stall-queue" else []
    c = ctx.cluster(key, *sets).start({2: ["--fault", f"{step}:sleep:{hang:g}"]})
    c.wait_for_log("worker 2", "injecting fault sleep", timeout=ctx.job.timeout_s)
    started = clock()
    rss = PeakRss(c.procs["server"].popen.pid, every=0.5)
    c.wait_for_log("server", "worker 2 dropped", timeout=hang + 60)
    dropped_at = clock()
    time.sleep(2.0)  # the queue goes with the peer: memory must not keep growing after the drop
    sampled = elapsed(started, clock())
    growth = rss.stop()  # (the final evaluation's buffers, later, are the run's, not the stall's)
    c.procs["server"].popen.wait(timeout=ctx.job.timeout_s)
    if c.procs["worker 2"].popen.poll() is None:
        c.send_signal("worker 2", signal.SIGKILL)  # still asleep: the run it was part of is over
    codes = c.wait(ctx.job.timeout_s)
    if key == "stall-queue":
        row = Row(key, f"stalled worker, {hang:g} s, only the queue bound", f"`worker --fault {step}:sleep:{hang:g}`, "
                  "`worker_timeout=900`", "bounded send queue (`max_send_queue_mb`, default max(16 MiB, 4 steps)): "
                  "a peer that reads nothing is dropped past it")
        reaction = r"worker 2 dropped at step \d+: fell behind: .*"
    else:
        row = Row(key, f"stalled worker: compute hung {hang:g} s, heartbeats alive", f"`worker --fault {step}:sleep:{hang:g}`",
                  "liveness is progress: no gradient for `worker_timeout` while the others go on → dropped")
        reaction = r"worker 2 dropped at step \d+: delivered no gradient .*"
    completed(ctx, row, c, codes, [("server", reaction)])
    need(find(c.procs["server"].output, reaction), "the drop")
    row.recovery = (f"{ms(elapsed(started, dropped_at))}: stall → dropped; server memory +{growth:.1f} MiB at peak "
                    f"over the {ms(sampled)} from the stall to 2 s after the drop (start {rss.start / 2**20:.0f} MiB, "
                    f"then {rss.last / 2**20:.0f} MiB)")
    row.facts["rss_growth_mib"] = growth
    code = codes["worker 2"]
    row.notes.append("worker 2 was killed after the run, still asleep" if code < 0 else f"worker 2 exited {code}")
    return row


def integrity(ctx: Ctx) -> Row:
    """A joined rogue (the last worker id) announces more gradient bytes than it sends, then sends
    another frame; the same job where it simply leaves instead is the reference, bit for bit."""
    from bench.hostile import joined, misannounced
    from bench.reliability import Row, completed, ms, same
    from smolcluster.config import load_config

    rogue = ctx.job.workers
    params = {}
    for key, misbehave in (("integrity-leaves", False), ("integrity", True)):
        c = ctx.cluster(key, "cluster.outlier_factor=0")  # only the frame check may stop the canary
        c.start_server()
        c.wait_for_log("server", "listening on", 60)
        for k in range(1, rogue):
            c.start_worker(k)
        flags = c.common()
        cfg = load_config(None, None, flags[1::2])
        t0 = clock()
        sock = joined(c.port, cfg, rogue)
        try:
            answer = misannounced(sock, cfg, rogue) if misbehave else "left"
        finally:
            sock.close()
        codes = c.wait(ctx.job.timeout_s)
        params[key] = c.server_params()
    row = Row("integrity", "frame announces more bytes than it carries", f"joined raw socket as worker {rogue}: a GRAD "
              "header announcing 44 more bytes than follow, then a complete frame (a canary of 1e3s)",
              "protocol v2: an xxh3_64 checksum trailer on every frame, verified before the frame is used")
    pattern = rf"protocol error from worker {rogue} .*failed its checksum.*"
    completed(ctx, row, c, codes, [("server", pattern)])
    hit = find(c.procs["server"].output, pattern)
    if hit is not None:
        row.recovery = f"{ms(elapsed(t0, hit.t))}: join → refused and dropped"
    equal = same(params["integrity"], params["integrity-leaves"])
    row.identical += "; **= the run where it just leaves**" if equal else "; **differs from the run where it leaves**"
    row.quotes.append(f"answer to the rogue: {answer[:200]}")
    return row


SCENARIOS = {
    "integrity": integrity,
    **{key: (lambda ctx, key=key: absurd(ctx, key)) for key in ABSURD},
    "stall": lambda ctx: stall(ctx, "stall"),
    "stall-queue": lambda ctx: stall(ctx, "stall-queue"),
}
