"""Optimizer state and checkpoints as safetensors + JSON: tensors and strings only, never pickle.

The same encoding serves two jobs: a checkpoint on disk (`server --resume`) and the STATE frame
that brings a rejoining worker's optimizer into lockstep with the server's.

A checkpoint folder holds `state.safetensors` (parameters, optimizer state, and the step and run
info in its metadata) and `checkpoint.json` (a readable copy of the info plus the state file's
sha256 and size). Loading verifies the hash before trusting a byte, checks every tensor against
the model and optimizer it goes into, and falls back to the previous checkpoint when the latest
is damaged: a flipped bit or a half-written file costs some steps, never the run or its numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file, save, save_file

from smolcluster.errors import CheckpointError
from smolcluster.flat import FlatModel
from smolcluster.results import atomic_write

LATEST = "latest"
STATE = "state.safetensors"
RECORD = "checkpoint.json"
INFO_KEY = "smolcluster.checkpoint"
"""Metadata key of the state file holding {"step": ..., **info}: inside what the hash covers."""
FOLDER = re.compile(r"checkpoint-(\d{8,})")
MAX_REASON = 300
"""Characters of one folder's reason in an error: a damaged file must not flood the log."""


class _Unusable(Exception):
    """One checkpoint folder cannot be used; the message is the reason, one line."""


# --- optimizer state ----------------------------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split `optimizer.state_dict()` into tensors and a JSON-able remainder."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"optimizer.scalars": json.dumps(scalars), "optimizer.groups": json.dumps(sd["param_groups"])}
    return tensors, meta


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Load state that `optimizer_tensors` wrote; raises ValueError naming what does not fit.

    torch checks the number of groups and parameters but not tensor shapes, so a wrong one would
    load and only fail (or broadcast silently) at the next step: everything is checked first, and
    the optimizer is untouched unless all of it fits.
    """
    optimizer.load_state_dict(_checked_state(optimizer, tensors, meta))


def _checked_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   meta: dict[str, str]) -> dict[str, Any]:
    shapes = [p.shape for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("opt."):
            continue
        idx, key = _state_key(name[len("opt."):], len(shapes), f"optimizer tensor {name}")
        if value.ndim and value.shape != shapes[idx]:
            raise ValueError(f"optimizer tensor {name} has shape {list(value.shape)}, "
                             f"parameter {idx} has {list(shapes[idx])}")
        state.setdefault(idx, {})[key] = value
    for name, value in _json_field(meta, "optimizer.scalars", dict, "{}").items():
        idx, key = _state_key(name, len(shapes), f"optimizer.scalars key {name[:50]!r}")
        state.setdefault(idx, {})[key] = value
    groups = _json_field(meta, "optimizer.groups", list)
    _check_groups(groups, optimizer.param_groups, type(optimizer).__name__)
    return {"state": state, "param_groups": groups}


def _state_key(text: str, n: int, what: str) -> tuple[int, str]:
    """'3.exp_avg' -> (3, 'exp_avg'), the index one of the optimizer's n parameters."""
    idx, sep, key = text.partition(".")
    if not sep or not key or not idx.isdigit() or int(idx) >= n:
        raise ValueError(f"{what}: expected '<parameter 0..{n - 1}>.<name>'")
    return int(idx), key


def _json_field(meta: dict[str, str], key: str, kind: type, default: str | None = None) -> Any:
    text = meta.get(key, default)
    if text is None:
        raise ValueError(f"metadata {key}: missing")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"metadata {key}: not valid JSON ({str(e)[:100]})") from None
    if not isinstance(value, kind):
        raise ValueError(f"metadata {key}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _check_groups(saved: list[Any], ours: list[dict[str, Any]], kind: str) -> None:
    """Same groups, sizes and hyperparameter kinds as this optimizer; parameter ids 0..n-1 in order."""
    if len(saved) != len(ours):
        raise ValueError(f"metadata optimizer.groups: {len(saved)} parameter groups, the optimizer has {len(ours)}")
    ids: list[Any] = []
    for i, (group, mine) in enumerate(zip(saved, ours)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise ValueError(f"metadata optimizer.groups[{i}]: expected a mapping with a 'params' list")
        if len(group["params"]) != len(mine["params"]):
            raise ValueError(f"metadata optimizer.groups[{i}]: {len(group['params'])} parameters, "
                             f"the optimizer has {len(mine['params'])}")
        ids += group["params"]
        foreign = sorted(set(group) - set(mine))
        if foreign:
            raise ValueError(f"metadata optimizer.groups[{i}]: has {', '.join(map(str, foreign[:4]))}, which {kind} "
                             "does not: another optimizer's state")
        for key, value in mine.items():  # a key torch added since is absent: torch fills it in
            if key != "params" and key in group and not _same_kind(group[key], value):
                raise ValueError(f"metadata optimizer.groups[{i}].{key}: {str(group[key])[:50]!r} "
                                 f"does not fit this optimizer (it has {value!r})")
    if ids != list(range(len(ids))):
        raise ValueError("metadata optimizer.groups: parameter ids are not 0..n-1 in order")


def _same_kind(saved: Any, ours: Any) -> bool:
    """Whether a hyperparameter read from JSON can stand where `ours` stands (lr, betas, flags)."""
    if isinstance(ours, bool) or ours is None:
        return isinstance(saved, bool) or saved is None
    if isinstance(ours, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(ours, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(ours) and all(map(_same_kind, saved, ours))
    return True  # strings and anything else torch keeps as it is


def encode_state(optimizer: torch.optim.Optimizer, buffers: torch.Tensor | None = None) -> bytes:
    """The optimizer state (and the model's float buffers, flat) as one safetensors blob: the
    STATE frame's payload."""
    tensors, meta = optimizer_tensors(optimizer)
    if buffers is not None and buffers.numel():
        tensors["buffers"] = buffers.clone()
    return save(tensors, metadata=meta)


def decode_state(optimizer: torch.optim.Optimizer, payload: bytes, peer: str,
                 buffers: torch.Tensor | None = None) -> None:
    """Load a STATE payload (into `buffers` too, if the model has any); safetensors parses only a
    JSON header and raw tensors, so no code runs."""
    try:
        tensors = load(payload)
        meta = _metadata(payload)
        theirs = tensors.pop("buffers", None)
        if buffers is not None and buffers.numel():
            _check_buffers(theirs, buffers)
        load_optimizer_tensors(optimizer, tensors, meta)
    except Exception as e:  # bytes from a peer: any failure to make sense of them is the peer's error
        raise CheckpointError(f"{peer}: optimizer state is not usable ({e!r})") from None
    if theirs is not None and buffers is not None and buffers.numel():
        buffers.copy_(theirs)


def _check_buffers(theirs: torch.Tensor | None, ours: torch.Tensor) -> None:
    """The model's float buffers (BatchNorm statistics) as saved must fit ours exactly."""
    if theirs is None:
        raise ValueError("no 'buffers' tensor, but the model has buffers (BatchNorm statistics)")
    if theirs.ndim != 1 or theirs.dtype != torch.float32 or theirs.numel() != ours.numel():
        raise ValueError(f"buffers is {theirs.dtype} {list(theirs.shape)}; the model has {ours.numel()} float32 buffer values")
    if not bool(torch.isfinite(theirs).all()):
        raise ValueError("buffers hold NaN or infinity")


def _metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (its header is 8-byte length + JSON)."""
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise ValueError("safetensors header longer than the blob")
    header = json.loads(blob[8 : 8 + n])
    return header.get("__metadata__", {}) or {}


# --- checkpoints on disk ------------------------------------------------------------------------


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
    remove_stale(root)
    name = f"checkpoint-{step:08d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, meta = optimizer_tensors(optimizer)
    flat.pull()
    tensors["params"] = flat.params.clone()
    if flat.nbuf:
        tensors["buffers"] = flat.buffers.clone()
    record = {"step": step, **info}
    save_file(tensors, str(tmp / STATE), metadata={**meta, INFO_KEY: json.dumps(record)})
    digest, size = _digest(tmp / STATE)
    (tmp / RECORD).write_text(json.dumps({**record, "state_sha256": digest, "state_bytes": size}, indent=2))
    for path in (tmp / STATE, tmp / RECORD):  # on disk before `latest` can name them
        _fsync(path)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write(root / LATEST, lambda t: Path(t).write_text(name + "\n"))
    for old in _folders(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path, flat: FlatModel, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Restore parameters and optimizer state in place from the newest usable checkpoint under `root`.

    `latest` first, then the other folders newest first: each is verified (content hash, tensors
    against the model) before anything is loaded, and one that fails is skipped with a warning
    that names it and says why. Only when none is usable is it a CheckpointError.
    """
    remove_stale(root)
    candidates, note = _candidates(root)
    if not candidates:
        raise CheckpointError(f"no checkpoint to resume from in {root} ({note})")
    if note:
        logger.warning(f"{root}: {note}; trying the checkpoint folders, newest first")
    failures: list[str] = []
    for i, folder in enumerate(candidates):
        try:
            ckpt = _load_folder(folder, flat, optimizer)
        except _Unusable as e:
            reason = str(e)[:MAX_REASON]
            then = "; trying the previous one" if i + 1 < len(candidates) else ""
            logger.warning(f"checkpoint {folder} is not usable: {reason}{then}")
            failures.append(f"{folder.name}: {reason}")
            continue
        if failures:
            logger.warning(f"resuming from the older checkpoint {folder} (step {ckpt.step}): "
                           f"{len(failures)} newer one(s) were not usable")
        return ckpt
    raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(failures))


def remove_stale(root: Path) -> list[str]:
    """Delete what a writer killed mid-checkpoint left in `root` (`.checkpoint-*.tmp` folders,
    atomic_write's `.latest.*` temp files); one server writes a root at a time, so any found
    now is stale. Returns the names removed, and logs them."""
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        name = path.name
        if (name.startswith(".checkpoint-") and name.endswith(".tmp")) or name.startswith(f".{LATEST}."):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(name)
    if removed:
        shown = ", ".join(sorted(removed)[:10]) + (f" and {len(removed) - 10} more" if len(removed) > 10 else "")
        logger.warning(f"{root}: removed {len(removed)} stale temporary file(s) of an interrupted checkpoint: {shown}")
    return removed


def _folders(root: Path) -> list[Path]:
    """checkpoint-NNNNNNNN folders, newest (highest step) first."""
    found = [(int(m[1]), p) for p in root.iterdir() if (m := FOLDER.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _candidates(root: Path) -> tuple[list[Path], str]:
    """Folders to try in order, and what was wrong with `latest` ('' when nothing was)."""
    if not root.is_dir():
        return [], f"no '{LATEST}' file"
    folders = _folders(root)
    try:
        name = (root / LATEST).read_text(errors="replace").strip()
    except OSError:
        return folders, f"no '{LATEST}' file"
    if not FOLDER.fullmatch(name):
        return folders, f"'{LATEST}' names {name[:50]!r}, not a checkpoint folder"
    return [root / name, *(f for f in folders if f.name != name)], ""


def _load_folder(folder: Path, flat: FlatModel, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Verify one folder completely, then load it; raises _Unusable (nothing loaded) if it does not fit."""
    if not folder.is_dir():
        raise _Unusable("the folder is missing")
    record = _read_record(folder)
    tensors, meta = _read_state(folder, record)
    if INFO_KEY in meta:
        try:
            info = _json_field(meta, INFO_KEY, dict)
        except ValueError as e:
            raise _Unusable(f"{STATE}: {e}") from None
        if record.get("step") != info.get("step"):
            raise _Unusable(f"{RECORD} says step {str(record.get('step'))[:30]}, {STATE} says {str(info.get('step'))[:30]}")
    else:  # written before the info moved into the state file; verified by its hash alone
        info = {k: v for k, v in record.items() if k not in ("state_sha256", "state_bytes")}
    step = info.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _Unusable(f"step: expected an integer >= 0, got {str(step)[:30]!r}")
    params = tensors.pop("params", None)
    if params is None:
        raise _Unusable(f"{STATE}: no 'params' tensor")
    if params.ndim != 1 or params.dtype != torch.float32 or params.numel() != flat.numel:
        raise _Unusable(f"{STATE}: params is {params.dtype} {list(params.shape)}; "
                        f"the model has {flat.numel} float32 parameters")
    if not bool(torch.isfinite(params).all()):
        raise _Unusable(f"{STATE}: params hold NaN or infinity")
    buffers = tensors.pop("buffers", None)
    if flat.nbuf:
        try:
            _check_buffers(buffers, flat.buffers)
        except ValueError as e:
            raise _Unusable(f"{STATE}: {e}") from None
    try:
        state = _checked_state(optimizer, tensors, meta)
        optimizer.load_state_dict(state)
    except ValueError as e:
        raise _Unusable(f"{STATE}: {e}") from None
    except Exception as e:  # checked above; whatever torch still refuses, the folder is the reason
        raise _Unusable(f"{STATE}: optimizer state does not fit ({type(e).__name__}: {e})") from None
    flat.params.copy_(params)
    if flat.nbuf:
        flat.buffers.copy_(buffers)
    flat.push()
    flat.count_steps(step)
    return Checkpoint(step=step, info=info)


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / RECORD).read_text())
    except OSError as e:
        raise _Unusable(f"{RECORD}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _Unusable(f"{RECORD}: not valid JSON ({str(e)[:100]})") from None
    if not isinstance(record, dict):
        raise _Unusable(f"{RECORD}: expected a JSON object, got {type(record).__name__}")
    return record


def _read_state(folder: Path, record: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state file's tensors and metadata, once its size and sha256 match the record."""
    path = folder / STATE
    try:
        size = path.stat().st_size
        expected = record.get("state_sha256")
        if expected is None:
            logger.warning(f"{folder}: no content hash in {RECORD} (written by an older smolcluster); not verified")
        else:
            if record.get("state_bytes") not in (None, size):
                raise _Unusable(f"{STATE}: {size} bytes, {RECORD} says {str(record.get('state_bytes'))[:30]} (truncated?)")
            digest, _ = _digest(path)
            if digest != expected:
                raise _Unusable(f"{STATE}: content hash mismatch (sha256 {digest[:16]}..., {RECORD} says "
                                f"{str(expected)[:16]}...): the file changed after it was written")
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except OSError as e:
        raise _Unusable(f"{STATE}: cannot read it ({e.strerror or e})") from None
    except (SafetensorError, ValueError) as e:
        raise _Unusable(f"{STATE}: not a readable safetensors file ({str(e)[:100]})") from None
    return tensors, meta


def _digest(path: Path) -> tuple[str, int]:
    """sha256 (hex) and size of a file, read in chunks."""
    with path.open("rb") as f:
        h = hashlib.file_digest(f, "sha256")
        return h.hexdigest(), f.tell()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
