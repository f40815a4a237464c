"""Run the benchmark: `uv run --group bench python -m bench [--quick]` (docs/benchmarks.md).

For every model and worker count, in one run and on the same data: one process at batch b and
at b*N, DDP-gloo, the pickle parameter server, and each smolcluster variant; then smolcluster
behind emulated slow links. Repeats are interleaved (repeat 1 of every system, then repeat 2...)
so a change in background load hits every system alike. Prints a markdown table and writes
results.json and results.png.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from bench import ddp, loopback, netns, pickle_ps, report, smol
from bench.matrix import (LINKS, MODELS, VARIANTS, Link, Variant, WireBytes, ddp_bytes, link_wire_s, pickle_bytes,
                          ps_bytes)
from bench.netns import LOOPBACK, Hosts, Star
from bench.procs import REPO, BenchError, Group

SYSTEMS = ("single", "ddp", "torch", "pickle", "smolcluster")
QUICK = {"models": "SimpleNN", "workers": "2", "repeats": 1, "steps": 12, "dataset": "synthetic",
         "links": "1gbit", "link_steps": 11}
"""What --quick changes: the smallest case of everything, one launch each."""


@dataclass
class Plan:
    """Everything one run of the benchmark will do (`parse_args` documents each field)."""

    models: list[str]
    workers: list[int]
    repeats: int
    steps: int
    batch: int
    systems: list[str]
    variants: list[Variant]
    links: list[str]
    link_systems: list[str]
    link_steps: int
    link_repeats: int
    link_budget_s: float
    dataset: str
    timeout_s: float
    loopback_mib: int
    out: Path
    quick: bool
    render: Path | None = None
    """Measure nothing: recompute the report from this results.json (after a change to report.py)."""

    @property
    def logs(self) -> Path:
        """Child logs: next to the results, except that the committed bench/ keeps them in bench/out/."""
        return (REPO / "bench" / "out" if self.out.resolve() == REPO / "bench" else self.out) / "logs"

    def overrides(self, model: str, workers: int, batch: int, steps: int) -> list[str]:
        """The `--set` list every process of one measurement gets (baselines read it with load_config)."""
        return [*MODELS[model], f"cluster.num_workers={workers}", f"training.batch_size={batch}",
                f"training.max_steps={steps}", "training.num_epochs=1000", "training.threads=1",
                "training.eval_steps=0", f"dataset.name={self.dataset}", "dataset.test_size=256",
                "wandb.mode=disabled", "training.device=cpu"]  # CPU rows everywhere (bench/gpu.py: GPUs)


@dataclass
class Row:
    """One line of the table: a system on a model, worker count and link, over all its repeats."""

    model: str
    workers: int
    system: str
    link: str
    batch: int
    wire: WireBytes | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Per launch: {"step_ms": {"median", "min", "max", "steps"}, ...}."""
    errors: list[str] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes"] = d.pop("wire")
        return d


Measure = Callable[[Group], dict[str, Any]]


class Bench:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def run(self) -> dict[str, Any]:
        from bench.workload import load, param_count

        plan = self.plan
        variants = [v for v in plan.variants if self._accepted(v)] if "smolcluster" in plan.systems else []
        links = [LINKS[name] for name in plan.links]
        if any(link.via == "netns" for link in links) and (reason := netns.available()):
            self.notes.append(f"skipped the netns links (the only ones DDP can run behind): {reason}")
            links = [link for link in links if link.via != "netns"]
        with Group(plan.logs / "loopback") as group:
            wire_speed = loopback.measure(group, repeats=1 if plan.quick else 3, nbytes=plan.loopback_mib << 20)
        logger.info(f"loopback TCP: {wire_speed['MB_per_s']:.0f} MB/s")
        models = {}
        for model in plan.models:
            params = param_count(load(plan.overrides(model, 1, plan.batch, plan.steps)))
            models[model] = {"params": params, "overrides": MODELS[model]}
            logger.info(f"{model}: {params:,} parameters")
            if "single" in plan.systems:
                self._repeat([self._single(model, 1)])
            for n in plan.workers:
                self._repeat(self._loopback_cases(model, n, params, variants))
                for link in links:
                    self._repeat(self._link_cases(model, n, params, variants, link), plan.link_repeats)
        return {"models": models, "loopback": wire_speed, "rows": [r.to_json() for r in self.rows],
                "notes": self.notes}

    def _accepted(self, variant: Variant) -> bool:
        """Whether this smolcluster knows the variant's config keys; notes the reason if not."""
        from smolcluster.config import ConfigError, load_config

        try:
            load_config(None, None, variant.overrides)
            return True
        except ConfigError as e:
            reason = str(e).split("; known keys", 1)[0]
            self.notes.append(f"skipped smolcluster {variant.name}: this smolcluster rejects it ({reason})")
            return False

    def _repeat(self, cases: list[tuple[Row, Measure]], repeats: int | None = None) -> None:
        """Every case once, then again, `repeats` times (interleaved, so load drifts hit all alike)."""
        for _ in range(self.plan.repeats if repeats is None else repeats):
            for row, measure in cases:
                self._once(row, measure)

    def _once(self, row: Row, measure: Measure) -> None:
        """One launch; a failure is recorded in the row, never fatal to the benchmark."""
        what = f"{row.model} N={row.workers} {row.system} [{row.link}]"
        rep = len(row.runs) + len(row.errors) + 1
        name = re.sub(r"[^A-Za-z0-9.=-]+", "_", f"{what}-r{rep}")
        try:
            with Group(self.plan.logs / name) as group:
                run = measure(group)
        except (BenchError, OSError, ValueError, KeyError) as e:
            logger.error(f"{what} repeat {rep} failed: {e}")
            row.errors.append(str(e).splitlines()[0])
            return
        row.runs.append(run)
        logger.info(f"{what} repeat {rep}: {run['step_ms'].get('median', float('nan')):.2f} ms/step")

    def _add(self, row: Row, measure: Measure) -> tuple[Row, Measure]:
        self.rows.append(row)
        return row, measure

    def _single(self, model: str, workers: int) -> tuple[Row, Measure]:
        from bench.workload import load, step_ms_stats, time_single

        batch, steps = self.plan.batch * workers, self.plan.steps
        cfg = load(self.plan.overrides(model, 1, batch, steps))
        system = "single b" if workers == 1 else "single b*N"
        return self._add(Row(model, workers, system, "none", batch),
                         lambda group: {"step_ms": step_ms_stats(time_single(cfg, steps))})

    def _loopback_cases(self, model: str, n: int, params: int, variants: list[Variant]) -> list[tuple[Row, Measure]]:
        plan = self.plan
        ov = plan.overrides(model, n, plan.batch, plan.steps)
        cases = []
        if "single" in plan.systems:
            cases.append(self._single(model, n))
        if "ddp" in plan.systems:
            cases.append(self._ddp(model, n, params, ov, None))
        if "torch" in plan.systems:
            cases.append(self._torch(model, n, params, ov))
        if "pickle" in plan.systems:
            cases.append(self._pickle(model, n, ov, None))
        cases += [self._smol(model, n, params, v, ov, None) for v in variants]
        return cases

    def _link_cases(self, model: str, n: int, params: int, variants: list[Variant],
                    link: Link) -> list[tuple[Row, Measure]]:
        """Systems behind `link`; DDP only where it can be slowed down too (netns), and nothing
        that would take longer than the budget (predicted from its bytes)."""
        plan = self.plan
        ov = plan.overrides(model, n, plan.batch, plan.link_steps)
        wanted = [s for s in plan.link_systems if s in plan.systems]
        cases = []
        if "ddp" in wanted and link.via == "netns":
            cases.append(self._ddp(model, n, params, ov, link))
        if "pickle" in wanted:
            cases.append(self._pickle(model, n, ov, link))
        if "smolcluster" in wanted:
            cases += [self._smol(model, n, params, v, ov, link) for v in variants]
        kept = []
        for row, measure in cases:
            ring = n if row.system == "ddp-gloo" else 0
            predicted = link_wire_s(row.wire or ps_bytes(params, n, 4.0), link, ring_workers=ring)
            if predicted * plan.link_steps > plan.link_budget_s:
                row.note = (f"skipped: ~{predicted:.1f} s/step predicted from bytes, over the "
                            f"{plan.link_budget_s:.0f} s budget per launch (--link-budget-s)")
                logger.info(f"{model} N={n} {row.system} [{link.name}]: {row.note}")
            else:
                kept.append((row, measure))
        return kept

    @staticmethod
    def _placed(link: Link | None, hosts: int, run: Callable[[Hosts], dict[str, Any]]) -> dict[str, Any]:
        """Run on loopback, or on `hosts` namespaces shaped like `link` (netns links)."""
        if link is None or link.via != "netns":
            return run(LOOPBACK)
        with Star(hosts, link.mbit) as star:
            return run(star)

    def _ddp(self, model: str, n: int, params: int, ov: list[str], link: Link | None) -> tuple[Row, Measure]:
        row = Row(model, n, "ddp-gloo", link.name if link else "loopback", self.plan.batch, ddp_bytes(params, n))
        steps, timeout = _max_steps(ov), self.plan.timeout_s
        return self._add(row, lambda group: {"step_ms": _stats(self._placed(
            link, n, lambda hosts: ddp.run(group, ov, n, steps, timeout, hosts)))})

    def _torch(self, model: str, n: int, params: int, ov: list[str]) -> tuple[Row, Measure]:
        """smolcluster's torch backend (DDP under our CLI, data and checkpoints), on loopback."""
        row = Row(model, n, "smolcluster torch", "loopback", self.plan.batch, ddp_bytes(params, n))

        def measure(group: Group) -> dict[str, Any]:
            summary = smol.run_torch(group, ov, n, self.plan.timeout_s)
            return {"step_ms": summary["step_ms"], "samples_per_s": summary["samples_per_s"]}

        return self._add(row, measure)

    def _pickle(self, model: str, n: int, ov: list[str], link: Link | None) -> tuple[Row, Measure]:
        row = Row(model, n, "pickle-ps", link.name if link else "loopback", self.plan.batch)
        spec = link.spec if link and link.via == "proxy" else None

        def measure(group: Group) -> dict[str, Any]:
            result = self._placed(link, n + 1, lambda hosts: pickle_ps.run(
                group, ov, n, _max_steps(ov), self.plan.timeout_s, spec, hosts))
            row.wire = pickle_bytes(result["bytes_in_per_step"], result["bytes_out_per_step"])
            return {"step_ms": _stats(result["step_s"])}

        return self._add(row, measure)

    def _smol(self, model: str, n: int, params: int, v: Variant, ov: list[str],
              link: Link | None) -> tuple[Row, Measure]:
        row = Row(model, n, f"smolcluster {v.name}", link.name if link else "loopback", self.plan.batch,
                  ps_bytes(params, n, v.elem_bytes), note=v.note)
        spec = link.spec if link and link.via == "proxy" else None

        def measure(group: Group) -> dict[str, Any]:
            summary = self._placed(link, n + 1, lambda hosts: smol.run(
                group, [*ov, *v.overrides], n, self.plan.timeout_s, spec, hosts))
            return {"step_ms": summary["step_ms"], "samples_per_s": summary["samples_per_s"]}

        return self._add(row, measure)


def _stats(step_s: list[float]) -> dict[str, float]:
    from bench.workload import step_ms_stats

    return step_ms_stats(step_s)


def _max_steps(ov: list[str]) -> int:
    return int(next(o for o in ov if o.startswith("training.max_steps=")).split("=", 1)[1])


def _csv(text: str) -> list[str]:
    return [] if text in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a tiny subset (SimpleNN, 2 workers, 1 repeat, synthetic data) in well under a minute")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--workers", default="2,4", help="comma list of worker counts (default 2,4)")
    p.add_argument("--repeats", type=int, default=3, help="launches per measurement (default 3)")
    p.add_argument("--steps", type=int, default=40, help="steps per launch; the first 5 are warm-up (default 40)")
    p.add_argument("--batch", type=int, default=32, help="per-worker batch size b (default 32)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                   help="smolcluster variants (VARIANTS in bench/matrix.py); rejected config keys are skipped")
    p.add_argument("--links", default=",".join(LINKS), help=f"emulated links: {', '.join(LINKS)}, or none")
    p.add_argument("--link-systems", default="smolcluster,ddp",
                   help="systems to run behind the links: smolcluster, ddp (netns links only), pickle "
                        "(default smolcluster,ddp)")
    p.add_argument("--link-steps", type=int, default=12, help="steps per launch behind a link (default 12)")
    p.add_argument("--link-repeats", type=int, default=1,
                   help="launches per measurement behind a link (default 1: bytes/rate dominate, little noise)")
    p.add_argument("--link-budget-s", type=float, default=90.0,
                   help="skip a link case predicted to take longer than this per launch (default 90)")
    p.add_argument("--dataset", choices=["MNIST", "synthetic"], default="MNIST")
    p.add_argument("--timeout-s", type=float, default=300.0, help="deadline for one launch (default 300)")
    p.add_argument("--out", type=Path, help="where results.json/.png go (default bench/; --quick: bench/out/)")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                   help="measure nothing: rewrite the report (.md, .png, derived JSON fields) from a results.json")
    a = p.parse_args(argv)
    if a.quick:  # new defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
        a = p.parse_args(argv)
    names = {v.name: v for v in VARIANTS}
    unknown = ([x for x in _csv(a.models) if x not in MODELS] + [x for x in _csv(a.variants) if x not in names]
               + [x for x in _csv(a.links) if x not in LINKS] + [x for x in _csv(a.systems) if x not in SYSTEMS]
               + [x for x in _csv(a.link_systems) if x not in ("smolcluster", "ddp", "pickle")])
    if unknown:
        p.error(f"unknown name(s): {', '.join(unknown)}")
    if a.steps <= 10 or a.link_steps <= 10:
        p.error("--steps and --link-steps must be > 10 (the first 5 steps are warm-up)")
    out = a.out or REPO / "bench" / ("out" if a.quick else "")
    return Plan(models=_csv(a.models), workers=[int(x) for x in _csv(a.workers)], repeats=a.repeats,
                steps=a.steps, batch=a.batch, systems=_csv(a.systems), variants=[names[x] for x in _csv(a.variants)],
                links=_csv(a.links), link_systems=_csv(a.link_systems), link_steps=a.link_steps,
                link_repeats=a.link_repeats,
                link_budget_s=a.link_budget_s, dataset=a.dataset, timeout_s=a.timeout_s,
                loopback_mib=64 if a.quick else 512, out=out, quick=a.quick, render=a.render)


def main(argv: list[str] | None = None) -> int:
    """Run the plan, print the markdown report, write results.json/.png; 1 if any measurement failed."""
    from smolcluster import log

    plan = parse_args(argv)
    log.setup("bench")
    if plan.render:
        results = report.finish(json.loads(plan.render.read_text()))
        out = plan.render.parent
    else:
        started = time.time()
        meta = report.machine_info()
        logger.info(f"benchmark on {meta['cpu']} ({meta['cores']} cores), torch {meta['torch']}; results -> {plan.out}")
        results = Bench(plan).run()
        plan_json = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan).items()}
        meta.update(plan=plan_json, duration_s=round(time.time() - started, 1), load_after=report.load_average())
        results = report.finish({"meta": meta, **results})
        out = plan.out
    text = report.markdown(results)
    print(text)
    report.write(results, text, out)
    return 0 if all(r["runs"] or r["note"].startswith("skipped") for r in results["rows"]) else 1
