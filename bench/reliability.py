"""Faults, stragglers and hostile peers, measured on real runs: regenerates docs/reliability.md.

    uv run python bench/reliability.py            # about 10 minutes on 2 cores
    uv run python bench/reliability.py --quick    # a smaller job, the same faults
    uv run python bench/reliability.py --only kill,nan --out /tmp/r.md

Every scenario is a cluster of its own: `smolcluster server` and 3 `smolcluster worker`
processes over loopback, started as tests/e2e/test_faults.py starts them (bench/cluster.py), on
real MNIST, with the fault injected by `--fault` flags, signals or raw sockets. Outcomes come from
what a user has after a run: the server's summary.json, the timestamps of the log lines, and the
parameters every process saved. Nothing here asserts; a scenario that fails says so in its row.
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repository root, for `bench`

import torch

from bench import reliability_doc as doc
from bench import reliability_poison as poison
from bench.reliability_files import file_rows
from bench.reliability_flood import flood_rows
from bench.cluster import REPO, Cluster, wait_for
from bench.hostile import attacks
from bench.logtimes import Hit, clock, elapsed, find, missing_steps, of_day
from smolcluster import auth


@dataclass(frozen=True)
class Job:
    """The training job of every scenario, and the steps its faults hit."""

    name: str
    train_size: int
    test_size: int
    """0: all 10,000 test images."""
    fault_step: int
    server_kill_step: int
    checkpoint_steps: int
    workers: int = 3
    batch_size: int = 16
    straggle_s: float = 5.0
    """How long the straggler sleeps (more than step_timeout)."""
    policy: dict = field(default_factory=lambda: dict(POLICY))
    """Cluster settings of every run (a scenario overrides a few); the report prints them."""
    timeout_s: float = 300.0
    """A scenario still running after this long is killed and reported as hung."""
    hang_s: float = 300.0
    """How long a stalled worker's compute hangs (its heartbeats go on)."""

    @property
    def others(self) -> list[int]:
        """The workers that are not worker 2, the faulty one."""
        return [k for k in range(1, self.workers + 1) if k != 2]

    @property
    def steps(self) -> int:
        return math.ceil(self.train_size // self.workers / self.batch_size)

    def args(self) -> list[str]:
        sets = {
            "dataset.name": "MNIST", "dataset.train_size": self.train_size, "dataset.test_size": self.test_size,
            "training.batch_size": self.batch_size, "training.num_epochs": 1, "training.eval_steps": 0,
            "training.threads": 1, "wandb.mode": "disabled",
            "cluster.checkpoint_steps": self.checkpoint_steps, "cluster.connect_timeout": 60,
            "cluster.join_timeout": 120, **{f"cluster.{k}": v for k, v in self.policy.items()},
        }
        return [a for k, v in sets.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]


POLICY = {"min_workers": 1, "step_timeout": 2.0, "worker_timeout": 10.0, "heartbeat_s": 1.0,
          "handshake_timeout": 3.0, "checksum_steps": 50, "reconnect": False}
FULL = Job("full", train_size=30000, test_size=0, fault_step=200, server_kill_step=250, checkpoint_steps=100)
QUICK = Job("quick", train_size=6000, test_size=2000, fault_step=40, server_kill_step=60, checkpoint_steps=25,
            workers=2, straggle_s=3.0, policy={**POLICY, "worker_timeout": 5.0}, timeout_s=180.0, hang_s=40.0)
TOKEN = "reliability report token"


@dataclass
class Row:
    """One line of the table, plus the log lines its prose section quotes."""

    key: str
    fault: str
    how: str
    policy: str
    without: str = "—"
    late: str = "—"
    accuracy: str = "—"
    recovery: str = "—"
    longest: str = "—"
    identical: str = "—"
    named: str = "—"
    quotes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, float] = field(default_factory=dict)
    """Numbers the prose uses (restart_s, median_ms)."""


@dataclass
class Ctx:
    job: Job
    tmp: Path
    clean: dict | None = None
    clean_params: dict[str, torch.Tensor] | None = None
    clusters: list[Cluster] = field(default_factory=list)

    def cluster(self, key: str, *overrides: str, env: dict[str, str] | None = None) -> Cluster:
        """A fresh cluster in its own folder (a stale checkpoint there would be resumed from)."""
        shutil.rmtree(self.tmp / key, ignore_errors=True)
        c = Cluster(self.tmp / key, workers=self.job.workers, base=self.job.args(),
                    args=[a for o in overrides for a in ("--set", o)], extra_env=env or {})
        self.clusters.append(c)
        return c


# --- measuring a finished run ------------------------------------------------------------------


def server_log(c: Cluster) -> str:
    return "\n".join(p.output for name, p in c.procs.items() if name.startswith("server"))


def survivors(c: Cluster, codes: dict[str, int]) -> list[int]:
    """Ids whose last process finished training: exited 0 and saved its parameters (`exit` exits 0 early)."""
    last = {int(name.split()[1]): name for name in c.procs if name.startswith("worker ")}
    return sorted(k for k, name in last.items()
                  if codes.get(name) == 0 and (c.tmp / f"worker-{k}.safetensors").exists())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def replicas(c: Cluster, ids: list[int], summary: dict) -> str:
    server = c.server_params()
    differ = [k for k in ids if not same(server, c.worker_params(k))]
    if differ or summary["replica_mismatches"]:
        return f"**no**: {', '.join(f'w{k}' for k in differ)} differ ({summary['replica_mismatches']} checksum mismatches)"
    text = f"yes ({', '.join(f'w{k}' for k in ids)})"
    if summary["replicas_verified"] != ids:
        text += f"; checksums from {summary['replicas_verified']}"
    return text


def named(row: Row, c: Cluster, expect: list[tuple[str, str]]) -> None:
    """Does each (process, pattern) appear in that process's log? Quote the lines for the prose."""
    missed = []
    for proc, pattern in expect:
        hit = find(c.procs[proc].output, pattern)
        if hit is None:
            missed.append(f"{proc}: /{pattern}/")
        else:  # the run's temporary folder means nothing to a reader
            row.quotes.append(f"{proc}: {hit.text.replace(str(c.tmp), '<run>')}")
    row.named = "yes" if not missed else "**no**: " + "; ".join(missed)


def completed(ctx: Ctx, row: Row, c: Cluster, codes: dict[str, int], expect: list[tuple[str, str]]) -> dict:
    """Fill the columns every finished run has; returns its summary."""
    s = c.summary()
    steps = missing_steps(server_log(c), s["steps"])
    row.without = steps.describe()
    row.late = f"{s['late_gradients']} late, {s['nonfinite_gradients']} rejected"
    clean = ctx.clean["test_accuracy"] if ctx.clean else s["test_accuracy"]
    row.accuracy = f"{s['test_accuracy']:.2f} % ({s['test_accuracy'] - clean:+.2f})"
    row.longest = f"{s['step_ms']['max']:.0f} ms"
    row.identical = replicas(c, survivors(c, codes), s)
    named(row, c, expect)
    if codes.get("server") not in (0, None) and "server again" not in codes:
        row.notes.append(f"server exited {codes['server']}")
    return s


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def need(hit: Hit | None, what: str) -> Hit:
    if hit is None:
        raise RuntimeError(f"no log line for {what}")
    return hit


# --- scenarios -----------------------------------------------------------------------------------


def clean(ctx: Ctx) -> Row:
    c = ctx.cluster("clean").start()
    codes = c.wait(ctx.job.timeout_s)
    row = Row("clean", "none (reference run)", "—", "—")
    ctx.clean, ctx.clean_params = c.summary(), c.server_params()
    completed(ctx, row, c, codes, [])
    row.longest += f" (median {ctx.clean['step_ms']['median']:.0f} ms)"
    row.facts["median_ms"] = ctx.clean["step_ms"]["median"]
    return row


WORKER_FAULTS = {
    # key: (row title, --fault kind, policy, the server's reaction)
    "kill": ("worker crash (SIGKILL)", "kill", "EOF: dropped at once, run goes on with the rest (`min_workers`)",
             r"worker 2 dropped at step \d+: .*"),
    "exit": ("worker quits cleanly", "exit", "BYE: dropped at once (`min_workers`)",
             r"worker 2 dropped at step \d+: said goodbye.*"),
    "disconnect": ("disconnect mid-frame", "disconnect", "EOF mid-frame: partial frame discarded, dropped (`min_workers`)",
                   r"worker 2 dropped at step \d+: .*"),
    "garbage": ("garbage instead of a frame", "garbage", "wire check (magic): ERROR to the worker, dropped (`min_workers`)",
                r"protocol error from worker 2 .*"),
    "nan": ("NaN gradient", "nan", "NaN rejection: weighted 0 in that step's average, counted",
            r"step \d+: rejected a non-finite \(NaN/Inf\) gradient from worker 2"),
}


def worker_fault(ctx: Ctx, key: str) -> Row:
    title, kind, policy, reaction = WORKER_FAULTS[key]
    step = ctx.job.fault_step
    c = ctx.cluster(key).start({2: ["--fault", f"{step}:{kind}"]})
    codes = c.wait(ctx.job.timeout_s)
    row = Row(key, title, f"`worker --fault {step}:{kind}`", policy)
    expect = [("server", reaction)]
    if key == "garbage":
        expect += [("server", r"worker 2 dropped at step \d+: .*"), ("worker 2", r"ended our session: .*")]
    completed(ctx, row, c, codes, expect)
    fault = need(find(c.procs["worker 2"].output, rf"step {step}: injecting fault"), "the injection")
    seen = need(find(c.procs["server"].output, reaction), "the server's reaction")
    row.recovery = f"{ms(elapsed(fault.t, seen.t))}: fault → {'rejected' if key == 'nan' else 'dropped'}"
    if key == "disconnect" and "frame" not in seen.text:
        row.named = "partly: as a closed connection, not as a cut-off frame"
    row.notes.append(f"worker 2 exited {codes['worker 2']}")
    return row


def straggler(ctx: Ctx) -> Row:
    step = ctx.job.fault_step
    nap = ctx.job.straggle_s
    c = ctx.cluster("sleep").start({2: ["--fault", f"{step}:sleep:{nap:g}"]})
    codes = c.wait(ctx.job.timeout_s)
    row = Row("sleep", f"straggler: sleeps {nap:g} s", f"`worker --fault {step}:sleep:{nap:g}`",
              "`step_timeout`: the step goes on without it; its late gradients are dropped and counted")
    completed(ctx, row, c, codes, [("server", r"step \d+: waited .*still missing workers \[2\].*"),
                                   ("server", r"step \d+: dropped late gradient of step \d+ from worker 2")])
    fault = need(find(c.procs["worker 2"].output, rf"step {step}: injecting fault"), "the injection")
    waits = find(c.procs["server"].output, r"step \d+: waited", every=True)
    row.recovery = f"{ms(elapsed(fault.t, waits[0].t))}: fault → step done without it"
    if len(waits) > 1:
        row.recovery += f" ({len(waits)} such steps, the last {ms(elapsed(fault.t, waits[-1].t))} after the fault)"
    return row


def hung(ctx: Ctx) -> Row:
    """SIGSTOP: the process is there, its socket open, and it says nothing (no heartbeat, no EOF)."""
    step = ctx.job.fault_step
    # The short sleep only marks the moment: the worker logs it, then the harness stops it.
    c = ctx.cluster("hung").start({2: ["--fault", f"{step}:sleep:1"]})
    c.wait_for_log("worker 2", "injecting fault sleep", timeout=ctx.job.timeout_s)
    c.send_signal("worker 2", signal.SIGSTOP)
    stopped = clock()
    try:
        c.wait_for_log("server", "worker 2 dropped", timeout=60)
    finally:
        c.send_signal("worker 2", signal.SIGKILL)
    codes = c.wait(ctx.job.timeout_s)
    row = Row("hung", "hung worker (SIGSTOP)", f"SIGSTOP worker 2 at step {step}",
              "`heartbeat_s` + `worker_timeout`: silent that long → dropped; `step_timeout` meanwhile")
    completed(ctx, row, c, codes, [("server", r"worker 2 dropped at step \d+: silent for .*")])
    drop = need(find(c.procs["server"].output, r"worker 2 dropped at step \d+: silent"), "the drop")
    waits = find(c.procs["server"].output, r"step \d+: waited", every=True)
    row.recovery = f"{ms(elapsed(stopped, drop.t))}: SIGSTOP → dropped ({len(waits)} steps of `step_timeout` first)"
    return row


def restart(ctx: Ctx) -> Row:
    """Kill worker 2, start it again with the same id; the others pause while it starts (see the doc)."""
    step = ctx.job.fault_step
    # Raised timeouts: the pause must neither time a step out nor look like silence.
    c = ctx.cluster("restart", "cluster.step_timeout=600", "cluster.worker_timeout=600").start(
        {2: ["--fault", f"{step}:kill"]})
    c.wait_for_log("server", "worker 2 dropped", timeout=ctx.job.timeout_s)
    for k in ctx.job.others:
        c.send_signal(f"worker {k}", signal.SIGSTOP)
    try:
        again = c.start_worker(2, name="worker 2 again")
        c.wait_for_log("server", "worker 2 rejoined", timeout=120)
    finally:
        for k in ctx.job.others:
            c.send_signal(f"worker {k}", signal.SIGCONT)
    codes = c.wait(ctx.job.timeout_s)
    row = Row("restart", "worker restarted, rejoins", f"`--fault {step}:kill`, then `worker --id 2` again",
              "rejoin: same id; parameters + optimizer state at the next step boundary")
    completed(ctx, row, c, codes, [("server", r"worker 2 rejoined from .*"),
                                   ("server", r"worker 2 is back in lockstep from step \d+")])
    log = c.procs["server"].output
    joined = need(find(log, r"worker 2 rejoined"), "the rejoin")
    back = need(find(log, r"worker 2 is back in lockstep"), "lockstep")
    row.facts["restart_s"] = elapsed(of_day(again.started), joined.t)
    row.longest += " (the pause)"
    row.recovery = (f"{ms(row.facts['restart_s'])} restart → rejoined, "
                    f"+{ms(elapsed(joined.t, back.t))} → in lockstep")
    return row


def resume(ctx: Ctx) -> Row:
    kill = ctx.job.server_kill_step
    c = ctx.cluster("resume", "cluster.reconnect=true")
    c.start_server("--fault", f"{kill}:kill")
    for k in range(1, ctx.job.workers + 1):
        c.start_worker(k)
    wait_for(lambda: c.procs["server"].popen.poll() is not None, ctx.job.timeout_s, "the server to crash")
    c.start_server("--resume", name="server again")
    codes = c.wait(ctx.job.timeout_s)
    row = Row("resume", "server crash, `--resume`", f"`server --fault {kill}:kill`, then `server --resume`",
              f"`checkpoint_steps` ({ctx.job.checkpoint_steps}), `server --resume`; workers' `reconnect` + `connect_timeout`")
    s = completed(ctx, row, c, codes, [("server again", r"resuming from .*"),
                                       ("worker 1", r"lost the connection .*reconnecting.*")])
    died = need(find(c.procs["server"].output, r"injecting fault kill"), "the server's kill")
    again = c.procs["server again"]
    listening = need(find(again.output, r"listening on"), "the new server listening")
    training = need(find(again.output, r"all \d+ workers joined; training"), "the resumed training")
    resumed_at = int(need(find(again.output, r"resuming from .* at step (\d+)"), "the resume step").match[1])
    row.without = f"0; {kill - resumed_at} steps redone ({resumed_at}–{kill - 1})"
    equal = same(c.server_params(), ctx.clean_params) if ctx.clean_params else False
    row.identical += "; **= uninterrupted run**" if equal else "; **differs from the uninterrupted run**"
    row.recovery = (f"{ms(elapsed(died.t, training.t))}: kill → resumed server training "
                    f"(start-up {ms(elapsed(of_day(again.started), listening.t))})")
    row.notes.append(f"server exited {codes['server']} (SIGKILL), then resumed: {s['test_accuracy']:.2f} %")
    return row


def server_death(ctx: Ctx) -> Row:
    kill = ctx.job.server_kill_step
    c = ctx.cluster("server-death")
    c.start_server("--fault", f"{kill}:kill")
    for k in range(1, ctx.job.workers + 1):
        c.start_worker(k)
    codes = c.wait(ctx.job.timeout_s)
    row = Row("server-death", "server dies, no `reconnect`", f"`server --fault {kill}:kill`",
              "`reconnect: false`: every worker exits with an error at once")
    named(row, c, [("worker 1", r"lost the connection to the server .*")])
    died = need(find(c.procs["server"].output, r"injecting fault kill"), "the server's kill")
    ends = [need(find(c.procs[f"worker {k}"].output, r"lost the connection"), f"worker {k}'s error")
            for k in range(1, ctx.job.workers + 1)]
    row.recovery = f"{ms(max(elapsed(died.t, e.t) for e in ends))}: kill → every worker out"
    row.without = f"— (run ends at step {kill})"
    row.notes.append("exit codes " + ", ".join(f"{n} {v}" for n, v in codes.items()))
    return row


def below_min(ctx: Ctx) -> Row:
    step, n = ctx.job.fault_step, ctx.job.workers
    c = ctx.cluster("below-min", f"cluster.min_workers={n}").start({2: ["--fault", f"{step}:kill"]})
    codes = c.wait(ctx.job.timeout_s)
    row = Row("below-min", f"below `min_workers` ({n} of {n})", f"`min_workers={n}`, `worker --fault {step}:kill`",
              f"`min_workers` + `worker_timeout` ({ctx.job.policy['worker_timeout']:g} s): clear error, everyone exits")
    named(row, c, [("server", r"step \d+: only \d+ (complete )?gradients .*min_workers=\d+"),
                   ("worker 1", r"ended our session: .*")])
    fault = need(find(c.procs["worker 2"].output, r"injecting fault kill"), "the injection")
    error = need(find(c.procs["server"].output, r"only \d+ (complete )?gradients"), "the server's error")
    last = max(elapsed(fault.t, need(find(c.procs[f"worker {k}"].output, r"ended our session"), f"worker {k}").t)
               for k in range(1, n + 1) if k != 2)
    row.recovery = f"{ms(elapsed(fault.t, error.t))}: fault → clear error; all out after {ms(last)}"
    row.without = f"— (run stops at step {step})"
    row.notes.append("exit codes " + ", ".join(f"{k} {v}" for k, v in codes.items()))
    return row


HOSTILE = {
    # attack name in bench/hostile.py: (row title, how, policy, the server's log line)
    "no token": ("no token", "raw socket: HELLO without a proof", "cluster token (HMAC challenge-response): REJECT",
                 r"refused .* claiming worker 2: wrong or missing cluster token"),
    "wrong token": ("wrong token", "raw socket: HELLO proved with another token", "cluster token: REJECT",
                    r"refused .* claiming worker 1: wrong or missing cluster token"),
    "pickle": ("upstream's pickle frame", "raw socket: length + pickle", "wire check (magic, says \"a pickle?\"): ERROR, closed",
               r"protocol error from .*a pickle\?.*"),
    "random bytes": ("random bytes", "raw socket: 4 KiB of os.urandom", "wire check (magic): ERROR, closed",
                     r"protocol error from .*bad magic.*"),
    "says nothing": ("silent connection", "raw socket: connects, sends nothing", "`handshake_timeout`: closed",
                     r"closed connection from .*no valid handshake within .*"),
    "AVG from a client": ("type-confused frame", "raw socket: an AVG frame from a client",
                          "message-type check: ERROR, closed", r"protocol error from .*may not send AVG.*"),
    "oversized": ("oversized length", "raw socket: HELLO header claiming 2 GiB", "length check (JSON ≤ 64 KiB): ERROR, closed",
                  r"protocol error from .*exceeds.*"),
}


def hostile(ctx: Ctx) -> list[Row]:
    """All attacks on one run with a cluster token, mid-step; it must end exactly as the clean run did.

    The last worker is paused (SIGSTOP) while they last, so the server sits in a training step
    waiting for it with the others' gradients in, and this short job cannot end before the slowest
    attacker (a whole second worker process) is through; the timeouts are raised so the pause
    changes no average and drops nobody.
    """
    c = ctx.cluster("hostile", "cluster.step_timeout=600", "cluster.worker_timeout=600",
                    env={auth.TOKEN_ENV: TOKEN}).start()
    c.wait_for_log("server", "workers joined; training", timeout=ctx.job.timeout_s)
    paused = f"worker {ctx.job.workers}"
    c.send_signal(paused, signal.SIGSTOP)
    try:
        duplicate = c.start_worker(1, name="duplicate worker 1")

        def timed(attack: Callable[[], str]) -> tuple[str, float]:
            t0 = time.monotonic()
            answer = attack()
            return answer, time.monotonic() - t0

        with ThreadPoolExecutor(len(HOSTILE)) as pool:  # at once: the slowest waits out handshake_timeout
            futures = {name: pool.submit(timed, attack) for name, attack in attacks(c.port).items()}
            answers = {name: f.result() for name, f in futures.items()}
        duplicate.popen.wait(timeout=120)
    finally:
        c.send_signal(paused, signal.SIGCONT)
    codes = c.wait(ctx.job.timeout_s)
    log = c.procs["server"].output
    rows = []
    for name, (title, how, policy, pattern) in [*HOSTILE.items(), ("duplicate", (
            "duplicate live id", "a second `worker --id 1` process", "one connection per id: REJECT",
            r"refused .* claiming worker 1: worker id 1 is already connected.*"))]:
        row = Row(f"hostile-{name}", title, how, policy)
        s = completed(ctx, row, c, codes, [("server", pattern)])
        if name == "random bytes":  # any bad-magic line but the pickle's
            hits = [h for h in find(log, r"protocol error from .*bad magic.*", every=True) if "pickle" not in h.text]
            row.named, row.quotes = ("yes", [f"server: {hits[0].text}"]) if hits else ("**no**", [])
        if name == "duplicate":
            row.recovery = f"refused; exit {codes['duplicate worker 1']}"
            row.quotes.append(f"duplicate worker 1: {need(find(duplicate.output, r'refused worker 1: .*'), 'refusal').text}")
        else:
            answer, seconds = answers[name]
            row.recovery = f"{ms(seconds)}: connect → closed"
            row.quotes.append(f"answer to the attacker: {answer[:160]}")
        if ctx.clean_params is not None:
            row.identical += "; = clean run" if same(c.server_params(), ctx.clean_params) else "; **differs from clean run**"
        row.longest = "— (paused)"
        rows.append(row)
    rows[-1].notes.append(f"the attacked run counted {s['connections_refused']} refused connections "
                          "(`connections_refused`: the two tokens and the duplicate id)")
    return rows


SCENARIOS: dict[str, Callable[[Ctx], Row | list[Row]]] = {
    "clean": clean,
    **{key: (lambda ctx, key=key: worker_fault(ctx, key)) for key in WORKER_FAULTS},
    "sleep": straggler,
    "hung": hung,
    "restart": restart,
    "resume": resume,
    "server-death": server_death,
    "below-min": below_min,
    "hostile": hostile,
    **poison.SCENARIOS,
    "files": lambda ctx: file_rows(ctx.tmp / "files"),
    "flood": flood_rows,
}


def run_one(ctx: Ctx, key: str) -> list[Row]:
    t0 = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] {key} ...", file=sys.stderr, flush=True)
    try:
        result = SCENARIOS[key](ctx)
        rows = result if isinstance(result, list) else [result]
    except Exception as e:  # one broken scenario must not hide the others: its row says what happened
        traceback.print_exc()
        rows = [Row(key, key, "—", "—", named=f"**scenario failed**: {str(e).splitlines()[0][:200]}")]
    finally:
        while ctx.clusters:
            ctx.clusters.pop().kill()
    print(f"    {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK.workers} workers and {QUICK.train_size} training images "
                    f"instead of {FULL.workers} and {FULL.train_size}")
    ap.add_argument("--only", metavar="KEYS", help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    ap.add_argument("--out", default=str(REPO / "docs" / "reliability.md"), help="where to write the report")
    ap.add_argument("--keep", metavar="DIR", help="keep every run's logs and outputs in DIR")
    args = ap.parse_args()
    job = QUICK if args.quick else FULL
    keys = list(SCENARIOS) if not args.only else ["clean", *[k for k in args.only.split(",") if k != "clean"]]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        ap.error(f"--only: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    t0 = time.monotonic()
    machine = doc.machine()
    with tempfile.TemporaryDirectory(prefix="smolcluster-reliability-") as tmp:
        ctx = Ctx(job, Path(args.keep) if args.keep else Path(tmp))
        rows = [row for key in keys for row in run_one(ctx, key)]
    text = doc.render(job, rows, machine, time.monotonic() - t0, quick=args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
