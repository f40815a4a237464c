"""Fault injection for tests and chaos drills: `worker --fault STEP:KIND[:ARG]`.

Kinds: `sleep:SECONDS` before sending the step's gradient; `exit` (clean goodbye and exit 0);
`kill` (SIGKILL itself, as a crash would); `disconnect` (send half a gradient frame, then drop the
connection); `garbage` (send random bytes instead of a frame); `nan` (send a NaN gradient);
`scale:FACTOR` (multiply the step's gradient by FACTOR, e.g. 1e19: finite but absurd, as a bug
or an fp16 overflow would make it); `perturb:SCALE` (after the step's update, add noise of SCALE
times the parameters' RMS to this replica: the drift a device that rounds differently causes,
larger); `slow:SECONDS` (from that step on, every batch takes SECONDS per sample longer: a slower
machine).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from loguru import logger

if TYPE_CHECKING:
    import torch

    from smolcluster.buckets import Bucket
    from smolcluster.flat import FlatModel
    from smolcluster.link import Link

Kind = Literal["sleep", "exit", "kill", "disconnect", "garbage", "nan", "scale", "perturb", "slow"]
NEEDS_ARG = {"sleep": "seconds, e.g. 5:sleep:3", "scale": "a factor, e.g. 5:scale:1e19",
             "perturb": "a relative size, e.g. 5:perturb:1e-3", "slow": "seconds per sample, e.g. 0:slow:0.001"}


@dataclass(frozen=True, slots=True)
class Fault:
    step: int
    kind: Kind
    arg: float = 0.0


def parse_fault(text: str) -> Fault:
    """'5:sleep:3' -> Fault(step=5, kind='sleep', arg=3.0); raises ValueError with the reason."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in get_args(Kind):
        raise ValueError(f"--fault {text!r}: expected STEP:KIND[:ARG] with KIND one of {', '.join(get_args(Kind))}")
    if parts[1] in NEEDS_ARG and len(parts) != 3:
        raise ValueError(f"--fault {text!r}: {parts[1]} needs {NEEDS_ARG[parts[1]]}")
    try:
        arg = float(parts[2]) if len(parts) == 3 else 0.0
    except ValueError:
        raise ValueError(f"--fault {text!r}: {parts[2]!r} is not a number") from None
    return Fault(int(parts[0]), parts[1], arg)  # type: ignore[arg-type]


def inject(fault: Fault, step: int, loss: torch.Tensor, link: Link, flat: FlatModel, last: Bucket) -> torch.Tensor:
    """Do what `fault` says in a worker at `step`, after forward; returns the loss to backpropagate."""
    from smolcluster import wire
    from smolcluster.wire import DType, MsgType

    logger.warning(f"step {step}: injecting fault {fault.kind}{f' {fault.arg:g}' if fault.arg else ''}")
    if fault.kind == "sleep":
        time.sleep(fault.arg)
    elif fault.kind == "exit":
        link.send(MsgType.BYE, step=step)
        link.close()
        sys.exit(0)
    elif fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.kind == "disconnect":
        frames = wire.frame(MsgType.GRAD, memoryview(flat.grad_bytes)[4 * last.lo : 4 * last.hi], step=step,
                            worker=link.id, count=1, offset=last.lo, dtype=DType.F32)
        link.send_raw(bytes(frames[0]) + bytes(frames[1][: len(frames[1]) // 2]))
        link.close()
        sys.exit(3)
    elif fault.kind == "garbage":
        link.send_raw(random.Random(step).randbytes(256))
    elif fault.kind == "nan":
        flat.loss = float("nan")
        return loss * float("nan")  # every gradient of the step becomes NaN
    elif fault.kind == "scale":
        return loss * fault.arg  # backward is linear: every gradient of the step scales, the loss slot does not
    return loss


def perturb(flat: FlatModel, scale: float, seed: int) -> None:
    """Add seeded Gaussian noise of `scale` times the parameters' RMS to this replica's parameters."""
    import torch

    logger.warning(f"injecting fault perturb {scale:g}: this replica's parameters drift from the server's")
    params = flat.dev_params
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(params.numel(), generator=g).to(params.device)
    rms = float(params.norm()) / max(params.numel(), 1) ** 0.5
    params.add_(noise, alpha=scale * rms)
