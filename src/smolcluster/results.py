"""What a run leaves behind: model.safetensors (never pickle) and summary.json, written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from smolcluster.config import ConfigError, DatasetConfig, ModelConfig, build
from smolcluster.errors import ModelFileError
from smolcluster.models import DataMeta, DataShape, build_model, resolve


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


DATA_KEY = "smolcluster.data"
"""Metadata key of the data's description (task, classes, input_shape, vocab) as JSON: what
rebuilding an image model of another shape, or sampling from a text model, needs."""


def save_model(model: nn.Module, model_cfg: ModelConfig, path: Path, extra: dict[str, str] | None = None,
               meta: DataMeta | None = None) -> None:
    """The weights plus the model config in the safetensors metadata, so `eval` can rebuild it.

    The config is stored with its sizes of 0 filled in from `meta` (the data's description, the
    one the model was built with; None: MNIST), and `meta` itself under DATA_KEY: a text model's
    vocabulary travels with its weights."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    resolved = resolve(model_cfg, meta)
    info = {"smolcluster.model": json.dumps(dataclasses.asdict(resolved))}
    if meta is not None:
        info[DATA_KEY] = json.dumps(DataShape.of(meta).to_dict())
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={**info, **(extra or {})}))


def load_model(path: Path) -> tuple[nn.Module, ModelConfig, dict[str, str]]:
    """Rebuild a saved model; safetensors holds only tensors and strings, so this runs no code.

    The metadata's model config and the tensors are checked against each other (names, shapes,
    dtypes) before the model is built: a file whose parts disagree is a ModelFileError naming the
    first difference, and a config claiming absurd sizes allocates nothing. `data_meta(path,
    meta)` reads the data's description (a text model's vocabulary) from the returned metadata.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from None
    if "smolcluster.model" not in meta:
        raise ModelFileError(f"{path}: no smolcluster model config in its metadata")
    cfg = _metadata_config(path, meta, "smolcluster.model", ModelConfig)
    data = data_meta(path, meta)
    try:
        cfg = resolve(cfg, data)
    except ConfigError as e:
        raise ModelFileError(f"{path}: its model config does not fit its data description ({e})") from None
    check_tensors(path, cfg, tensors, data)
    model = build_model(cfg, 0, data)
    model.load_state_dict(tensors)
    return model, cfg, meta


def data_meta(path: Path, meta: dict[str, str]) -> DataShape | None:
    """The description of the data a model was trained on, from its metadata (None: not recorded,
    a file from before it was; such a model was trained on MNIST-shaped data)."""
    if DATA_KEY not in meta:
        return None
    try:
        d = json.loads(meta[DATA_KEY])
        if not isinstance(d, dict) or set(d) != {"task", "classes", "input_shape", "vocab"}:
            raise ValueError("expected a JSON object with task, classes, input_shape and vocab")
        shape = d["input_shape"]
        if d["task"] not in ("classify", "lm"):
            raise ValueError(f"task {str(d['task'])[:50]!r} is neither 'classify' nor 'lm'")
        if not isinstance(d["classes"], int) or isinstance(d["classes"], bool) or d["classes"] < 1:
            raise ValueError(f"classes: expected a positive integer, got {str(d['classes'])[:50]}")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 8
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
            raise ValueError(f"input_shape: expected a list of positive integers, got {str(shape)[:50]}")
        if not isinstance(d["vocab"], str):
            raise ValueError("vocab: expected a string")
        if d["task"] == "lm" and len(d["vocab"]) != d["classes"]:
            raise ValueError(f"vocab has {len(d['vocab'])} characters, classes says {d['classes']}")
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise ModelFileError(f"{path}: metadata {DATA_KEY} is not usable ({str(e)[:300]})") from None
    return DataShape(d["task"], d["classes"], tuple(shape), d["vocab"])


def _metadata_config(path: Path, meta: dict[str, str], key: str, cls: type) -> Any:
    """A config section stored as JSON in the metadata, validated like a config file."""
    try:
        return build(cls, json.loads(meta[key]), key.removeprefix("smolcluster."))
    except (ConfigError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{path}: metadata {key} is not usable ({str(e)[:300]})") from None


def describe_config(cfg: ModelConfig) -> str:
    """'SimpleNN input_dim=784 hidden=64 out=10': what a mismatch error says the metadata claims."""
    if cfg.type == "GPT":
        return (f"GPT n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} context={cfg.context} "
                f"bias={cfg.bias} out={cfg.out}")
    if cfg.type == "CNN":
        return f"CNN channels={cfg.channels} batchnorm={cfg.batchnorm} hidden={cfg.hidden} out={cfg.out}"
    return f"{cfg.type} input_dim={cfg.input_dim} hidden={cfg.hidden} out={cfg.out}"


def check_tensors(path: Path, cfg: ModelConfig, tensors: dict[str, Any], data: DataMeta | None = None) -> None:
    """The tensors `cfg` implies, name by name and shape by shape, or a ModelFileError naming the
    first that differs. The model is built on torch's meta device: shapes only, no memory."""
    import torch

    try:
        with torch.device("meta"):
            model = build_model(cfg, 0, data).state_dict()
    except ConfigError as e:  # an import-path model that cannot be had here
        raise ModelFileError(f"{path}: cannot rebuild its model ({e})") from None
    expected = {k: (list(v.shape), v.dtype) for k, v in model.items()}
    claims = f"its metadata says {describe_config(cfg)}"
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ModelFileError(f"{path}: tensor {missing[0]} is missing ({claims}, which has "
                             f"{len(expected)} tensors: {', '.join(list(expected)[:8])})")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise ModelFileError(f"{path}: tensor {extra[0][:100]} is not part of the model ({claims}, "
                             f"which has {len(expected)} tensors: {', '.join(list(expected)[:8])})")
    for name, (shape, dtype) in expected.items():
        if list(tensors[name].shape) != shape:
            raise ModelFileError(f"{path}: tensor {name} is {list(tensors[name].shape)} in the file, but {claims}, "
                                 f"which makes it {shape}")
        if dtype.is_floating_point and not tensors[name].is_floating_point():
            raise ModelFileError(f"{path}: tensor {name} is {tensors[name].dtype}, expected floating point")
        if not dtype.is_floating_point and tensors[name].dtype != dtype:  # BatchNorm's step counter
            raise ModelFileError(f"{path}: tensor {name} is {tensors[name].dtype}, expected {dtype}")


def saved_data(path: Path, meta: dict[str, str]) -> tuple[DatasetConfig | None, int | None]:
    """The dataset and seed a model was trained on, from its metadata (None where not recorded)."""
    dataset = _metadata_config(path, meta, "smolcluster.dataset", DatasetConfig) if "smolcluster.dataset" in meta else None
    seed = None
    if "smolcluster.seed" in meta:
        text = meta["smolcluster.seed"].strip()
        if not re.fullmatch(r"-?\d{1,18}", text):  # what torch's generators take
            raise ModelFileError(f"{path}: metadata smolcluster.seed: expected an integer, got {text[:50]!r}")
        seed = int(text)
    return dataset, seed


def write_summary(summary: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))


@dataclass
class Counters:
    """Everything the run lost or refused, for the log, the summary and W&B."""

    late: int = 0
    nonfinite: int = 0
    outliers: int = 0
    rollbacks: int = 0
    dropped: int = 0
    rejoined: int = 0
    refused: int = 0
    replica_mismatches: int = 0
    drift_resyncs: int = 0
    periodic_resyncs: int = 0


def step_ms_stats(times: list[float], skip: int = 5) -> dict[str, float]:
    """Median/min/max step time in ms, leaving out the first `skip` (warm-up) steps."""
    kept = sorted(times[skip:] if len(times) > 2 * skip else times)
    if not kept:
        return {}
    return {"median": round(1e3 * kept[len(kept) // 2], 3), "min": round(1e3 * kept[0], 3),
            "max": round(1e3 * kept[-1], 3), "steps": len(kept)}


def headline(result: dict[str, Any], loss: bool = False) -> str:
    """A run's result in words: test accuracy for a classifier (with its loss if `loss`), test loss
    and bits per character for a language model (keys as in summary.json: test_accuracy,
    test_loss, test_bpc)."""
    if "test_accuracy" in result:
        return f"test accuracy: {result['test_accuracy']:.2f}%" + (f" (loss {result['test_loss']:.4f})" if loss else "")
    if "test_bpc" in result:
        return f"test loss: {result['test_loss']:.4f} nats/char ({result['test_bpc']:.3f} bits/char)"
    return f"test loss: {result.get('test_loss', float('nan')):.4f}"
