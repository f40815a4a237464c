"""Does wire compression cost accuracy? Train the same job once per `cluster.compression` and compare.

    uv run python -m bench.accuracy                      # MLP, 2 workers, 3 epochs, real MNIST (~10 min on 2 cores)
    uv run python -m bench.accuracy --epochs 1 --codecs fp32,int8

Each codec is a real `smolcluster run` (a server and N workers on this machine) with the same seed,
data and schedule; the final test accuracy comes from its summary.json. The issue's target: bf16
and int8 within 0.3 points of fp32. Writes bench/accuracy.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.procs import REPO, child_env

TOLERANCE = 0.3
"""Points of test accuracy a lossy codec may lose against fp32 (issue "Speed")."""


def train(codec: str, args: argparse.Namespace, out: Path) -> dict:
    """One `smolcluster run` with this codec; its summary.json."""
    cmd = [sys.executable, "-m", "smolcluster", "run", "--model", args.model, "--workers", str(args.workers),
           "--epochs", str(args.epochs), "--seed", str(args.seed), "--out", str(out),
           "--set", f"cluster.compression={codec}", "--set", "wandb.mode=disabled", *args.set]
    print(f"[{codec}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=args.timeout_s)
    if proc.returncode != 0:
        raise SystemExit(f"[{codec}] smolcluster run exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    print(f"[{codec}] test accuracy {summary['test_accuracy']:.2f}% in {time.monotonic() - start:.0f} s",
          file=sys.stderr, flush=True)
    return summary


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["codec"] == "fp32"), None)
    lines = ["| codec | test accuracy | Δ vs fp32 (points) | within 0.3 | test loss | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        delta = None if ref is None else r["test_accuracy"] - ref["test_accuracy"]
        ok = "-" if delta is None or r["codec"] == "fp32" else ("yes" if delta >= -TOLERANCE else "**no**")
        lines.append(f"| {r['codec']} | {r['test_accuracy']:.2f} % | {'-' if delta is None else f'{delta:+.2f}'} "
                     f"| {ok} | {r['test_loss']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--codecs", default="fp32,bf16,fp16,int8", help="comma list of cluster.compression values")
    p.add_argument("--model", default="MLP")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="deadline for one run")
    p.add_argument("--out", type=Path, default=REPO / "bench", help="where accuracy.json goes (default bench/)")
    args = p.parse_args(argv)
    args.set = [flag for kv in args.set for flag in ("--set", kv)]
    runs = args.out / "out" / "accuracy" if args.out == REPO / "bench" else args.out / "runs"
    rows = []
    for codec in [c.strip() for c in args.codecs.split(",") if c.strip()]:
        s = train(codec, args, runs / codec)
        rows.append({"codec": codec, "test_accuracy": s["test_accuracy"], "test_loss": s["test_loss"],
                     "wall_s": s["wall_s"], "steps": s["steps"]})
    result = {"meta": {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
                       "model": args.model, "workers": args.workers, "epochs": args.epochs, "seed": args.seed,
                       "overrides": args.set, "tolerance_points": TOLERANCE},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
