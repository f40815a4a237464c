"""Time to accuracy on slow links, and accuracy on non-IID data: `uv run --group bench python -m bench.tta [--quick]`.

Part 1, time to accuracy: SimpleNN (784-128-10) on MNIST, 4 workers, batch 32 each, behind emulated
links (100 Mbit/s and 1 Gbit/s per port: every process in a network namespace of its own, its port
shaped by `tc tbf`; bench.proxy links of the same rates where namespaces cannot be built). Systems:
sync fp32, sync int8, local_sgd (FedAvg) H=4 and H=16, diloco H=16 and H=64. Each is a real
`smolcluster server` and 4 `smolcluster worker` processes; the server appends every evaluation (on
the full test set) to out_dir/evals.jsonl with the training time so far (evaluations left out) and
the bytes through its port. This script watches that file while the run goes on and stops the run
at the first evaluation at or above the target (97.5 %): its `time_s` and `bytes` are the time and
bytes to accuracy. A run that does not get there within its epochs or the wall-clock cap is reported
as not reached (with an estimate, labelled as one, where the same system crossed on another link).

Part 2, non-IID: `dataset.partition=dirichlet` at alpha 0.1 and 1.0, 4 workers, 5 epochs on loopback:
the final test accuracy of sync, FedAvg, FedProx (fixed and adaptive mu) and DiLoCo.

The baseline keeps smolcluster's defaults (Adam, lr 0.003, cosine over the run); the local modes
share one inner learning rate (--local-lr, default 0.002, picked on a loopback pilot: with the
default 0.003 DiLoCo's outer Nesterov step overshoots and it crosses 97.5 % about 1.5 epochs later;
at 0.001 FedAvg H=16 does). Every run has the same epoch cap (--epochs), so the same cosine schedule.

Writes tta.json, tta.md and tta.png (accuracy against training time, one line per system, one panel
per link) into bench/ (--out DIR elsewhere) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from bench import netns, report, smol
from bench.matrix import LINKS, MODELS, Link
from bench.netns import LOOPBACK, Star
from bench.procs import REPO, BenchError, Group

TARGET = 97.5
"""Test accuracy (%) the time is measured to (the target's)."""
FP32_RATIO, INT8_RATIO = 1 / 5, 1 / 2
"""The targets at 100 Mbit/s: a local mode reaches TARGET in at most this share of sync
fp32's (sync int8's) time."""
NONIID_TARGET = 95.0
"""...and at alpha 0.1 the best local mode's final accuracy is at least this."""
EVERY = 50
"""Evaluate about every this many local steps (sync: steps; local modes: max(1, EVERY // H) rounds)."""


@dataclass(frozen=True)
class System:
    """One way of training: its overrides; H local steps per round (1: sync)."""

    name: str
    overrides: tuple[str, ...] = ()
    local_steps: int = 1

    @property
    def local(self) -> bool:
        return any(o.startswith("training.algorithm=") and not o.endswith("=sync") for o in self.overrides)

    def eval_steps(self, every: int) -> int:
        return max(1, every // self.local_steps)


def _local(name: str, algorithm: str, h: int, *extra: str) -> System:
    inner = ("training.optimizer=adamw",) if algorithm == "diloco" else ()  # the paper's inner AdamW
    return System(name, (f"training.algorithm={algorithm}", f"training.local_steps={h}", *inner, *extra), h)


TTA_SYSTEMS = [
    System("sync fp32"),
    System("sync int8", ("cluster.compression=int8",)),
    _local("local_sgd H=4", "local_sgd", 4),
    _local("local_sgd H=16", "local_sgd", 16),
    _local("diloco H=16", "diloco", 16),
    _local("diloco H=64", "diloco", 64),
]
"""Part 1's rows, in report order."""

NONIID_H = 16
NONIID_SYSTEMS = [
    System("sync"),
    _local(f"FedAvg (local_sgd H={NONIID_H})", "local_sgd", NONIID_H),
    _local(f"FedProx (local_sgd H={NONIID_H}, mu=0.01)", "local_sgd", NONIID_H, "training.prox_mu=0.01"),
    _local(f"FedProx adaptive (local_sgd H={NONIID_H}, mu from 0.01)", "local_sgd", NONIID_H,
           "training.prox_mu=0.01", "training.prox_adaptive=true"),
    _local(f"DiLoCo (H={NONIID_H})", "diloco", NONIID_H),
]
"""Part 2's rows, in report order."""

QUICK_TTA = [TTA_SYSTEMS[0], _local("diloco H=4", "diloco", 4)]
QUICK_NONIID = [_local("FedAvg (local_sgd H=4)", "local_sgd", 4)]
QUICK_SET = ["dataset.train_size=2048", "dataset.test_size=1000"]
"""--quick: 2 workers on 2048 training samples, 1 epoch, loopback only; 2 systems in part 1 and one
in part 2 (every launch costs seconds of start-up: 3 processes importing torch)."""


@dataclass
class Plan:
    links: list[Link | None]
    """None: loopback."""
    systems: list[System]
    noniid: list[System]
    alphas: list[float]
    workers: int
    epochs: int
    noniid_epochs: int
    target: float
    local_lr: float
    cap_s: float
    every: int
    extra: list[str]
    out: Path
    quick: bool
    notes: list[str] = field(default_factory=list)
    render: Path | None = None

    @property
    def logs(self) -> Path:
        return (REPO / "bench" / "out" / "tta" if self.out.resolve() == REPO / "bench" else self.out) / "logs"

    def overrides(self, system: System, epochs: int) -> list[str]:
        base = [*MODELS["SimpleNN"], f"cluster.num_workers={self.workers}", "training.batch_size=32",
                f"training.num_epochs={epochs}", "training.threads=1", "training.device=cpu",
                "wandb.mode=disabled", "cluster.checkpoint_steps=0", *self.extra]
        lr = [f"training.learning_rate={self.local_lr:g}"] if system.local else []
        return [*base, *lr, *system.overrides]


def link_name(link: Link | None) -> str:
    return "loopback" if link is None else link.name


def link_label(link: Link | None) -> str:
    return "loopback (no emulation)" if link is None else link.describe()


# -- one run, watched ------------------------------------------------------------------------------

def read_evals(path: Path) -> list[dict[str, Any]]:
    """evals.jsonl so far (a last line still being written is left for the next look)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def watch(group: Group, names: list[str], out: Path, target: float | None, cap_s: float) -> dict[str, Any]:
    """Wait for the run to finish, reach `target` (then stop it) or run past `cap_s` seconds (stop
    it); a process that fails raises BenchError. Returns what the run left: evaluations, how it ended."""
    started = time.monotonic()
    path = out / "evals.jsonl"
    while True:
        evals = read_evals(path)
        if target is not None and any(e["test_accuracy"] >= target for e in evals):
            ended = "target"
            break
        codes = {n: p.poll() for n, p in group.procs.items()}
        bad = [n for n, c in codes.items() if c not in (None, 0)]
        if bad:
            raise BenchError(f"{bad[0]} exited with code {codes[bad[0]]}:\n{group.tail(bad[0])}")
        if all(codes[n] == 0 for n in names):
            evals = read_evals(path)
            ended = "finished"
            break
        if time.monotonic() - started > cap_s:
            evals = read_evals(path)
            ended = "cap"
            break
        time.sleep(0.1)
    wall = time.monotonic() - started
    group.kill_all()
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if ended == "finished" and summary_path.exists() else None
    return {"evals": evals, "ended": ended, "wall_s": round(wall, 1), "summary": summary}


def launch(plan: Plan, name: str, overrides: list[str], link: Link | None, target: float | None) -> dict[str, Any]:
    """One cluster run behind `link` (None: loopback), watched; the processes are gone on return."""
    logs = plan.logs / re.sub(r"[^A-Za-z0-9.=-]+", "_", name)
    shutil.rmtree(logs, ignore_errors=True)  # an evals.jsonl left by an earlier benchmark would read as this run's
    with Group(logs) as group:
        if link is not None and link.via == "netns":
            with Star(plan.workers + 1, link.mbit) as star:
                names, out = smol.start(group, overrides, plan.workers, hosts=star)
                return watch(group, names, out, target, plan.cap_s)
        spec = link.spec if link is not None else None
        names, out = smol.start(group, overrides, plan.workers, link=spec, hosts=LOOPBACK)
        return watch(group, names, out, target, plan.cap_s)


# -- part 1 ----------------------------------------------------------------------------------------

def tta_row(plan: Plan, system: System, link: Link | None) -> dict[str, Any]:
    ov = [*plan.overrides(system, plan.epochs), f"training.eval_steps={system.eval_steps(plan.every)}"]
    row: dict[str, Any] = {"link": link_name(link), "mbit": None if link is None else link.mbit,
                           "system": system.name, "local_steps": system.local_steps, "local": system.local,
                           "overrides": [o for o in ov if not o.startswith(("model.", "wandb."))]}
    what = f"{system.name} [{row['link']}]"
    logger.info(f"{what}: starting (cap {plan.cap_s:.0f} s)")
    try:
        run = launch(plan, f"tta-{row['link']}-{system.name}", ov, link, plan.target)
    except (BenchError, OSError, ValueError) as e:
        logger.error(f"{what} failed: {e}")
        return {**row, "error": str(e).splitlines()[0], "reached": False, "evals": []}
    evals = run["evals"]
    hit = next((e for e in evals if e["test_accuracy"] >= plan.target), None)
    last = evals[-1] if evals else None
    row.update(ended=run["ended"], wall_s=run["wall_s"], evals=evals, reached=hit is not None,
               time_s=hit and hit["time_s"], bytes=hit and hit["bytes"], step=hit and hit["step"],
               epoch=hit and hit["epoch"], final_accuracy=last and last["test_accuracy"],
               final_step=last and last["step"], final_epoch=last and last["epoch"],
               final_time_s=last and last["time_s"], final_bytes=last and last["bytes"],
               best_accuracy=max((e["test_accuracy"] for e in evals), default=None))
    if hit:
        logger.info(f"{what}: {plan.target:g} % at {hit['time_s']:.1f} s, {hit['bytes'] / 1e6:.0f} MB "
                    f"(step {hit['step']}, epoch {hit['epoch']:.2f}); wall {run['wall_s']:.0f} s")
    else:
        logger.info(f"{what}: not reached ({run['ended']}); last {last and last['test_accuracy']} %, "
                    f"wall {run['wall_s']:.0f} s")
    return row


def estimate(rows: list[dict[str, Any]]) -> None:
    """A row that did not reach the target, where the same system did on another link: its own
    seconds and bytes per step times the step at which it crossed there. Labelled an estimate."""
    for r in rows:
        if r["reached"] or not r.get("final_step"):
            continue
        other = next((o for o in rows if o["reached"] and o["system"] == r["system"] and o["link"] != r["link"]), None)
        if other is None:
            continue
        per_step, bytes_per_step = r["final_time_s"] / r["final_step"], r["final_bytes"] / r["final_step"]
        r["estimate"] = {"time_s": round(per_step * other["step"], 1), "bytes": round(bytes_per_step * other["step"]),
                         "how": f"this run's {per_step:.3f} s and {bytes_per_step / 1e6:.2f} MB per step x step "
                                f"{other['step']}, where it crossed on {other['link']}"}


def ratios(rows: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """Per link and local mode: its time to target over sync fp32's and sync int8's. A sync row that
    did not get there bounds its time from below by its training time when stopped, so the ratio is
    an upper bound ("<"); against an estimate, the ratio is an estimate too."""
    out = []
    for link in dict.fromkeys(r["link"] for r in rows):
        on = [r for r in rows if r["link"] == link]
        base = {name: next((r for r in on if r["system"] == name), None) for name in ("sync fp32", "sync int8")}
        for r in on:
            if not r["local"]:
                continue
            entry: dict[str, Any] = {"link": link, "mbit": r["mbit"], "system": r["system"]}
            for key, b in (("fp32", base["sync fp32"]), ("int8", base["sync int8"])):
                entry[key] = _ratio(r, b)
            out.append(entry)
    return out


def _ratio(r: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    if base is None or base.get("error"):
        return {"value": None, "kind": "no baseline"}
    if not r["reached"]:
        return {"value": None, "kind": "not reached"}
    if base["reached"]:
        return {"value": r["time_s"] / base["time_s"], "kind": "measured"}
    if base.get("final_time_s"):
        bound = {"value": r["time_s"] / base["final_time_s"], "kind": "upper bound"}
        if base.get("estimate"):
            bound["vs_estimate"] = r["time_s"] / base["estimate"]["time_s"]
        return bound
    return {"value": None, "kind": "baseline has no evaluation"}


def targets(rows: list[dict[str, Any]], rat: list[dict[str, Any]], noniid: list[dict[str, Any]],
            target: float) -> list[dict[str, Any]]:
    out = []
    slow = [e for e in rat if e["mbit"] == 100]
    if slow:
        for key, limit in (("fp32", FP32_RATIO), ("int8", INT8_RATIO)):
            known = [e for e in slow if e[key]["value"] is not None]
            best = min(known, key=lambda e: e[key]["value"], default=None)
            no_base = all(e[key]["kind"] in ("no baseline", "baseline has no evaluation") for e in slow)
            met = None if no_base else best is not None and best[key]["value"] <= limit
            what = (f"best local mode {best['system']}: {_fmt_ratio(best[key])}" if best
                    else f"sync {key} did not run" if no_base else "no local mode reached the target")
            out.append({"target": f"at 100 Mbit/s a local mode reaches {target:g} % in <= {limit:g} x sync {key}'s "
                                  "time",
                        "link": slow[0]["link"], "met": met, "detail": what})
    at = [r for r in noniid if r["alpha"] == 0.1 and r["local"] and r.get("test_accuracy") is not None]
    if any(r["alpha"] == 0.1 for r in noniid):
        best = max(at, key=lambda r: r["test_accuracy"], default=None)
        out.append({"target": f"non-IID alpha 0.1: the best local mode's final accuracy >= {NONIID_TARGET:g} %",
                    "met": best is not None and best["test_accuracy"] >= NONIID_TARGET,
                    "detail": f"{best['system']}: {best['test_accuracy']:.2f} %" if best else "no local mode finished"})
    return out


# -- part 2 ----------------------------------------------------------------------------------------

def noniid_row(plan: Plan, system: System, alpha: float) -> dict[str, Any]:
    ov = [*plan.overrides(system, plan.noniid_epochs), "dataset.partition=dirichlet", f"dataset.alpha={alpha:g}",
          "training.eval_steps=0"]
    row: dict[str, Any] = {"alpha": alpha, "system": system.name, "local_steps": system.local_steps,
                           "local": system.local,
                           "overrides": [o for o in ov if not o.startswith(("model.", "wandb."))]}
    what = f"non-IID alpha={alpha:g} {system.name}"
    logger.info(f"{what}: starting")
    try:
        run = launch(plan, f"noniid-{alpha:g}-{system.name}", ov, None, None)
    except (BenchError, OSError, ValueError) as e:
        logger.error(f"{what} failed: {e}")
        return {**row, "error": str(e).splitlines()[0], "test_accuracy": None}
    s = run["summary"]
    if run["ended"] != "finished" or s is None:
        return {**row, "error": f"did not finish within {plan.cap_s:.0f} s", "test_accuracy": None,
                "wall_s": run["wall_s"]}
    logger.info(f"{what}: {s['test_accuracy']:.2f} % in {run['wall_s']:.0f} s")
    return {**row, "test_accuracy": s["test_accuracy"], "test_loss": s["test_loss"], "epochs": s.get("epochs"),
            "steps": s.get("steps"), "train_s": s.get("train_s"), "wall_s": run["wall_s"],
            "bytes": s.get("bytes_moved")}


# -- report ----------------------------------------------------------------------------------------

def _fmt_ratio(r: dict[str, Any]) -> str:
    if r["value"] is None:
        return f"n/a ({r['kind']})"
    text = f"{'< ' if r['kind'] == 'upper bound' else ''}{r['value']:.3f}"
    if "vs_estimate" in r:
        text += f" (~{r['vs_estimate']:.3f} vs the estimate)"
    return text


def _verdict(e: dict[str, Any], key: str, limit: float) -> str:
    """At 100 Mbit/s (where the targets are set): whether this mode alone meets the limit."""
    if e["mbit"] != 100 or e[key]["value"] is None:
        return ""
    return f" (<= {limit:g}: {'yes' if e[key]['value'] <= limit else 'no'})"


def _failed(first: str, system: str, error: str, dashes: int) -> str:
    """A table row for a run that failed: its error, and a dash for every other column."""
    return f"| {first} | {system} | failed: {error} |" + " - |" * dashes


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:,.0f}"


def _yes(met: bool | None) -> str:
    return "not measured" if met is None else "**holds**" if met else "**does not hold**"


def _n(k: int, what: str) -> str:
    return f"{k} {what}{'' if k == 1 else 's'}"


def _s(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def markdown(res: dict[str, Any]) -> str:
    m, p = res["meta"], res["plan"]
    sizes = [o.split("=", 1)[1] for o in p["extra"] if o.startswith("dataset.test_size=")]
    test_set = f"first {int(sizes[-1]):,} test images" if sizes else "full test set of 10,000 images"
    lines = [f"# Time to {p['target']:g} % accuracy on slow links, and non-IID accuracy",
             "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}, torch {m['torch']}. Commit `{m['commit']}`"
             f"{' (with uncommitted changes in the working tree)' if m.get('dirty') else ''}. "
             f"Run {m['when']}, {m['duration_s']:.0f} s in all.",
             f"`uptime` before: `{m['uptime_before']}`; after: `{m['uptime_after']}`.",
             f"Command: `{m['command']}`",
             "",
             f"Part 1: SimpleNN (784-128-10, {res['params']:,} parameters) on MNIST, {p['workers']} workers, "
             f"batch 32 per worker, every run capped at {_n(p['epochs'], 'epoch')} (the cosine schedule runs over "
             "them) and "
             f"{p['cap_s']:.0f} s of wall clock. Sync: smolcluster's defaults (Adam, lr 0.003, cosine). Local modes: "
             f"one inner lr for all, {p['local_lr']:g} (cosine over the local steps); local_sgd (FedAvg): inner Adam, "
             f"the averaged change applied as is; diloco: inner AdamW (weight_decay 0, the config default), outer "
             f"SGD lr 0.7, Nesterov momentum 0.9. Evaluation on the {test_set} every "
             f"{p['every']} steps (local modes: every max(1, {p['every']} // H) rounds, i.e. ~{p['every']} local "
             "steps); "
             f"time = the server's training time at that evaluation (evaluations left out, start-up too), bytes = "
             f"through the server's port so far. A run is stopped at its first evaluation >= {p['target']:g} %, so its "
             "'acc at end' is that evaluation's (or a later one's, if the server made one before this script, "
             "looking every 0.1 s, stopped it).",
             f"Links: {'; '.join(res['links'])}.",
             ""]
    lines += ["## Part 1: time to accuracy", "",
              f"| link | system | time to {p['target']:g} % (s) | MB to {p['target']:g} % | step (epoch) | "
              "acc at end (%) | ended | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["tta"]:
        if r.get("error"):
            lines.append(_failed(r["link"], r["system"], r["error"], 5))
            continue
        ended = {"target": "reached, stopped", "finished": f"all {_n(p['epochs'], 'epoch')}",
                 "cap": f"cap {p['cap_s']:.0f} s"}[r["ended"]]
        if r["reached"]:
            t, b, s = f"{r['time_s']:.1f}", _mb(r["bytes"]), f"{r['step']} ({r['epoch']:.2f})"
        else:
            t = f"not reached within {_s(r['final_time_s'])} s" if r.get("final_time_s") is not None else "not reached"
            if r.get("estimate"):
                t += f"; **estimate** ~{r['estimate']['time_s']:.0f} s"
            b = f"> {_mb(r['final_bytes'])}" if r.get("final_bytes") is not None else "-"
            s = f"> {r['final_step']} ({r['final_epoch']:.2f})" if r.get("final_step") else "-"
        acc = "-" if r.get("final_accuracy") is None else f"{r['final_accuracy']:.2f}"
        lines.append(f"| {r['link']} | {r['system']} | {t} | {b} | {s} | {acc} | {ended} | {r['wall_s']:.0f} |")
    est = [r for r in res["tta"] if r.get("estimate")]
    if est:
        lines += [""] + [f"Estimate for {r['system']} [{r['link']}] (extrapolated, not measured): "
                         f"~{r['estimate']['time_s']:.0f} s, ~{_mb(r['estimate']['bytes'])} MB; {r['estimate']['how']}."
                         for r in est]
    if res["ratios"]:
        lines += ["", f"Time to {p['target']:g} % of each local mode over the sync baselines' on the same link "
                      "(same run; '<': the baseline did not get there, its time so far is the bound; at "
                      "100 Mbit/s, whether the mode alone meets the target):", "",
                  "| link | local system | / sync fp32 | / sync int8 |", "|---|---|---|---|"]
        for e in res["ratios"]:
            cells = [_fmt_ratio(e[key]) + _verdict(e, key, limit) for key, limit in (("fp32", FP32_RATIO),
                                                                                  ("int8", INT8_RATIO))]
            lines.append(f"| {e['link']} | {e['system']} | {cells[0]} | {cells[1]} |")
    if res["noniid"]:
        lines += ["", "## Part 2: non-IID (dirichlet), final test accuracy", "",
                  f"{p['workers']} workers, {_n(p['noniid_epochs'], 'epoch')}, loopback, evaluation at the end only "
                  f"({test_set}); local modes H={', '.join(map(str, p['noniid_local_steps']))}, inner lr "
                  f"{p['local_lr']:g}, diloco as "
                  "above; sync at the defaults.", "",
                  "| alpha | system | test accuracy (%) | test loss | train s | wall s | MB moved |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["noniid"]:
            if r.get("error"):
                lines.append(_failed(f"{r['alpha']:g}", r["system"], r["error"], 4))
                continue
            lines.append(f"| {r['alpha']:g} | {r['system']} | {r['test_accuracy']:.2f} | {r['test_loss']:.4f} | "
                         f"{r['train_s']:.1f} | {r['wall_s']:.0f} | {_mb(r['bytes'])} |")
    if res["targets"]:
        lines += ["", "## Targets", ""]
        lines += [f"- {t['target']}: {_yes(t['met'])} ({t['detail']})" for t in res["targets"]]
    notes = [*res["notes"], *([] if p["quick"] else method_notes(res))]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def method_notes(res: dict[str, Any]) -> list[str]:
    """What a reader needs to weigh the numbers (the same for every full run, some read off its rows)."""
    p = res["plan"]
    out = [f"One seed, one run per row. Near {p['target']:g} % the curves hover for a while (tta.png), so a "
           "crossing can move by a few evaluations with the seed or the evaluation cadence: read ratios near a "
           "target's limit with that in mind.",
           f"The local rows' inner lr ({p['local_lr']:g}) was chosen on a loopback pilot before this run (one seed, "
           "same 8-epoch cosine; 0.0005, 0.001, 0.002, 0.003 tried): at the default 0.003 local_sgd H=16 crossed "
           "earliest (epoch 2.9) but diloco H=16 and H=64 only at epochs 5.7 and 5.6; at 0.001 diloco crossed at "
           "4.3-4.6 and local_sgd H=16 at 6.0; 0.002 put every local row at 3.6-4.1 (as in this run). Sync was "
           "not tuned.",
           "'time' is the server's training time (process start-up and evaluations left out); 'wall s' is the "
           "whole launch: start-up (5 processes importing torch on 2 cores), evaluations, and this script's "
           "polling.",
           "Part 1 runs stop at the target, so their 'acc at end' is at (or just past) the crossing, not a "
           "converged accuracy; Part 2 gives full 5-epoch final accuracies (there on a dirichlet split).",
           "FedProx adaptive: mu starts at 0.01 and moves by 0.1 per round after a rise of the averaged loss, down "
           "after 5 falls (FedProx's heuristic, src/smolcluster/local.py).",
           "The 1-minute load average 'after' still counts this benchmark's own 5 processes."]
    done = [r for r in res["tta"] if r.get("reached")]
    steps: dict[str, set[int]] = {}
    for r in done:
        steps.setdefault(r["system"], set()).add(r["step"])
    if len(res["links"]) > 1 and steps and all(len(v) == 1 for v in steps.values()):
        out.append("Every system crossed at the same step on every link (same seed, same data order, same "
                   "arithmetic): the links change only the time per step, not the training.")
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    """Test accuracy against training time, one line per system, one panel per link."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    links = list(dict.fromkeys(r["link"] for r in res["tta"]))
    if not links:
        return
    target = res["plan"]["target"]
    fig, axes = plt.subplots(1, len(links), figsize=(6.5 * len(links), 4.8), squeeze=False)
    for ax, link in zip(axes[0], links, strict=True):
        for r in (r for r in res["tta"] if r["link"] == link and r.get("evals")):
            xs = [max(e["time_s"], 1e-2) for e in r["evals"]]
            ys = [e["test_accuracy"] for e in r["evals"]]
            (line,) = ax.plot(xs, ys, marker=".", markersize=3, linewidth=1.2, label=r["system"])
            if r["reached"]:
                acc = next(e["test_accuracy"] for e in r["evals"] if e["step"] == r["step"])
                ax.plot([max(r["time_s"], 1e-2)], [acc], "o", color=line.get_color(), markersize=7,
                        markerfacecolor="none")
        ax.axhline(target, color="k", linestyle="--", linewidth=0.8, label=f"{target:g} %")
        ax.set_xscale("log")
        ax.set_ylim(max(80.0, target - 12), 100)
        ax.set_xlabel("training time (s, log; evaluations left out)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(next((d for d in res["links"] if d.startswith(link)), link), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    m = res["meta"]
    fig.suptitle(f"smolcluster time to {target:g} % — SimpleNN/MNIST, {res['plan']['workers']} workers — "
                 f"{m['cpu']}, {m['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> Plan:
    p = argparse.ArgumentParser(prog="python -m bench.tta", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a tiny version for the smoke test: 2 workers, 2048 samples, 1 epoch, loopback, 2 systems "
                        "in part 1 and 1 in part 2 (one alpha), target 80 %%; writes into bench/out/tta-quick "
                        "unless --out")
    p.add_argument("--out", type=Path, help="where tta.json/.md/.png go (default bench/)")
    p.add_argument("--links", default="100mbit-ns,1gbit-ns",
                   help="emulated links from bench/matrix.py LINKS, or loopback (default 100mbit-ns,1gbit-ns; "
                        "the netns ones fall back to the proxy links of the same rate without root)")
    p.add_argument("--systems", help="comma list of part 1 system names (default: all)")
    p.add_argument("--parts", default="tta,noniid", help="tta, noniid or both (default)")
    p.add_argument("--alphas", default="0.1,1.0", help="dirichlet alphas for part 2 (default 0.1,1.0)")
    p.add_argument("--target", type=float, default=TARGET, help=f"test accuracy %% (default {TARGET:g})")
    p.add_argument("--epochs", type=int, default=8, help="part 1 epoch cap per run (default 8)")
    p.add_argument("--noniid-epochs", type=int, default=5, help="part 2 epochs (default 5)")
    p.add_argument("--cap-s", type=float, default=600.0, help="wall-clock cap per run, seconds (default 600)")
    p.add_argument("--local-lr", type=float, default=0.002,
                   help="inner learning rate of every local-mode row (default 0.002; sync keeps the default 0.003)")
    p.add_argument("--every", type=int, default=EVERY, help=f"evaluate every ~this many local steps (default {EVERY})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    p.add_argument("--render", type=Path, metavar="TTA_JSON",
                   help="measure nothing: rewrite the .md and .png next to this tta.json (after a change to the "
                        "report)")
    a = p.parse_args(argv)
    parts = {x.strip() for x in a.parts.split(",") if x.strip()}
    workers, every, extra, epochs, target = 4, a.every, list(a.set), a.epochs, a.target
    systems, noniid, alphas = TTA_SYSTEMS, NONIID_SYSTEMS, [float(x) for x in a.alphas.split(",") if x.strip()]
    links = [x.strip() for x in a.links.split(",") if x.strip()]
    notes: list[str] = []
    if a.quick:
        workers, every, extra, epochs, noniid_epochs = 2, 8, [*QUICK_SET, *extra], 1, 1
        systems, noniid, alphas, links = QUICK_TTA, QUICK_NONIID, alphas[:1], ["loopback"]
        target = a.target if a.target != TARGET else 80.0
        notes.append("--quick: a smoke test, not a measurement (2 workers, 2048 training and 1000 test samples, "
                     "1 epoch, loopback)")
    else:
        noniid_epochs = a.noniid_epochs
    if a.systems:
        wanted = [x.strip() for x in a.systems.split(",")]
        unknown = [w for w in wanted if w not in {s.name for s in systems}]
        if unknown:
            p.error(f"unknown system(s) {unknown}; choose from {[s.name for s in systems]}")
        systems = [s for s in systems if s.name in wanted]
    chosen: list[Link | None] = []
    bad = [x for x in links if x != "loopback" and x not in LINKS]
    if bad:
        p.error(f"unknown link(s) {bad}; choose from {['loopback', *LINKS]}")
    reason = netns.available()
    for x in links:
        link = None if x == "loopback" else LINKS[x]
        if link is not None and link.via == "netns" and reason:
            fallback = next(k for k, v in LINKS.items() if v.via == "proxy" and v.mbit == link.mbit)
            notes.append(f"netns unavailable ({reason}): {x} replaced by the proxy link {fallback} "
                         f"({LINKS[fallback].describe()})")
            link = LINKS[fallback]
        chosen.append(link)
    out = a.out or REPO / "bench" / ("out/tta-quick" if a.quick else "")
    return Plan(links=chosen if "tta" in parts else [], systems=systems, noniid=noniid if "noniid" in parts else [],
                alphas=alphas, workers=workers, epochs=epochs, noniid_epochs=noniid_epochs, target=target,
                local_lr=a.local_lr, cap_s=a.cap_s, every=every, extra=extra, out=out, quick=a.quick, notes=notes,
                render=a.render)


def main(argv: list[str] | None = None) -> int:
    from smolcluster import log

    argv = sys.argv[1:] if argv is None else argv
    plan = parse_args(argv)
    log.setup("bench")
    if plan.render:
        res = json.loads(plan.render.read_text())
        res["targets"] = targets(res["tta"], res["ratios"], res["noniid"], res["plan"]["target"])
        text = markdown(res)
        print(text)
        plan.render.with_suffix(".md").write_text(text)
        if res["tta"]:
            plot(res, plan.render.with_suffix(".png"))
        return 0
    started = time.time()
    meta = {**report.machine_info(), "commit": report.sh("git", "rev-parse", "--short", "HEAD"),
            "dirty": bool(report.sh("git", "status", "--porcelain", "--untracked-files=no")),
            "command": "uv run --group bench python -m bench.tta" + (f" {shlex.join(argv)}" if argv else ""),
            "argv": ["python", *list(getattr(sys, "orig_argv", sys.argv))[1:]],  # no path of this machine
            "uptime_before": report.sh("uptime"),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    logger.info(f"tta on {meta['cpu']} ({meta['cores']} cores); load {meta['uptime_before']}; results -> {plan.out}")
    rows = [tta_row(plan, s, link) for link in plan.links for s in plan.systems]
    estimate(rows)
    rat = ratios(rows, plan)
    non = [noniid_row(plan, s, alpha) for alpha in plan.alphas for s in plan.noniid]
    meta.update(uptime_after=report.sh("uptime"), load_after=report.load_average(),
                duration_s=round(time.time() - started, 1))
    res = {"meta": meta,
           "plan": {"workers": plan.workers, "epochs": plan.epochs, "noniid_epochs": plan.noniid_epochs,
                    "target": plan.target, "local_lr": plan.local_lr, "cap_s": plan.cap_s, "every": plan.every,
                    "extra": plan.extra, "quick": plan.quick, "alphas": plan.alphas,
                    "noniid_local_steps": sorted({s.local_steps for s in plan.noniid if s.local})},
           "links": [f"{link_name(x)}: {link_label(x)}" for x in plan.links],
           "params": 784 * 128 + 128 + 128 * 10 + 10,
           "tta": rows, "ratios": rat, "noniid": non, "targets": targets(rows, rat, non, plan.target),
           "notes": plan.notes}
    text = markdown(res)
    print(text)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "tta.json").write_text(json.dumps(res, indent=1) + "\n")
    (plan.out / "tta.md").write_text(text)
    if rows:
        try:
            import matplotlib  # noqa: F401  (the `bench` dependency group)
        except ImportError as e:
            logger.warning(f"no plot: {e} (run with `uv run --group bench`)")
        else:
            plot(res, plan.out / "tta.png")
    failed = [r for r in rows if r.get("error")] + [r for r in non if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
