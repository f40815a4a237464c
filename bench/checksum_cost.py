"""What the frame checksum costs: xxh3_64 over a 7.9M-parameter gradient, against that model's step.

Every frame carries an xxh3_64 digest of its header and payload (see wire.py). Per step the server
hashes the N GRAD frames it receives and the one AVG it sends (encoded once for every worker); a
worker hashes the GRAD it sends and the AVG it receives. This measures, on this machine, over the
gradient's 31.6 MB:

- cold: the hash over a buffer not in cache, in one call (a sender) and in 64 KiB pieces (a
  receiver that recv hands small pieces); the table's "cold" columns charge every frame this way;
- as run: what hashing adds where the code does it. A receiver (FrameReader, read_frame) hashes
  each piece right after it landed (a copy of 64 KiB pieces stands in for recv_into); a sender
  hashes each bucket (1 MiB, `cluster.bucket_mb`'s default) right after it was written (by
  backward on a worker, by the averaging on the server; a copy stands in). Both read from cache;

and the step of the model it belongs to: forward + backward + Adam, batch 32, on the CPU with one
thread (`training.threads=1`), as a worker runs it.

    uv run python -m bench.checksum_cost [--workers 2 4 8] [--rounds 30] [--out bench/checksum_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import xxhash

from bench.report import cpu_model
from smolcluster.config import ModelConfig, TrainingConfig
from smolcluster.flat import FlatModel
from smolcluster.models import build_model
from smolcluster.train import build_optimizer, cross_entropy

MODEL = ModelConfig(type="MLP", hidden=[2048, 2048, 1024])  # bench/matrix.py's MLP-7.9M
BATCH = 32
PIECE = 64 * 1024
BUCKET = 1 << 20


def timed(run: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def hash_whole(buf: memoryview) -> None:
    xxhash.xxh3_64(buf).digest()


def hash_pieces(buf: memoryview) -> None:
    """As FrameReader does: one update per piece recv delivered."""
    hasher = xxhash.xxh3_64()
    for at in range(0, buf.nbytes, PIECE):
        hasher.update(buf[at : at + PIECE])
    hasher.digest()


def land_pieces(src: memoryview, dst: memoryview, hash_too: bool) -> None:
    """Receive `src` into `dst` piece by piece (a copy standing in for recv_into), hashing each
    piece just after it landed when `hash_too`."""
    hasher = xxhash.xxh3_64()
    for at in range(0, src.nbytes, PIECE):
        dst[at : at + PIECE] = src[at : at + PIECE]
        if hash_too:
            hasher.update(dst[at : at + PIECE])


def write_buckets(src: memoryview, dst: memoryview, hash_too: bool) -> None:
    """Write `dst` bucket by bucket (a copy standing in for backward or the averaging), hashing
    each bucket just after it was written when `hash_too`, as `wire.frame` does for each GRAD/AVG."""
    for at in range(0, src.nbytes, BUCKET):
        dst[at : at + BUCKET] = src[at : at + BUCKET]
        if hash_too:
            xxhash.xxh3_64(dst[at : at + BUCKET]).digest()


def training_step() -> tuple[Callable[[], None], int]:
    """One forward + backward + Adam step of the 7.9M MLP as a worker runs it, and the model's size."""
    torch.set_num_threads(1)
    flat = FlatModel(build_model(MODEL, 0))
    optimizer = build_optimizer(flat.model, TrainingConfig())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, MODEL.input_dim, generator=g), torch.randint(0, MODEL.out, (BATCH,), generator=g)

    def step() -> None:
        flat.zero_grad()
        cross_entropy(flat.model(x), y).backward()
        optimizer.step()

    return step, flat.numel


def rounds(n: int) -> tuple[list[dict[str, float]], int]:
    """`n` rounds of one step and each hashing variant, interleaved so that the load of a shared
    machine weighs on the step and on the hash alike (each round gives its own ratio)."""
    step, numel = training_step()
    buf = memoryview(bytearray(os.urandom(4 * (numel + 1))))  # the gradient + the loss slot
    dst = memoryview(bytearray(buf.nbytes))
    work = {"step": step, "whole": lambda: hash_whole(buf), "pieces": lambda: hash_pieces(buf),
            "landed": lambda: land_pieces(buf, dst, True), "landed_only": lambda: land_pieces(buf, dst, False),
            "written": lambda: write_buckets(buf, dst, True), "written_only": lambda: write_buckets(buf, dst, False)}
    for run in work.values():  # warm up: allocations, the optimizer's state, page faults
        run(), run()
    return [{name: timed(run) for name, run in work.items()} for _ in range(n)], buf.nbytes


def costs(r: dict[str, float], workers: list[int]) -> list[dict[str, float]]:
    """Per role, the hashing one step costs (s) in one round: cold, and as the code runs it."""
    received = max(r["landed"] - r["landed_only"], 0.0)  # what hashing adds to receiving one frame
    written = max(r["written"] - r["written_only"], 0.0)  # ... and to producing one to send
    out = []
    for role, sent, got in [("worker", 1, 1), *((f"server, {n} workers", 1, n) for n in workers)]:
        out.append({"role": role, "frames": sent + got, "cold": sent * r["whole"] + got * r["pieces"],
                    "as_run": sent * written + got * received})
    return out


def measure(workers: list[int], n: int) -> dict[str, Any]:
    samples, nbytes = rounds(n)
    med = {k: statistics.median(r[k] for r in samples) for k in samples[0]}
    per_round = [costs(r, workers) for r in samples]
    rows = []
    for i, row in enumerate(per_round[0]):
        cold = [c[i]["cold"] for c in per_round]
        run = [c[i]["as_run"] for c in per_round]
        rows.append({
            "role": row["role"], "frames": row["frames"],
            "cold_ms": 1e3 * statistics.median(cold), "as_run_ms": 1e3 * statistics.median(run),
            "cold_pct": statistics.median(100 * c / r["step"] for c, r in zip(cold, samples)),
            "as_run_pct": statistics.median(100 * c / r["step"] for c, r in zip(run, samples)),
        })
    return {
        "model": "MLP 784-2048-2048-1024-10", "params": nbytes // 4 - 1, "payload_mb": nbytes / 1e6,
        "rounds": n, "step_ms": 1e3 * med["step"], "batch": BATCH, "threads": 1,
        "xxh3_gbps_one_call": nbytes / med["whole"] / 1e9, "xxh3_gbps_64k_pieces": nbytes / med["pieces"] / 1e9,
        "receive_hash_ms_per_frame": 1e3 * max(med["landed"] - med["landed_only"], 0.0),
        "receive_copy_ms_per_frame": 1e3 * med["landed_only"],
        "send_hash_ms_per_frame": 1e3 * max(med["written"] - med["written_only"], 0.0),
        "rows": rows, "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                  "load_avg": os.getloadavg(), "xxhash": xxhash.VERSION, "torch": torch.__version__},
    }




def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}: {result['params']:,} parameters, {result['payload_mb']:.1f} MB per gradient frame",
        f"step (forward + backward + Adam, batch {result['batch']}, 1 thread): {result['step_ms']:.1f} ms "
        f"(medians of {result['rounds']} interleaved rounds; each % is the median of per-round ratios)",
        f"xxh3_64: {result['xxh3_gbps_one_call']:.1f} GB/s in one call, "
        f"{result['xxh3_gbps_64k_pieces']:.1f} GB/s in 64 KiB pieces (cold)",
        f"as run: hashing adds {result['receive_hash_ms_per_frame']:.2f} ms to receiving a frame "
        f"({result['receive_copy_ms_per_frame']:.2f} ms to land it), {result['send_hash_ms_per_frame']:.2f} ms "
        "to sending one (1 MiB buckets)",
        "",
        f"{'role':<20} {'frames':>6} {'cold ms':>8} {'% step':>7} {'as run ms':>10} {'% step':>7}",
    ]
    for row in result["rows"]:
        lines.append(f"{row['role']:<20} {row['frames']:>6} {row['cold_ms']:>8.2f} {row['cold_pct']:>6.2f}% "
                     f"{row['as_run_ms']:>10.2f} {row['as_run_pct']:>6.2f}%")
    lines.append(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in result['machine']['load_avg'])}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8], help="server rows: workers sending to it")
    p.add_argument("--rounds", type=int, default=30, help="rounds of one step and each hash, interleaved")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("checksum_cost.json"))
    args = p.parse_args()
    result = measure(args.workers, args.rounds)
    print(table(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
