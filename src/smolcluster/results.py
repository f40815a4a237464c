"""What a run leaves behind: model.safetensors (never pickle) and summary.json, written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from smolcluster.config import ConfigError, ModelConfig, build


class ModelFileError(RuntimeError):
    """A saved model file is missing, unreadable, or not one of ours."""
from smolcluster.models import build_model


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_model(model: nn.Module, model_cfg: ModelConfig, path: Path, extra: dict[str, str] | None = None) -> None:
    """The weights plus the model config in the safetensors metadata, so `eval` can rebuild it."""
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"smolcluster.model": json.dumps(dataclasses.asdict(model_cfg)), **(extra or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_model(path: Path) -> tuple[nn.Module, ModelConfig, dict[str, str]]:
    """Rebuild a saved model; safetensors holds only tensors and strings, so this runs no code."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({e})") from None
    if "smolcluster.model" not in meta:
        raise ModelFileError(f"{path}: no smolcluster model config in its metadata")
    try:
        cfg = build(ModelConfig, json.loads(meta["smolcluster.model"]), "model")
    except (ConfigError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: its model config is not usable ({e})") from None
    model = build_model(cfg, 0)
    model.load_state_dict(tensors)
    return model, cfg, meta


def write_summary(summary: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
