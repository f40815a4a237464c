"""Rough cost of each wire codec, in ms per million elements (best of a few runs; no assertions).

    uv run python scripts/bench_compress.py [--numel 4194304] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from smolcluster.compress import NAMES, Encoder, make_codec


def best_ms_per_million(fn: Callable[[], object], numel: int, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3 / (numel / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.numel
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 1e-3
    print(f"{n} elements, {args.threads} thread(s); ms per million elements (best of {args.reps})")
    print(f"{'codec':6} {'bytes/el':>8} {'encode':>7} {'encode+EF':>9} {'decode':>7} {'accumulate':>10}")
    for name in NAMES:
        codec, out, acc = make_codec(name), torch.empty(n), torch.zeros(n)
        enc = Encoder(codec, n)
        payload = codec.encode(x, bytearray(codec.payload_nbytes(n)))
        row = [best_ms_per_million(f, n, args.reps) for f in (
            lambda: codec.encode(x, enc.payload if codec.lossy else out.numpy()),
            lambda: enc.encode(x),
            lambda: codec.decode(payload, out),
            lambda: codec.accumulate(payload, acc, 0.5),
        )]
        print(f"{name:6} {len(payload) / n:8.3f} {row[0]:7.2f} {row[1]:9.2f} {row[2]:7.2f} {row[3]:10.2f}")


if __name__ == "__main__":
    main()
