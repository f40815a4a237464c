"""Baseline: PyTorch DistributedDataParallel with the gloo backend, N processes on loopback.

Left at PyTorch's defaults on purpose (25 MB buckets, gradient allreduce overlapped with
backward, gloo's ring allreduce), one torch thread per process like every other row. Rank r
trains on smolcluster worker r+1's shard with the same batches, model and optimizer. With
`device="cuda"` (bench/gpu.py) the ranks keep model and batches on the GPU and gloo reduces the
CUDA tensors.

    python -m bench.ddp --rank R --port P --steps S --out FILE [--device cuda] --set KEY=VALUE ...   # internal
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

from bench.netns import LOOPBACK, Hosts
from bench.procs import Group, child_env, python, set_flags


def ring_bytes_per_rank(grad_bytes: int, workers: int) -> int:
    """Bytes one rank sends per step (and receives as many): gloo's ring allreduce is a
    reduce-scatter then an allgather, each moving (N-1)/N of the buffer; headers not counted."""
    return 2 * (workers - 1) * grad_bytes // workers


def rank_main(rank: int, master: str, port: int, steps: int, out: Path, overrides: list[str],
              device: str = "cpu") -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bench.workload import Shard, StepTimer, load, model_and_optimizer, train_step
    from smolcluster.runner import watch_parent

    watch_parent()
    cfg = load(overrides)
    world = cfg.cluster.num_workers
    model, optimizer = model_and_optimizer(cfg, device)
    batches = Shard(cfg, rank + 1, world).batches(steps, device)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    ddp = DistributedDataParallel(model)
    dist.barrier()
    timer = StepTimer(device)
    for step, (x, y) in enumerate(batches):
        train_step(ddp, optimizer, cfg, x, y, step, steps)
        timer.tick()
    dist.barrier()
    if rank == 0:
        out.write_text(json.dumps({"step_s": timer.times}))
    dist.destroy_process_group()


def run(group: Group, overrides: list[str], workers: int, steps: int, timeout_s: float,
        hosts: Hosts = LOOPBACK, device: str = "cpu") -> list[float]:
    """Start `workers` ranks (rank r on host r, all computing on `device`), wait for them; returns
    rank 0's seconds per step."""
    from smolcluster.runner import free_port

    out = group.logs / "ddp-times.json"
    args = ["--master", hosts.address(0), "--port", str(free_port()), "--steps", str(steps), "--out", str(out),
            "--device", device, *set_flags(overrides)]
    names = []
    for rank in range(workers):
        names.append(f"ddp-rank{rank}")
        group.spawn(names[-1], [*hosts.prefix(rank), *python("-m", "bench.ddp", "--rank", str(rank), *args)],
                    env=child_env(GLOO_SOCKET_IFNAME=hosts.ifname(rank)))
    group.wait(names, timeout_s)
    return json.loads(out.read_text())["step_s"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.ddp")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--master", default="127.0.0.1", help="rank 0's address")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu", help="where the model and batches live: cpu or cuda[:N]")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    a = p.parse_args()
    rank_main(a.rank, a.master, a.port, a.steps, a.out, a.overrides, a.device)
