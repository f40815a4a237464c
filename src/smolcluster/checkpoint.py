"""Optimizer state and checkpoints as safetensors + JSON: tensors and strings only, never pickle.

The same encoding serves two jobs: a checkpoint on disk (`server --resume`) and the STATE frame
that brings a rejoining worker's optimizer into lockstep with the server's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file, save, save_file

from smolcluster.flat import FlatModel
from smolcluster.results import atomic_write

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to another job."""


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split `optimizer.state_dict()` into tensors and a JSON-able remainder."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().clone().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"optimizer.scalars": json.dumps(scalars), "optimizer.groups": json.dumps(sd["param_groups"])}
    return tensors, meta


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in json.loads(meta.get("optimizer.scalars", "{}")).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = json.loads(meta["optimizer.groups"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def encode_state(optimizer: torch.optim.Optimizer) -> bytes:
    """The optimizer state as one safetensors blob (the STATE frame's payload)."""
    tensors, meta = optimizer_tensors(optimizer)
    return save(tensors, metadata=meta)


def decode_state(optimizer: torch.optim.Optimizer, payload: bytes, peer: str) -> None:
    """Load a STATE payload; safetensors parses only a JSON header and raw tensors, so no code runs."""
    try:
        tensors = load(payload)
        meta = _metadata(payload)
        load_optimizer_tensors(optimizer, tensors, meta)
    except Exception as e:  # bytes from a peer: any failure to make sense of them is the peer's error
        raise CheckpointError(f"{peer}: optimizer state is not usable ({e!r})") from None


def _metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (its header is 8-byte length + JSON)."""
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise ValueError("safetensors header longer than the blob")
    header = json.loads(blob[8 : 8 + n])
    return header.get("__metadata__", {}) or {}


@dataclass
class Checkpoint:
    """What `server --resume` needs: parameters, optimizer state, and where the run was."""

    step: int
    """Steps completed; training resumes at this step (its epoch and batch follow from it)."""
    info: dict[str, Any]


def save_checkpoint(root: Path, flat: FlatModel, optimizer: torch.optim.Optimizer, step: int,
                    info: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint-<step>/ through a temp folder and a rename, then point `latest` at it."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step:08d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, meta = optimizer_tensors(optimizer)
    tensors["params"] = flat.params.clone()
    save_file(tensors, str(tmp / "state.safetensors"), metadata=meta)
    (tmp / "checkpoint.json").write_text(json.dumps({"step": step, **info}, indent=2))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write(root / LATEST, lambda t: Path(t).write_text(name + "\n"))
    for old in sorted(root.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path, flat: FlatModel, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Restore parameters and optimizer state in place from the latest checkpoint under `root`."""
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        raise CheckpointError(f"no checkpoint to resume from in {root} (no '{LATEST}' file)") from None
    folder = root / name
    try:
        info = json.loads((folder / "checkpoint.json").read_text())
        path = folder / "state.safetensors"
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError, json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({e})") from None
    params = tensors.pop("params")
    if params.numel() != flat.numel:
        raise CheckpointError(f"{folder}: holds {params.numel()} parameters, the model has {flat.numel}")
    flat.params.copy_(params)
    load_optimizer_tensors(optimizer, tensors, meta)
    return Checkpoint(step=int(info["step"]), info=info)
