"""Which device a process computes on, what that device lacks, and copies between it and the wire.

The wire, the averaging and the checksums work on CPU memory. A process that trains on a GPU
keeps its model, batches and optimizer there and copies at the step's edges: each gradient bucket
out as backward finishes it, the averages back in before the optimizer step (flat.py). Everything
that depends on the kind of device lives here, so the CPU tests cover the rest.

`SMOLCLUSTER_COPY_PATH=1` makes a CPU process take the GPU's path (separate model memory, copies
at the step's edges): that is how the copies are tested on machines without a GPU.
"""

from __future__ import annotations

import os
import platform
import re
from typing import TYPE_CHECKING, Callable

from loguru import logger

from smolcluster.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

SPEC = re.compile(r"(auto|cpu|mps|cuda(:\d{1,3})?)")
"""The values `training.device` takes."""
COPY_PATH_ENV = "SMOLCLUSTER_COPY_PATH"
_KEY = "training.device"


def check_spec(value: str) -> None:
    """The key's form, checked when the config loads (the device itself is checked where it runs)."""
    if not SPEC.fullmatch(value):
        raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {value[:40]!r}")


def resolve(spec: str) -> torch.device:
    """The device `spec` names on this machine; a ConfigError naming training.device if it has none."""
    import torch

    check_spec(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{_KEY}: {spec} asked for, but {why} (use auto or cpu)")
        index = int(spec[5:]) if ":" in spec else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{_KEY}: {spec} asked for, but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if spec == "mps" and not _mps_available():
        raise ConfigError(f"{_KEY}: mps asked for, but this machine has no Apple-silicon GPU that torch can "
                          "use (macOS 12.3+ on an M-series Mac; use auto or cpu)")
    return torch.device(spec)


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def copies(device: torch.device) -> bool:
    """Whether the model lives apart from the wire buffers (any accelerator, or the test switch)."""
    return device.type != "cpu" or os.environ.get(COPY_PATH_ENV, "") not in ("", "0")


def describe(device: torch.device) -> str:
    """One line for the log and the summary: the device, its model and its memory."""
    import torch

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{device} ({p.name}, {p.total_memory / 2**30:.0f} GiB)"
    ram = _ram_gib()
    if device.type == "mps":
        return f"mps ({_chip() or 'Apple-silicon GPU'}, {ram:.0f} GiB unified memory)" if ram else "mps"
    cpu = _chip() or platform.machine() or "CPU"
    return f"cpu ({cpu}, {torch.get_num_threads()} threads{f', {ram:.0f} GiB' if ram else ''})"


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _chip() -> str:
    """The processor's marketing name (Apple M2, AMD EPYC ...), or '' where it cannot be read cheaply."""
    if platform.system() == "Darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=2.0)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# --- host memory and copies ---------------------------------------------------------------------


def host_buffer(nbytes: int, device: torch.device) -> tuple[memoryview | bytearray, torch.Tensor]:
    """CPU memory for the wire (bytes for the socket, float32 for torch): pinned when the model is on
    a CUDA GPU, so the copies to and from it run without a bounce through pageable memory."""
    import torch

    if device.type == "cuda":
        raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return memoryview(raw.numpy()).cast("B"), raw.view(torch.float32)
    buf = bytearray(nbytes)
    return buf, torch.frombuffer(buf, dtype=torch.float32) if nbytes else torch.empty(0)


def to_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Device -> CPU; returns once the bytes are in `dst` (the socket reads them next). On CUDA an
    asynchronous copy into pinned memory and a wait for that copy alone, not the whole stream."""
    import torch

    if src.device.type == "cuda":
        # The stream of src's device as this thread sees it (the sender thread's current device
        # may be another GPU): backward's kernels and this copy queue on it, in that order.
        stream = torch.cuda.current_stream(src.device)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        done.synchronize()
    else:  # MPS's asynchronous copies to the CPU have returned stale data in some torch releases
        dst.copy_(src)


def to_device(dst: torch.Tensor, src: torch.Tensor) -> None:
    """CPU -> device. Asynchronous on CUDA: the stream orders it before the optimizer step that
    reads it, and the CPU memory is next written only after a later synchronisation (the next
    step's `to_host`, or `.item()` on the loss)."""
    dst.copy_(src, non_blocking=dst.device.type == "cuda")


_warned: set[str] = set()


def once(key: str, message: str) -> None:
    """Log a fallback one time per process: a per-step warning would drown the log."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def batch_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on the device; float64 (which MPS lacks) becomes float32 there, logged once."""
    import torch

    if device.type == "cpu":
        return x
    if device.type == "mps" and x.dtype == torch.float64:
        once("mps-f64", "mps has no float64: float64 inputs are converted to float32 on the way to the GPU")
        x = x.float()
    return x.to(device, non_blocking=True)


def model_to(model: nn.Module, device: torch.device) -> None:
    """Move a model; float64 parameters on MPS (which lacks float64) are refused with the reason."""
    import torch

    if device.type == "mps":
        bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.dtype == torch.float64]
        if bad:
            raise ConfigError(f"{_KEY}: mps has no float64, and the model holds float64 tensors ({bad[0]}, ...); "
                              "make the model float32 or train on cpu")
    model.to(device)


def missing_op(error: BaseException) -> bool:
    """Whether an exception is a device lacking an operation (MPS raises NotImplementedError)."""
    text = str(error)
    return isinstance(error, NotImplementedError) or "not implemented for" in text or "not currently implemented" in text


def lacks_op(model: nn.Module, sample: tuple[torch.Tensor, torch.Tensor], loss: Callable[..., torch.Tensor],
             device: torch.device) -> str:
    """'' if a forward and backward pass of `model` on `sample` run on `device`; else the first line
    of the error of the operation it lacks. Any other error is the model's and propagates."""
    x, y = sample
    try:
        loss(model(batch_to(x, device)), batch_to(y, device)).backward()
    except Exception as e:
        if not missing_op(e):
            raise
        return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return ""
