"""Turn measurements into numbers people can compare: aggregates, ratios, the markdown table, a plot.

Definitions (docs/benchmarks.md says the same for readers):
- ms/step: per launch, the median step time after 5 warm-up steps, on the coordinating process
  (smolcluster's server, the pickle server, DDP rank 0, the single process); a row's value is the
  median over launches, with the min and max over launches.
- wire ms: bytes / throughput. Loopback rows: bytes sent + received by the busiest process over
  the measured loopback throughput. Link rows: bytes through the server's port (in, then out: the
  two phases of a synchronous step) over the link rate, plus one round trip; for DDP's ring, one
  direction's bytes per rank (both flow at once) plus 2(N-1) one-way delays. A parameter server
  can beat its link number slightly: one worker's next gradient overlaps the others' averages.
- comm (est.): ms/step minus the single process's ms/step at batch b (its compute).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from loguru import logger

from bench.matrix import LINKS, PICKLE_SPEEDUP_TARGET, TARGETS, WireBytes, ddp_bytes, link_wire_s


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    if sys.platform == "darwin":
        import subprocess

        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return out.stdout.strip() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sh(*argv: str) -> str:
    """A command's output run in the repository (git, uptime), or "" if it cannot run."""
    import subprocess

    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=Path(__file__).parents[1]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "load_before": load_average()}


def _agg(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    medians = [r["step_ms"]["median"] for r in runs if r["step_ms"]]
    if not medians:
        return None
    return {"median": round(statistics.median(medians), 3), "min": min(medians), "max": max(medians),
            "launches": len(medians)}


def finish(results: dict[str, Any]) -> dict[str, Any]:
    """Add to every row: step_ms aggregate, samples/s, ratio to DDP, wire time and comm estimate."""
    rows, models = results["rows"], results["models"]
    mbps = results["loopback"]["MB_per_s"] * 1e6

    def find(model: str, workers: int, system: str, link: str = "loopback") -> dict[str, Any] | None:
        key = (model, workers, system, link)
        return next((r for r in rows if r["step_ms"] and (r["model"], r["workers"], r["system"], r["link"]) == key),
                    None)

    for r in rows:
        r["step_ms"] = _agg(r["runs"])
        samples = r["batch"] * (1 if r["system"].startswith("single") else r["workers"])
        r["samples_per_s"] = round(1e3 * samples / r["step_ms"]["median"], 1) if r["step_ms"] else None
    for r in rows:
        wire = WireBytes(**r["bytes"]) if r["bytes"] else None
        link = LINKS.get(r["link"])
        single = find(r["model"], 1, "single b", "none")
        ddp = find(r["model"], r["workers"], "ddp-gloo", "loopback" if r["link"] == "none" else r["link"])
        r["ratio_to_ddp"] = r["wire_ms"] = r["comm_ms"] = r["ddp_wire_ms"] = None
        if r["step_ms"] and ddp and r["workers"] > 1:
            r["ratio_to_ddp"] = round(r["step_ms"]["median"] / ddp["step_ms"]["median"], 3)
        if r["step_ms"] and single and r["link"] != "none":
            r["comm_ms"] = round(r["step_ms"]["median"] - single["step_ms"]["median"], 3)
        ring = r["workers"] if r["system"] == "ddp-gloo" else 0
        if wire and link is None:
            r["wire_ms"] = round(1e3 * wire.busiest / mbps, 3)
        elif wire:
            r["wire_ms"] = round(1e3 * link_wire_s(wire, link, ring_workers=ring), 3)
            ring_bytes = ddp_bytes(models[r["model"]]["params"], r["workers"])
            r["ddp_wire_ms"] = round(1e3 * link_wire_s(ring_bytes, link, ring_workers=r["workers"]), 3)
    results["targets"] = _targets(rows, find)
    return results


def _targets(rows: list[dict[str, Any]], find: Any) -> list[dict[str, Any]]:
    """The issue's goals, checked against this run: smolcluster fp32 vs DDP and vs pickle."""
    out = []
    for model, workers in dict.fromkeys((r["model"], r["workers"]) for r in rows if r["workers"] > 1):
        smol, ddp, pkl = (find(model, workers, s) for s in ("smolcluster fp32", "ddp-gloo", "pickle-ps"))
        if not smol:
            continue
        t: dict[str, Any] = {"model": model, "workers": workers}
        if ddp and model in TARGETS:
            t.update(vs_ddp=smol["ratio_to_ddp"], vs_ddp_target=TARGETS[model],
                     vs_ddp_met=smol["ratio_to_ddp"] <= TARGETS[model])
        if pkl:
            speedup = round(pkl["step_ms"]["median"] / smol["step_ms"]["median"], 2)
            t.update(pickle_speedup=speedup, pickle_target=PICKLE_SPEEDUP_TARGET,
                     pickle_met=speedup >= PICKLE_SPEEDUP_TARGET)
        t["vs_ddp_links"] = {link: slow["ratio_to_ddp"] for link in LINKS
                             if (slow := find(model, workers, "smolcluster fp32", link)) and slow["ratio_to_ddp"]}
        out.append(t)
    return out


def _ms(r: dict[str, Any]) -> str:
    s = r["step_ms"]
    if not s:
        return r["note"] or ("failed: " + r["errors"][0] if r["errors"] else "-")
    spread = f" ({s['min']:.2f}–{s['max']:.2f})" if s["launches"] > 1 else ""
    return f"{s['median']:.2f}{spread}"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def _yes(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def markdown(results: dict[str, Any]) -> str:
    """The report: machine, loopback table, link table, targets, notes."""
    m, lb, plan = results["meta"], results["loopback"], results["meta"]["plan"]
    models = ", ".join(f"{k} {v['params']:,} params" for k, v in results["models"].items())
    lines = [
        "## smolcluster benchmark", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; Python {m['python']}, torch {m['torch']}; "
        f"load average before {m['load_before']}, after {m.get('load_after')}.",
        f"Loopback TCP (one Python process to another): {lb['MB_per_s']:.0f} MB/s "
        f"({lb['MB_per_s'] * 8 / 1e3:.1f} Gbit/s). Models: {models}. Batch {plan['batch']} per worker; "
        f"{plan['repeats']} launch(es) per row ({plan['link_repeats']} behind a link); {plan['steps']} steps "
        f"per launch ({plan['link_steps']} behind a link), first 5 not counted; data: {plan['dataset']}.", "",
    ]
    rows = results["rows"]
    lines += _table(
        ["model", "N", "system", "ms/step median (min–max)", "samples/s", "× DDP", "MB/step", "wire ms",
         "comm ms (est.)"],
        [[r["model"], str(r["workers"]), r["system"], _ms(r), _num(r["samples_per_s"], "{:.0f}"),
          _num(r["ratio_to_ddp"]), _num(r["bytes"]["total"] / 1e6 if r["bytes"] else None, "{:.3f}"),
          _num(r["wire_ms"]), _num(r["comm_ms"])]
         for r in rows if r["link"] in ("loopback", "none")])
    link_rows = [r for r in rows if r["link"] in LINKS]
    if link_rows:
        used = dict.fromkeys(r["link"] for r in link_rows)
        lines += ["", "Emulated links: " + "; ".join(f"{k}: {LINKS[k].describe()}" for k in used) + ". "
                  "DDP cannot run behind the proxy (gloo's ranks dial each other directly); the last column "
                  "is its wire time computed from bytes.", ""]
        lines += _table(
            ["model", "N", "system", "link", "ms/step median (min–max)", "samples/s", "× DDP (same link)",
             "wire ms", "DDP ring wire ms (computed)"],
            [[r["model"], str(r["workers"]), r["system"], r["link"], _ms(r), _num(r["samples_per_s"], "{:.0f}"),
              _num(r["ratio_to_ddp"]), _num(r["wire_ms"]), _num(r["ddp_wire_ms"])] for r in link_rows])
    if results["targets"]:
        targets = results["targets"]
        links = list(dict.fromkeys(link for t in targets for link in t["vs_ddp_links"]))
        then = "; then smolcluster / DDP behind the links where both ran." if links else "."
        lines += ["", 'Targets (issue "Speed"), on loopback: smolcluster fp32 step time vs DDP-gloo, and speed-up '
                  f"over the pickle PS{then}", ""]
        lines += _table(
            ["model", "N", "smolcluster / DDP", "target", "met", "pickle / smolcluster", "target", "met",
             *[f"smolcluster / DDP, {link}" for link in links]],
            [[t["model"], str(t["workers"]), _num(t.get("vs_ddp")), "≤ " + _num(t.get("vs_ddp_target"), "{:g}"),
              _yes(t.get("vs_ddp_met")), _num(t.get("pickle_speedup")),
              "≥ " + _num(t.get("pickle_target"), "{:g}"), _yes(t.get("pickle_met")),
              *[_num(t["vs_ddp_links"].get(link)) for link in links]] for t in targets])
    if results["notes"]:
        lines += ["", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], text: str, out: Path) -> None:
    """results.json, results.md, and results.png when matplotlib is installed (`--group bench`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(text)
    try:
        from bench.plot import plot
    except ImportError as e:
        logger.warning(f"no plot: {e} (run with `uv run --group bench`)")
        return
    plot(results, out / "results.png")
    logger.info(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'results.png'}")
