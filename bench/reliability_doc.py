"""docs/reliability.md from the rows bench/reliability.py measured: header, table, one section per policy."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import TYPE_CHECKING, Any

import torch

from bench.cluster import REPO

if TYPE_CHECKING:
    from bench.reliability import Job, Row

COLUMNS = ["Fault", "Injected by", "Handled by", "Steps averaged without a worker", "Late / rejected gradients",
           "Test accuracy (Δ vs clean)", "Time to recover", "Longest step", "Replicas bit-identical",
           "Log names it"]


def machine() -> dict[str, str]:
    """What the numbers were measured on; read before the runs (the load average especially)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                         check=False)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu, "cores": str(os.cpu_count()),
            "load": f"{load:.1f}", "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__,
            "commit": git.stdout.strip() or "unknown"}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        values = [r.fault, r.how, r.policy, r.without, r.late, r.accuracy, r.recovery, r.longest, r.identical, r.named]
        out.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(out)


def quotes(rows: list[Row], keys: list[str]) -> str:
    """The log lines each of the section's runs wrote, then anything else they noted (exit codes, counters)."""
    runs = [r for r in rows if r.key in keys and r.quotes]
    if not runs:
        return "(no run of this section in this report)"
    lines = [line for r in runs for line in (f"# {r.fault}", *r.quotes)]
    noted = [r for r in runs if r.notes]
    notes = [f"{r.fault}: {n}" if len(noted) > 1 else n for r in noted for n in r.notes]
    text = "In the logs of these runs:\n\n```text\n" + "\n".join(lines) + "\n```"
    return text + ("\n\nAlso measured: " + "; ".join(notes) + "." if notes else "")


def fact(rows: list[Row], key: str, name: str) -> Any:
    return next((r.facts[name] for r in rows if r.key == key and name in r.facts), None)


def sections(rows: list[Row], job: Job) -> list[tuple[str, list[str], str]]:
    """(title, the rows it covers, text) per policy; text may use {step_timeout}-style fields."""
    others = " and ".join(f"{k}" for k in job.others)
    restart_s, median_ms = fact(rows, "restart", "restart_s"), fact(rows, "clean", "median_ms")
    pause = ""
    if restart_s is not None and median_ms:
        pause = (f" Without that pause the others go on without worker 2 for as long as a restart takes: here "
                 f"{restart_s:.1f} s, about {restart_s * 1e3 / median_ms:.0f} steps at this job's median step time.")
    return [
        ("Workers that crash, quit or send garbage (`min_workers`)", ["kill", "exit", "disconnect", "garbage"],
         "A worker that crashes, exits or cuts its connection is noticed the moment its socket closes, not after "
         "a timeout; one that sends bytes that are not a frame gets an ERROR frame naming the problem and is "
         "closed. The step in flight is averaged over the gradients that did arrive (weighted by their sample "
         "counts) and training goes on with the others while at least `min_workers` remain, every survivor "
         "bit-identical to the server. What is lost is the dead worker's shard for the rest of the run: that is "
         "the accuracy column. (A SIGKILL takes longer to notice than a clean exit because the kernel tears the "
         "dead process's memory down before it closes its sockets.) A connection cut in the middle of a frame "
         "is logged with how much of which frame arrived; the half frame is discarded.\n\n**Configure** `min_workers` (here {min_workers}): the fewest workers you accept "
         "to train on. A crashed worker can come back at any time with the same `--id` (below)."),
        ("Stragglers (`step_timeout`)", ["sleep"],
         "Once a step's first gradient is in, the server waits at most `step_timeout` ({step_timeout:g} s) for "
         "the rest, then averages what it has (if at least `min_workers`) and names who it is missing. The "
         "straggler stays in the cluster: the gradients it sends for steps already done are dropped and counted "
         "(`late_gradients` in summary.json, `workers/late_gradients` in W&B), it applies the averages waiting "
         "for it in order, and once caught up it is back in step, never drifting (bit-identical column). Every "
         "step it misses costs the others `step_timeout`.\n\n**Configure** `step_timeout` to a few times your "
         "slowest worker's normal step: too low and a hiccup costs that worker's gradient, too high and every "
         "stall costs that long."),
        ("Hung workers (`heartbeat_s`, `worker_timeout`)", ["hung"],
         "A worker that is alive but stuck (SIGSTOP here; a deadlock or a sleeping laptop in life) keeps its "
         "connection open, so no EOF arrives. Until it is declared gone each step waits `step_timeout` for it. "
         "Workers send a heartbeat every `heartbeat_s` ({heartbeat_s:g} s) even while they compute, so a worker "
         "silent for `worker_timeout` ({worker_timeout:g} s) is dropped and the rest go on at full speed.\n\n"
         "**Configure** `worker_timeout` well above `heartbeat_s` and above the longest pause you want to "
         "survive (a busy machine, a long garbage collection); it is also how long a stuck worker can slow the "
         "run down."),
        ("NaN and Inf gradients (always on)", ["nan"],
         "Every gradient is checked before it is averaged. One holding a NaN or an Inf counts as present but is "
         "weighted 0, so it cannot reach any replica; the rejection is logged with the step and the worker and "
         "counted (`nonfinite_gradients`). The worker stays in the cluster.\n\n**Configure** nothing: the check "
         "cannot be turned off."),
        ("A worker comes back (same `--id`)", ["restart"],
         "Restart a crashed worker with the same `--id` and config: the server welcomes it back "
         "(`workers_rejoined`) and at the next step boundary sends it the current parameters and optimizer "
         "state, so it goes on bit-identical to the others. A worker with a different config is refused with the "
         "keys that differ. In this run worker" + ("s " if len(job.others) > 1 else " ") + others + " were paused "
         "(SIGSTOP) from the drop until the new process had joined, only so that this short job was still "
         "running when it arrived (its `step_timeout` and `worker_timeout` were raised so that the pause "
         "timed nothing out; the longest step is the pause)." + pause +
         "\n\n**Configure** nothing; `worker_timeout` and `min_workers` decide whether the run waits for it."),
        ("The server crashes (`checkpoint_steps`, `server --resume`, `reconnect`)", ["resume"],
         "Every `checkpoint_steps` ({checkpoint_steps}) steps the server writes its parameters, optimizer state "
         "and counters to `out_dir/checkpoints`. `smolcluster server --resume` starts from the latest; workers "
         "started with `reconnect: true` keep dialling for up to `connect_timeout` seconds and join the resumed "
         "server, which hands them the checkpointed parameters. The steps since the checkpoint are computed "
         "again on the same batches, so the run ends bit-identical to one that never stopped. The time to "
         "recover counts from the kill; the harness started the new server as soon as the old one was gone, "
         "and most of the time is that process starting (importing torch, reading MNIST) on this machine.\n\n"
         "**Configure** `checkpoint_steps` (work lost at most, against a checkpoint's cost) and, on the "
         "workers, `reconnect: true` with a `connect_timeout` longer than a server restart takes."),
        ("The server dies for good (`reconnect: false`)", ["server-death"],
         "Without `reconnect` a worker treats a lost server as the end of the run: it logs why and exits with "
         "code 1 at once, so scripts and `launch.sh` see the failure and nothing is left hanging.\n\n"
         "**Configure** `reconnect: true` if you mean to resume the server instead."),
        ("Too few workers (`min_workers`, `worker_timeout`)", ["below-min"],
         "When fewer than `min_workers` gradients can arrive, the server does not give up at once: it waits up "
         "to `worker_timeout` from the start of the step, then fails with an error naming the step, who sent "
         "gradients and the policy, sends that error to every worker, and every process exits with code 1. In "
         "this version a worker restarted within that window does not rescue the step: newcomers get the "
         "parameters only at a step boundary, so the step still fails.\n\n"
         "**Configure** a lower `min_workers` to keep going with fewer workers; `worker_timeout` is how long a "
         "run short of workers waits before it fails."),
        ("Absurd but finite gradients (`outlier_factor`, rollback)", ["scale-1e19", "scale-1e30", "scale-early",
                                                                      "scale-off", "rollback"],
         "A gradient of 1e19 or 1e30 (a bug, an fp16 overflow) is finite, so the NaN check lets it through; "
         "averaged in, it drives Adam's second moment to ~1e35 or to inf, and from then on every update is ~0: "
         "the model stops learning on every replica at once, with nothing in the log (the `outlier_factor: 0` "
         "row shows it). Each worker's gradient bucket is therefore admitted by its norm: more than "
         "`outlier_factor` times the median of the recently accepted norms of that bucket (during the first "
         "steps, the lower median of the step's own norms; a norm past float32's range always; one of at most 1 "
         "never) and it is rejected like a NaN one: logged with worker, step and ratio, counted "
         "(`outlier_gradients`), and the step averaged over the others. `training.max_grad_norm` additionally "
         "clips the averaged gradient, identically on every replica. The last line of defence runs after every "
         "optimizer step: if the server's parameters or optimizer state are not finite it restores its last "
         "snapshot (taken every 20 steps), gives up the next step and sends every worker the restored "
         "parameters and optimizer state (`rollbacks`), so no run can end with a non-finite model.\n\n"
         "**Configure** `outlier_factor` (default 10; 0 turns the rule off) and, if you want clipping, "
         "`training.max_grad_norm`."),
        ("Alive but not working (`worker_timeout`, `max_send_queue_mb`)", ["stall", "stall-queue"],
         "A worker whose compute hangs while its heartbeat thread lives used to stay in forever: every step "
         "waited `step_timeout` for it and the server queued averages for a peer that read nothing. Liveness is "
         "now progress: a worker that delivers no gradient for `worker_timeout` ({worker_timeout:g} s) while "
         "the others go on is dropped, however alive its heartbeats look. And every peer's send queue is "
         "bounded (`max_send_queue_mb`; default the larger of 16 MiB and 4 steps of averages): one that falls "
         "further behind is dropped, so the server's memory is bounded by that per worker (plus the kernel's "
         "socket buffer). A dropped worker with `reconnect: true` rejoins and is resynced when it wakes up.\n\n"
         "**Configure** `worker_timeout`, `max_send_queue_mb`."),
        ("Frame integrity (protocol v2 checksums)", ["integrity"],
         "A peer that announces more payload than it sends and then sends its next frame used to get that "
         "frame's bytes read as gradient. Every frame now ends with an 8-byte xxh3_64 of its header and payload, "
         "checked as the bytes arrive and before the frame is handed on: a frame that fails is a protocol error "
         "naming the peer, the peer is dropped, and not one byte of it reaches the average (the run ends "
         "bit-identical to one where the rogue simply leaves). The hash runs at ~24 GB/s; "
         "`bench/checksum_cost.py` measures its share of a step.\n\n**Configure** nothing."),
        ("Connection floods (open-file limit, handshake caps)", [r.key for r in rows if r.key.startswith("flood-")],
         "A few hundred connections that never finish the handshake used to exhaust the server's open files "
         "(macOS's default soft limit is 256) and crash it. The server now raises its soft limit toward the hard "
         "limit at start and logs it; connections that have not authenticated are capped in total and per "
         "source address (derived from the limit: 128 and 16, or 96 and 16 under `ulimit -n 256`), the oldest "
         "shed first with a 'server busy' ERROR; accept() errors (EMFILE) never propagate; a worker whose "
         "handshake is cut retries until `connect_timeout`. The rows compare the median step time under 1,000 "
         "idle or churning connections with reference runs made in turn with them.\n\n**Configure** nothing; "
         "raise `ulimit -n` if you can."),
        ("Damaged files: checkpoints, configs, model files", [r.key for r in rows if r.key.startswith("file-")],
         "Nothing a file holds can crash or hang a process: every malformed file is one error line and a clear "
         "exit code, never a traceback. A checkpoint carries the sha256 of its state file (checked before "
         "anything is read) and every tensor and metadata field is checked against the model and optimizer "
         "before any of it is loaded; a damaged latest checkpoint falls back to the previous one with a warning, "
         "and only when none is usable does `server --resume` exit 1 naming each folder and why. Temp files left "
         "by a server killed while writing a checkpoint are removed on the next save or load. YAML aliases are "
         "bounded (10,000 values, counted without expanding them), quoted values are cut to 200 characters, and "
         "NaN or infinities are refused for every numeric key (exit 2, naming it). `eval` names the first tensor "
         "whose shape the model file's own metadata contradicts (exit 1).\n\n**Configure** `keep_checkpoints` "
         "(at least 2, so there is one to fall back to)."),
        ("Hostile peers (cluster token, `handshake_timeout`, wire checks)", [r.key for r in rows if r.key.startswith("hostile-")],
         "With a cluster token (`$SMOLCLUSTER_TOKEN` or `cluster.token_file`; required off loopback) a peer must "
         "prove it knows the token (an HMAC over nonces from both sides; the token never crosses the wire). "
         "Every frame is checked from its header before any payload is read: magic and version, whether this "
         "peer may send this type now, payload bounds (64 KiB for JSON), exact tensor sizes. A bad frame gets an "
         "ERROR naming the problem and the connection is closed; a connection that says nothing is closed after "
         "`handshake_timeout` ({handshake_timeout:g} s); a second connection for a live worker id is refused. "
         "Only that connection is affected: all these attacks hit one run at once, in the middle of a training "
         "step, and it ended bit-identical to the clean run (`connections_refused` counts the refusals). Worker "
         f"{job.workers} was paused (SIGSTOP) while they lasted, so that this short job could not end before the slowest "
         "attacker (a whole second worker process) was through; the timeouts were raised for this run so the "
         "pause changed no average and dropped nobody.\n\n**Configure** the token on every machine; "
         "`handshake_timeout`."),
    ]


def render(job: Job, rows: list[Row], m: dict[str, str], took_s: float, quick: bool) -> str:
    policy = job.policy
    values = {**policy, "checkpoint_steps": job.checkpoint_steps}
    settings = ", ".join(f"`{k}: {str(v).lower() if isinstance(v, bool) else f'{v:g}' if isinstance(v, float) else v}`"
                         for k, v in values.items())
    test = f"the first {job.test_size}" if job.test_size else "all 10,000"
    failed = [r for r in rows if "failed" in r.named or "**no**" in r.named or "**no**" in r.identical]
    mismatches = sum("**no**" in r.identical for r in rows)
    out = [
        "# Reliability: faults, stragglers and hostile peers",
        "",
        "Generated: every number below comes from a real run on the machine named here. Regenerate with",
        "",
        "```bash",
        "uv run python bench/reliability.py           # this report",
        "uv run python bench/reliability.py --quick   # the same faults on a smaller job (2 workers, 188 steps)",
        "```",
        "",
        f"**Measured** on {m['date']}{' with `--quick`' if quick else ''}: {m['cpu']}, {m['cores']} cores "
        f"(load average {m['load']} when it started: the machine was shared), {m['os']}, Python {m['python']}, "
        f"torch {m['torch']}, smolcluster `{m['commit']}`. The whole report took {took_s / 60:.1f} minutes.",
        "",
        f"**The job.** SimpleNN (784-128-10) on real MNIST (`data/mnist`): the first {job.train_size} training "
        f"images split over {job.workers} workers, batch {job.batch_size} per worker, 1 epoch = {job.steps} steps, "
        f"Adam (lr 0.003, cosine), tested on {test} test images. Each scenario is its own cluster: "
        f"`smolcluster server` and {job.workers} `smolcluster worker` processes over loopback, one torch thread "
        f"each. Worker faults hit worker 2 at step {job.fault_step}; the server is killed at step "
        f"{job.server_kill_step}; the straggler sleeps {job.straggle_s:g} s.",
        "",
        f"**The policy**, in every run unless its row says otherwise: {settings}.",
        "",
        "**Columns.** *Steps averaged without a worker*: steps whose average lacks at least one worker's "
        "gradient, with each worker's steps (from the server log's drop, rejoin, deadline and NaN lines). "
        "*Late / rejected*: `late_gradients` and `nonfinite_gradients` from summary.json. *Test accuracy*: at "
        "the end, Δ in points against the clean run (same config and seed). *Time to recover*: from the fault "
        "(the line the faulty process logs as it injects it, the harness's signal, or the attacker's connect) "
        "to the event named, from log timestamps. *Longest step*: `step_ms.max` from summary.json. *Replicas "
        "bit-identical*: every worker that finished saved its parameters (`worker --save-params`), compared "
        "with `torch.equal` to the server's `model.safetensors`, and `replica_mismatches` is 0. *Log names it*: "
        "the lines quoted in the sections below are in the logs.",
        "",
        table(rows),
        "",
    ]
    if failed:
        out += [f"**{len(failed)} rows show a problem** (bold): see the logs with `--keep DIR`.", ""]
    for title, keys, text in sections(rows, job):
        out += [f"## {title}", "", text.format(**values), "", quotes(rows, keys), ""]
    out += [
        "## Replicas (`checksum_steps`)",
        "",
        f"Every `checksum_steps` ({policy['checksum_steps']}) steps and after the last one, each worker sends a "
        "CRC of its parameters; a mismatch is logged as an error and counted (`replica_mismatches`), and "
        "`replicas_verified` lists the workers whose final checksum matched. In every finished run above, "
        "the saved parameters of every worker that finished were also compared bit for bit with the server's: "
        + ("all equal." if not mismatches else f"**{mismatches} rows differ**."),
        "",
    ]
    return "\n".join(out)
