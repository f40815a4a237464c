"""What the dashboard costs training: one smolcluster run with it on and watched, against the same
run with it off.

On: `cluster.http_port` set, and a thread here GETting /api/status and /metrics once a second, as
an open dashboard page and a Prometheus scrape would. Off: `cluster.http_port=0`. Everything else
is the same job (real `smolcluster server` and `worker` processes, `bench.smol`). Runs come in
pairs, back to back, the order alternating (on-off, off-on, ...), so a drift in the machine's
load weighs on both sides alike; each pair gives its own ratio of the server's median step time
(summary.json `step_ms`, warm-up steps left out), on / off. Prints a table, writes JSON and the
table as markdown next to it.

    uv run python -m bench.dashboard_cost [--pairs 5] [--steps 2000] [--model SimpleNN] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from loguru import logger

from bench import report, smol
from bench.matrix import MODELS
from bench.procs import REPO, BenchError, Group

PATHS = ("/api/status", "/metrics")
POLL_S = 1.0
"""Seconds between two rounds of GETs: the page polls /api/status once a second."""


class Poller(threading.Thread):
    """GETs every path in PATHS once per POLL_S, from the server's first answer until it answers
    no more (the run ended) or is stopped; counts the answers, their bytes and times."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True, name="poller")
        self.base, self.stop = f"http://127.0.0.1:{port}", threading.Event()
        self.answers, self.bytes = 0, 0
        self.ms: list[float] = []

    def run(self) -> None:
        while not self.stop.wait(POLL_S):
            for path in PATHS:
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(self.base + path, timeout=5) as r:
                        self.bytes += len(r.read())
                except OSError:
                    if self.answers:
                        return  # it answered before: the run is over
                    break  # not up yet
                self.answers += 1
                self.ms.append(1e3 * (time.perf_counter() - t0))


def one_run(args: argparse.Namespace, on: bool, label: str) -> dict[str, Any]:
    """One cluster run to --steps; the server's step times, and the poller's counts when `on`."""
    from smolcluster.runner import free_port

    port = free_port()
    overrides = [*MODELS[args.model], f"cluster.num_workers={args.workers}", f"training.max_steps={args.steps}",
                 "training.num_epochs=1000", "training.threads=1", "training.eval_steps=0",
                 f"dataset.name={args.dataset}", "wandb.mode=disabled", "training.device=cpu",
                 f"cluster.http_port={port if on else 0}", *args.set]
    poller = Poller(port) if on else None
    with Group(args.out.parent / "logs" / "dashboard_cost" / label) as group:
        if poller:
            poller.start()
        try:
            summary = smol.run(group, overrides, args.workers, args.timeout)
        finally:
            if poller:
                poller.stop.set()
                poller.join()
    row: dict[str, Any] = {"label": label, "dashboard": on, "step_ms": summary["step_ms"],
                           "samples_per_s": summary["samples_per_s"], "train_s": summary["train_s"]}
    if poller:
        row.update(polls=poller.answers, polled_kb=round(poller.bytes / 1e3, 1),
                   poll_ms_median=round(statistics.median(poller.ms), 2) if poller.ms else None)
    return row


def measure(args: argparse.Namespace) -> dict[str, Any]:
    pairs = []
    for i in range(args.pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        runs = {on: one_run(args, on, f"pair{i + 1}-{'on' if on else 'off'}") for on in order}
        ratio = runs[True]["step_ms"]["median"] / runs[False]["step_ms"]["median"]
        pairs.append({"pair": i + 1, "order": ["on" if o else "off" for o in order], "on": runs[True],
                      "off": runs[False], "ratio": round(ratio, 4)})
        logger.info(f"pair {i + 1}/{args.pairs}: on {runs[True]['step_ms']['median']:.2f} ms/step, "
                    f"off {runs[False]['step_ms']['median']:.2f}: {ratio:.3f}")
    ratios = [p["ratio"] for p in pairs]
    return {"pairs": pairs, "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "on_ms_median": statistics.median(p["on"]["step_ms"]["median"] for p in pairs),
            "off_ms_median": statistics.median(p["off"]["step_ms"]["median"] for p in pairs)}


def table(res: dict[str, Any]) -> str:
    p, m = res["plan"], res["meta"]
    lines = [f"Dashboard cost: {p['model']}, {p['workers']} workers, {p['steps']} steps per run, {p['dataset']} data, "
             f"{p['pairs']} pair{'s' * (p['pairs'] != 1)} (order alternating); on = cluster.http_port set and GET {' + '.join(PATHS)} "
             f"every {POLL_S:g} s; off = cluster.http_port 0. {m['cpu']}, {m['cores']} cores; "
             f"load {m['load_before']} before, {m['load_after']} after.", "",
             "| pair | off ms/step | on ms/step | on / off | GETs answered | GET ms (median) |",
             "|---|---|---|---|---|---|"]
    for pair in res["pairs"]:
        on = pair["on"]
        lines.append(f"| {pair['pair']} ({'-'.join(pair['order'])}) | {pair['off']['step_ms']['median']:.2f} | "
                     f"{on['step_ms']['median']:.2f} | {pair['ratio']:.3f} | {on['polls']} | "
                     f"{on['poll_ms_median']} |")
    r = res["ratio"]
    lines.append(f"| **median** | {res['off_ms_median']:.2f} | {res['on_ms_median']:.2f} | "
                 f"**{r['median']:.3f}** ({r['min']:.3f}-{r['max']:.3f}) | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from smolcluster import log

    p = argparse.ArgumentParser(prog="python -m bench.dashboard_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5, help="on/off pairs (default: 5)")
    p.add_argument("--steps", type=int, default=2000, help="steps per run (default: 2000; the poller needs seconds)")
    p.add_argument("--model", default="SimpleNN", choices=sorted(MODELS), help="model (default: SimpleNN, the "
                   "fastest step, where a fixed cost shows most)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dataset", default="MNIST", help="MNIST (default) or synthetic")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides, both sides")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "dashboard_cost.json")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    log.setup("bench")
    meta = {**report.machine_info(), "commit": report.sh("git", "rev-parse", "--short", "HEAD"),
            "command": "uv run python -m bench.dashboard_cost" + (f" {shlex.join(argv)}" if argv else ""),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        result = measure(args)
    except BenchError as e:
        logger.error(str(e))
        return 1
    meta["load_after"] = report.load_average()
    res = {"meta": meta, "plan": {k: v for k, v in vars(args).items() if k != "out"}, **result}
    text = table(res)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
