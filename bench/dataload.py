"""Does reading data stay off the step's critical path? Per-batch data time against a training step.

For each dataset, the loop a worker runs, batch 32 in a shuffled order (epoch_order): take the
next batch (`wait`: what the step waits for), then one training step of the matching model
(forward + backward + Adam, one torch thread, as `training.threads=1`), measured in the same run:

- MNIST in memory: `Split.batch`, one fancy index; the MLP preset (784-512-256-128-10).
- image_folder read per item (dataset.memory_mb=0) from PNGs written to a temp dir: MNIST's digits
  (28x28 grayscale) and 64x64 RGB noise (incompressible: the slow case to decode), each without
  prefetch (decoded on the step's thread) and with `prefetch.batches` (a thread two batches ahead);
  the same MLP on 784 / 12288 inputs.
- text (tinyshakespeare, context 64) in memory: `Windows.batch`; an embedding (65x128) + linear
  step over the 32x64 tokens.
- augment: `augment()` on an MNIST batch, which runs on the step's thread when dataset.augment is on.

Also the one-off costs: load_data per dataset, and the partition of text's ~1M windows. The
machine is shared: `uptime` is printed before and after, and the load average kept in the JSON.

    uv run python -m bench.dataload [--batches 60] [--out bench/dataload.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from smolcluster import data
from smolcluster.augment import augment
from smolcluster.config import DatasetConfig, ModelConfig, TrainingConfig
from smolcluster.datasets.mnist import read_idx
from smolcluster.models import build_model
from smolcluster.prefetch import batches
from smolcluster.train import build_optimizer, cross_entropy

BATCH = 32
WARMUP = 3


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"


def mlp_step(input_dim: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model = build_model(ModelConfig(type="MLP", input_dim=input_dim, hidden=[512, 256, 128]), 0)
    optimizer = build_optimizer(model, TrainingConfig())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def lm_step(vocab: int, width: int = 128) -> Callable[[torch.Tensor, torch.Tensor], None]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, width), nn.Linear(width, vocab))
    optimizer = build_optimizer(model, TrainingConfig())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).view(-1, vocab), y.view(-1)).backward()
        optimizer.step()

    return step


def run_loop(it: Iterator[tuple[torch.Tensor, torch.Tensor]], step: Callable, n: int) -> dict[str, float]:
    """Per batch: the wait for it, then the step; medians and means in ms over `n` after warm-up."""
    waits, steps = [], []
    for i in range(n + WARMUP):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        step(x, y)
        t2 = time.perf_counter()
        if i >= WARMUP:
            waits.append(t1 - t0)
            steps.append(t2 - t1)
    close = getattr(it, "close", None)
    if close:
        close()
    med_w, med_s = statistics.median(waits), statistics.median(steps)
    return {"wait_ms": 1e3 * med_w, "wait_mean_ms": 1e3 * statistics.fmean(waits), "step_ms": 1e3 * med_s,
            "wait_pct_of_step": 100 * med_w / med_s}


def fetch_ms(ds: Any, idx_batches: list[torch.Tensor]) -> float:
    """Median time to read one batch on this thread, with nothing else running."""
    times = []
    for idx in idx_batches:
        t0 = time.perf_counter()
        data.fetch(ds, idx)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def order(n: int, count: int) -> list[torch.Tensor]:
    return list(data.epoch_order(n, 0, 0, 1).split(BATCH))[:count]


def write_pngs(root: Path, images: torch.Tensor, labels: torch.Tensor, mode: str) -> None:
    from PIL import Image

    for i, (img, y) in enumerate(zip(images, labels.tolist())):
        folder = root / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.numpy(), mode).save(folder / f"{i:05d}.png")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(n: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    loads: dict[str, float] = {}
    need = (n + WARMUP) * BATCH

    mnist, loads["load_data MNIST"] = timed(lambda: data.load_data(DatasetConfig(), 0))
    train = mnist.train
    row = run_loop(batches(train, order(len(train), n + WARMUP)), mlp_step(784), n)
    rows.append({"data": "MNIST, in memory", "fetch_ms": fetch_ms(train, order(len(train), n)), **row})

    with tempfile.TemporaryDirectory() as tmp:
        _, pixels = read_idx(data.mnist_root(DatasetConfig()) / "train-images-idx3-ubyte.gz", 2051)
        raw = torch.frombuffer(bytearray(pixels[: need * 784]), dtype=torch.uint8).view(need, 28, 28)
        write_pngs(Path(tmp) / "digits", raw, train.y[:need], "L")
        g = torch.Generator().manual_seed(0)
        noise = torch.randint(0, 256, (need, 64, 64, 3), generator=g, dtype=torch.uint8)
        write_pngs(Path(tmp) / "noise", noise, train.y[:need] % 10, "RGB")
        for name, folder, gray, dim in (("28x28 gray PNG", "digits", True, 784), ("64x64 RGB PNG", "noise", False, 12288)):
            cfg = DatasetConfig(name="image_folder", path=str(Path(tmp) / folder), grayscale=gray, memory_mb=0,
                                test_fraction=0.01)
            lazy, loads[f"load_data image_folder {name}, per item"] = timed(lambda: data.load_data(cfg, 0))
            eager_cfg = DatasetConfig(name="image_folder", path=str(Path(tmp) / folder), grayscale=gray, test_fraction=0.01)
            _, loads[f"load_data image_folder {name}, {need} decoded up front"] = timed(lambda: data.load_data(eager_cfg, 0))
            ds, step = lazy.train, mlp_step(dim)
            idx = order(len(ds), n + WARMUP)
            fetched = fetch_ms(ds, idx[:n])
            plain = run_loop((data.fetch(ds, i) for i in idx), step, n)
            rows.append({"data": f"image_folder {name}, per item, no prefetch", "fetch_ms": fetched, **plain})
            ahead = run_loop(batches(ds, idx), step, n)
            rows.append({"data": f"image_folder {name}, per item, prefetch 2 ahead", "fetch_ms": fetched, **ahead})

    text, loads["load_data text (tinyshakespeare)"] = timed(lambda: data.load_data(DatasetConfig(name="text"), 0))
    shards, loads[f"partition of {len(text.train)} text windows over 2 workers"] = timed(
        lambda: data.partition(len(text.train), 2, 0))
    _, loads[f"epoch_order of a {len(shards[0])}-window shard"] = timed(lambda: data.epoch_order(len(shards[0]), 0, 0, 1))
    ds = data.take(text.train, shards[0])
    row = run_loop(batches(ds, order(len(ds), n + WARMUP)), lm_step(text.meta.classes), n)
    rows.append({"data": "text, context 64, in memory", "fetch_ms": fetch_ms(ds, order(len(ds), n)), **row})

    x = train.x[:BATCH]
    augment(x, 0, 1, 0, 0)  # torchvision's import and first call
    times = [timed(lambda s=s: augment(x, 0, 1, 0, s))[1] for s in range(n)]
    step = mlp_step(784)
    steps = [timed(lambda: step(x, train.y[:BATCH]))[1] for _ in range(n)]
    med_a, med_s = statistics.median(times), statistics.median(steps)
    rows.append({"data": "augment (MNIST batch, on the step's thread)", "fetch_ms": 1e3 * med_a, "wait_ms": 1e3 * med_a,
                 "wait_mean_ms": 1e3 * statistics.fmean(times), "step_ms": 1e3 * med_s,
                 "wait_pct_of_step": 100 * med_a / med_s})
    return {"rows": rows, "one_off_s": loads}


def table(result: dict[str, Any]) -> str:
    lines = [f"batch {BATCH}, {result['batches']} batches per row (after {WARMUP} warm-up), 1 torch thread; "
             "fetch: reading a batch alone; wait: what the step waited for it in the loop",
             "", "| data | fetch ms | wait ms (median) | wait ms (mean) | step ms | wait / step |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['data']} | {r['fetch_ms']:.3f} | {r['wait_ms']:.3f} | {r['wait_mean_ms']:.3f} | "
                     f"{r['step_ms']:.3f} | {r['wait_pct_of_step']:.1f}% |")
    lines += ["", "| one-off | s |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["one_off_s"].items()]
    lines += ["", f"before: {result['uptime_before']}", f"after:  {result['uptime_after']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--out", default="bench/dataload.json")
    args = p.parse_args(argv)
    before = uptime()
    print(before, flush=True)
    result = {"batches": args.batches, "uptime_before": before, "load_avg_before": list(os.getloadavg())}
    result.update(measure(args.batches))
    result.update(uptime_after=uptime(), load_avg_after=list(os.getloadavg()), cpus=os.cpu_count(),
                  machine=platform.machine(), python=platform.python_version(), torch=torch.__version__)
    print(table(result))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
