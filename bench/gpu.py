"""smolcluster on one CUDA GPU: what the device <-> host copies cost, against one process and DDP.

Why: with `training.device=cuda` a worker keeps its model on the GPU, but the wire still works on
CPU memory: each gradient bucket is copied to the host as backward finishes it (FlatModel.stage)
and the averages are copied back before the optimizer step (FlatModel.land). This puts numbers
on that, in one run on one machine, for the 7.9M MLP on MNIST and the char GPT (`--model GPT`)
on tinyshakespeare:

- single-gpu: one process training on the GPU at batch 2b, the 2-worker rows' global batch;
- smolcluster-gpu: real `smolcluster server` (training.device=cpu) and 2 workers (training.device=cuda)
  sharing the one GPU; ms/step is the server's median (summary.json);
- ddp-gloo-cuda: PyTorch DDP, 2 ranks sharing the GPU, CUDA tensors reduced by gloo;
- copy: in this process, a smolcluster worker replica on the GPU: FlatModel.stage of every bucket
  plus FlatModel.land, against its forward + backward + optimizer step (CUDA synchronised around
  each). The copies run here one after the other; a worker overlaps them with backward, so this
  is what they cost, not all of it on the step's critical path.

Repeats are interleaved as in bench/run.py (repeat 1 of every row, then repeat 2, ...). Mid-run
checksums are off (cluster.checksum_steps=0): a CPU server and GPU workers round differently,
and a drift resync is not what this measures. Prints a markdown table, writes bench/gpu.json
and bench/gpu.md. Needs a CUDA GPU, and exits 2 without one. `--device cpu` runs the same rows
on the CPU with a few steps, only to smoke-test this script (tests/test_bench.py); it needs
`--out` and never writes bench/gpu.json.

    uv run --group bench python -m bench.gpu [--quick] [--models mlp,gpt] [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from bench import ddp, report, smol
from bench.dataload import uptime
from bench.matrix import MODELS
from bench.procs import REPO, BenchError, Group
from bench.workload import Shard, data_meta, load, param_count, step_ms_stats, time_single
from smolcluster import log
from smolcluster.devices import COPY_PATH_ENV
from smolcluster.models import PRESETS
from smolcluster.replica import build_replica
from smolcluster.train import cross_entropy, optimizer_step

WORKERS = 2
DEFAULT_OUT = REPO / "bench" / "gpu.json"
QUICK_STEPS, CPU_STEPS = 20, 6


def _preset(name: str) -> tuple[str, ...]:
    """What `--model NAME` sets, as `--set` overrides (as cli.py writes them)."""
    return tuple(f"model.{k}={json.dumps(v)}" for k, v in PRESETS[name].items())


@dataclass(frozen=True)
class Workload:
    """A model and its dataset, as `--set` overrides."""

    name: str
    overrides: tuple[str, ...]
    steps: int
    """Steps per launch on a GPU, unless --steps or --quick say otherwise."""


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("MLP-7.9M on MNIST", (*MODELS["MLP-7.9M"], "dataset.name=MNIST"), 200),
    "gpt": Workload("char GPT on tinyshakespeare", (*_preset("GPT"), "dataset.name=text"), 100),
}

Row = dict[str, Any]
Measure = Callable[[Group], dict[str, Any]]


@dataclass
class Plan:
    """What one run measures (parse_args documents each field)."""

    models: list[str]
    steps: int | None
    repeats: int
    batch: int
    device: str
    quick: bool
    out: Path
    extra: list[str]
    timeout_s: float

    @property
    def logs(self) -> Path:
        """Child logs: bench/out/gpu-logs for the committed bench/gpu.json, else next to --out."""
        committed = self.out.resolve() == DEFAULT_OUT
        return REPO / "bench" / "out" / "gpu-logs" if committed else self.out.parent / "gpu-logs"

    def steps_for(self, w: Workload) -> int:
        return self.steps or (CPU_STEPS if self.device == "cpu" else QUICK_STEPS if self.quick else w.steps)

    def overrides(self, w: Workload, batch: int) -> list[str]:
        """Every process's `--set` list, as bench/run.py's Plan.overrides, then --set's own."""
        return [*w.overrides, f"cluster.num_workers={WORKERS}", f"training.batch_size={batch}",
                f"training.max_steps={self.steps_for(w)}", "training.num_epochs=1000", "training.threads=1",
                "training.eval_steps=0", "dataset.test_size=256", "wandb.mode=disabled",
                "cluster.checksum_steps=0", *self.extra]


def names(device: str) -> tuple[str, str, str]:
    """Row names: what ran where (a CPU smoke test never calls itself a GPU result)."""
    if device == "cuda":
        return "single-gpu", "smolcluster-gpu", "ddp-gloo-cuda"
    return "single-cpu", "smolcluster-cpu", "ddp-gloo-cpu"


# --- measurements -------------------------------------------------------------------------------


def _release(device: str) -> None:
    """Give this process's GPU memory (single, copy) back before the next launch needs it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def single(overrides: list[str], steps: int, device: str) -> dict[str, Any]:
    """One process on `device` (bench/workload.py's loop, synchronised at each step's end)."""
    return {"step_ms": step_ms_stats(time_single(load(overrides), steps, device))}


def ddp_gloo(group: Group, overrides: list[str], steps: int, device: str, timeout_s: float) -> dict[str, Any]:
    """WORKERS DDP ranks on `device` over gloo; rank 0's step times."""
    return {"step_ms": step_ms_stats(ddp.run(group, overrides, WORKERS, steps, timeout_s, device=device))}


def cluster(group: Group, overrides: list[str], device: str, timeout_s: float) -> dict[str, Any]:
    """A CPU server and WORKERS workers on `device`; fails if a worker computed anywhere else."""
    summary = smol.run(group, overrides, WORKERS, timeout_s, server_set=("training.device=cpu",),
                       worker_set=(f"training.device={device}",))
    workers = {k: v for k, v in summary.get("devices", {}).items() if k != "server"}
    if len(workers) != WORKERS or not all(v.startswith(device) for v in workers.values()):
        raise BenchError(f"workers did not all compute on {device}: {summary.get('devices')}")
    return {"step_ms": summary["step_ms"], "samples_per_s": summary["samples_per_s"], "devices": summary["devices"]}


def copy_cost(overrides: list[str], steps: int, device: str) -> dict[str, Any]:
    """ms per step of a worker replica's device <-> host copies (stage every bucket, then land)
    and of its forward + backward + optimizer step, medians over `steps` after warm-up. On the
    CPU the copy path is forced (SMOLCLUSTER_COPY_PATH=1), so the smoke test runs the same code."""
    cfg = load([*overrides, f"training.device={device}"])
    saved = os.environ.get(COPY_PATH_ENV)
    os.environ[COPY_PATH_ENV] = "1"  # read once, when the replica's FlatModel is built
    try:
        replica = build_replica(cfg, meta=data_meta(cfg))
    finally:
        if saved is None:
            del os.environ[COPY_PATH_ENV]
        else:
            os.environ[COPY_PATH_ENV] = saved
    model, flat, dev = replica.model, replica.flat, replica.device

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    compute, copy = [], []
    for step, (x, y) in enumerate(Shard(cfg, 1, WORKERS).batches(steps, device)):
        t0 = now()
        flat.zero_grad()
        loss = cross_entropy(model(x), y)
        flat.loss = loss.item()
        loss.backward()
        t1 = now()
        for bucket in replica.buckets:
            flat.stage(bucket.lo, bucket.hi)
        flat.land()
        t2 = now()
        optimizer_step(replica.optimizer, cfg.training, step, steps)
        t3 = now()
        compute.append(t1 - t0 + t3 - t2)
        copy.append(t2 - t1)
    copy_ms, compute_ms = step_ms_stats(copy)["median"], step_ms_stats(compute)["median"]
    mb = 2 * 4 * (flat.numel + flat.nbuf) / 1e6  # out and back in
    return {"copy_ms": copy_ms, "compute_ms": compute_ms,
            "copy_share_pct": round(100 * copy_ms / (copy_ms + compute_ms), 2), "copy_mb": round(mb, 3),
            "copy_gb_per_s": round(mb / max(copy_ms, 1e-6), 2)}


# --- the run ------------------------------------------------------------------------------------


def _once(plan: Plan, row: Row, measure: Measure) -> None:
    """One launch; a failure is recorded in the row, never fatal to the benchmark."""
    what = f"{row['workload']} {row['system']}"
    rep = len(row["runs"]) + len(row["errors"]) + 1
    try:
        with Group(plan.logs / re.sub(r"[^A-Za-z0-9.=-]+", "_", f"{what}-r{rep}")) as group:
            run = measure(group)
    except (BenchError, OSError, ValueError, KeyError, RuntimeError) as e:
        logger.error(f"{what} repeat {rep} failed: {e}")
        row["errors"].append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return
    finally:
        _release(plan.device)
    row["runs"].append(run)
    if "step_ms" in run:
        logger.info(f"{what} repeat {rep}: {run['step_ms'].get('median', float('nan')):.2f} ms/step")
    else:
        logger.info(f"{what} repeat {rep}: {run['copy_ms']:.3f} ms, compute {run['compute_ms']:.3f} ms "
                    f"({run['copy_share_pct']:.1f}%)")


def measure(plan: Plan) -> tuple[dict[str, Any], list[Row]]:
    """Every workload's rows, repeats interleaved; returns (workloads, rows)."""
    single_name, smol_name, ddp_name = names(plan.device)
    workloads, rows = {}, []
    for key in plan.models:
        w, steps = WORKLOADS[key], plan.steps_for(WORKLOADS[key])
        ov, ov_single = plan.overrides(w, plan.batch), plan.overrides(w, WORKERS * plan.batch)
        workloads[key] = {"name": w.name, "params": param_count(load(ov)), "overrides": ov, "steps": steps,
                          "batch_per_worker": plan.batch, "global_batch": WORKERS * plan.batch}
        logger.info(f"{key}: {w.name}, {workloads[key]['params']:,} parameters, {steps} steps per launch")

        def row(system: str) -> Row:
            return {"workload": key, "system": system, "batch": WORKERS * plan.batch, "runs": [], "errors": [],
                    "note": ""}

        r_single, r_smol, r_ddp, r_copy = row(single_name), row(smol_name), row(ddp_name), row("copy")
        cases: list[tuple[Row, Measure]] = [
            (r_single, lambda g: single(ov_single, steps, plan.device)),
            (r_smol, lambda g: cluster(g, ov, plan.device, plan.timeout_s)),
            (r_ddp, lambda g: ddp_gloo(g, ov, steps, plan.device, plan.timeout_s)),
            (r_copy, lambda g: copy_cost(ov, steps, plan.device)),
        ]
        for _ in range(plan.repeats):
            for r, m in cases:
                _once(plan, r, m)
        r_smol["copy"] = {"runs": r_copy["runs"], "errors": r_copy["errors"]}
        rows += [r_single, r_smol, r_ddp]
    return workloads, rows


def finish(rows: list[Row]) -> list[Row]:
    """Per row: ms/step over launches (report.py's aggregate), samples/s, ratio to the same
    workload's single-process row, and for smolcluster the copy medians over launches."""
    for r in rows:
        r["step_ms"] = report._agg(r["runs"])
        r["samples_per_s"] = round(1e3 * r["batch"] / r["step_ms"]["median"], 1) if r["step_ms"] else None
    for r in rows:
        base = next(s for s in rows if s["workload"] == r["workload"] and s["system"].startswith("single"))
        r["ratio_to_single"] = (round(r["step_ms"]["median"] / base["step_ms"]["median"], 3)
                                if r["step_ms"] and base["step_ms"] else None)
        runs = r.get("copy", {}).get("runs")
        if runs:
            med = {k: round(statistics.median(run[k] for run in runs), 3)
                   for k in ("copy_ms", "compute_ms", "copy_share_pct", "copy_mb", "copy_gb_per_s")}
            step = r["step_ms"]["median"] if r["step_ms"] else None
            med["share_of_step_pct"] = round(100 * med["copy_ms"] / step, 2) if step else None
            r["copy"].update(med)
    return rows


def _copy_cells(r: Row) -> list[str]:
    """The copy columns: ms, and share of compute + copy (of the measured step)."""
    c = r.get("copy")
    if not c:
        return ["", ""]
    if c.get("copy_share_pct") is None:
        return ["-", "failed: " + c["errors"][0] if c["errors"] else "-"]
    return [f"{c['copy_ms']:.3f}", f"{c['copy_share_pct']:.1f}% ({report._num(c['share_of_step_pct'], '{:.1f}')}%)"]


def markdown(result: dict[str, Any]) -> str:
    """The header (machine, GPU, load, plan) and one table row per workload and system."""
    m, plan = result["meta"], result["meta"]["plan"]
    where = (f"GPU: {m['gpu']} (CUDA {m['cuda']})" if m["device"] == "cuda"
             else "**CPU smoke test, not a GPU result** (--device cpu)")
    lines = [
        "## smolcluster on one GPU", "",
        f"{where}; torch {m['torch']}; CPU: {m['cpu']}, {m['cores']} cores; {m['os']}.",
        f"uptime before: `{m['uptime_before']}`; after: `{m['uptime_after']}`.",
        f"Batch {plan['batch']} per worker, {WORKERS} workers; the single process at {WORKERS * plan['batch']} "
        f"(the same global batch). {plan['repeats']} launch(es) per row, interleaved; steps per launch: "
        + ", ".join(f"{k} {w['steps']}" for k, w in result["workloads"].items())
        + " (the first 5 not counted when there are more than 10). smolcluster's server runs on the CPU, its "
        f"workers and DDP's ranks share the one {'GPU' if m['device'] == 'cuda' else 'CPU'}. "
        "Copy: FlatModel.stage of every bucket + FlatModel.land in one worker replica, and its share of "
        "compute + copy (of the measured step in brackets)."
        + (f" Extra config: {', '.join(plan['extra'])}." if plan["extra"] else ""), "",
    ]
    body = [[result["workloads"][r["workload"]]["name"], r["system"], report._ms(r),
             report._num(r["samples_per_s"], "{:.0f}"), report._num(r["ratio_to_single"]), *_copy_cells(r)]
            for r in result["rows"]]
    lines += report._table(["workload", "system", "ms/step median (min–max)", "samples/s", "× single (ms/step)",
                            "copy ms/step", "copy share"], body)
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--steps", type=int, help="steps per launch (default: mlp 200, gpt 100; --quick "
                                             f"{QUICK_STEPS}; --device cpu {CPU_STEPS})")
    p.add_argument("--repeats", type=int, help="launches per row, interleaved (default 3; --quick 1)")
    p.add_argument("--batch", type=int, default=32, help="per-worker batch size b (default 32)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, one launch per row")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke test of this script on a machine without a GPU (needs --out)")
    p.add_argument("--out", type=Path, help="the JSON (and .md beside it); default bench/gpu.json")
    p.add_argument("--set", action="append", default=[], dest="extra", metavar="KEY=VALUE",
                   help="more config for every process, after the workload's (e.g. dataset.train_size=512)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="deadline for one launch (default 300)")
    a = p.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not models or any(m not in WORKLOADS for m in models):
        p.error(f"--models: choose from {', '.join(WORKLOADS)}")
    if a.steps is not None and a.steps < 2:
        p.error("--steps must be at least 2")
    if a.device == "cpu" and (a.out is None or a.out.resolve() == DEFAULT_OUT):
        p.error("--device cpu is a smoke test of this script: give --out PATH (bench/gpu.json holds GPU results only)")
    return Plan(models=models, steps=a.steps, repeats=a.repeats or (1 if a.quick else 3), batch=a.batch,
                device=a.device, quick=a.quick, out=a.out or DEFAULT_OUT, extra=a.extra, timeout_s=a.timeout_s)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON and .md; 2 without CUDA, 1 if a launch failed."""
    plan = parse_args(argv)
    if plan.device == "cuda" and not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        print(f"bench.gpu: needs a CUDA GPU, and {why} (torch {torch.__version__}); nothing measured",
              file=sys.stderr)
        return 2
    log.setup("bench")
    started = time.time()
    meta = {**report.machine_info(), "device": plan.device, "uptime_before": uptime(),
            "gpu": torch.cuda.get_device_name(0) if plan.device == "cuda" else None, "cuda": torch.version.cuda}
    logger.info(f"bench.gpu on {meta['gpu'] or 'the CPU (smoke test)'}, torch {meta['torch']}; results -> {plan.out}")
    workloads, rows = measure(plan)
    meta.update(plan={k: str(v) if isinstance(v, Path) else v for k, v in vars(plan).items()},
                duration_s=round(time.time() - started, 1), uptime_after=uptime(), load_after=report.load_average())
    result = {"meta": meta, "workloads": workloads, "rows": finish(rows)}
    text = markdown(result)
    print(text)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    plan.out.write_text(json.dumps(result, indent=2) + "\n")
    plan.out.with_suffix(".md").write_text(text)
    logger.info(f"wrote {plan.out} and {plan.out.with_suffix('.md')}")
    ok = all(r["runs"] for r in rows) and all(r["copy"]["runs"] for r in rows if "copy" in r)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
