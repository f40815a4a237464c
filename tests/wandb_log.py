"""Read an offline W&B run back from its `.wandb` transaction log, to check what was logged.

wandb 0.31 no longer ships a Python reader, so this is one: the file is a LevelDB-style log (a
7-byte ":W&B" header, then 32 KiB blocks of records, each with a 7-byte header: crc32c, length,
type; a record split over blocks comes as FIRST/MIDDLE.../LAST), and every record is a
`wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", 0xBEE1, version 0
RECORD_HEADER = struct.Struct("<IHB")  # crc32c, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every Record in the file, in order (checksums are not verified)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    magic, key, version = FILE_HEADER.unpack_from(raw)
    assert (magic, key, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a .wandb file"
    out, pending, pos = [], b"", FILE_HEADER.size
    while pos + RECORD_HEADER.size <= len(raw):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER.size:  # the block's tail is padding
            pos += left_in_block
            continue
        _, length, kind = RECORD_HEADER.unpack_from(raw, pos)
        pos += RECORD_HEADER.size
        chunk, pos = raw[pos:pos + length], pos + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class OfflineRun:
    """What one offline run recorded: its identity, config, history rows and summary."""

    path: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def read_run(path: Path) -> OfflineRun:
    """Parse `run-*.wandb` (or the run folder holding it)."""
    if path.is_dir():
        (path,) = path.glob("run-*.wandb")
    run = OfflineRun(path)
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group, run.job_type = r.run.display_name, r.run.run_group, r.run.job_type
            run.project = r.run.project
            for item in r.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            for item in r.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            run.exit_code = r.exit.exit_code
    return run


def offline_runs(root: Path) -> dict[str, OfflineRun]:
    """Every offline run under `root/wandb/`, by run name ("server", "worker-1", ...)."""
    runs = [read_run(p) for p in sorted((root / "wandb").glob("offline-run-*"))]
    return {r.name: r for r in runs}
