"""The model registry: a model is chosen by name (`model.type`) in nn_config.yaml, or by import path.

Each built-in lives in its own module (mlp.py, cnn.py, gpt.py) with a `build(cfg, input_shape)`.
torch is imported where a model is built, not here: config validation reads the registry, and
`smolcluster run` or a config error should not wait seconds for torch to load.

Sizes of 0 (`input_dim`, `out`, `context`) mean "from the data": `resolve` fills them in from
the dataset's description (a `DataMeta`: task, classes, input_shape, vocab), or from MNIST's
shape when there is none, which is what every caller got before datasets described themselves.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from smolcluster.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from smolcluster.config import ModelConfig


class DataMeta(Protocol):
    """What a model needs to know about its data; the datasets' own DataMeta has these fields."""

    task: str
    """'classify' (x -> one class) or 'lm' (token ids (T,) -> next-token logits (T, vocab))."""
    classes: int
    """Number of classes; for 'lm' the vocabulary size."""
    input_shape: tuple[int, ...]
    """One sample's x: (1, 28, 28) for MNIST, (context,) for text."""
    vocab: str
    """'lm' only: the characters, token id = index ('' otherwise)."""


@dataclass(frozen=True, slots=True)
class DataShape:
    """A plain DataMeta: MNIST's when no dataset describes itself, or the one a model file records."""

    task: str = "classify"
    classes: int = 10
    input_shape: tuple[int, ...] = (1, 28, 28)
    vocab: str = ""

    @classmethod
    def of(cls, meta: DataMeta) -> DataShape:
        return cls(str(meta.task), int(meta.classes), tuple(int(n) for n in meta.input_shape),
                   str(getattr(meta, "vocab", "") or ""))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "input_shape": list(self.input_shape)}


MNIST = DataShape()
"""What `build_model` assumes without a DataMeta: 1x28x28 images, ten classes."""

MODELS: dict[str, str] = {"SimpleNN": "mlp", "MLP": "mlp", "CNN": "cnn", "GPT": "gpt"}
"""model.type -> the module under smolcluster.models that builds it."""

TASKS: dict[str, str] = {"SimpleNN": "classify", "MLP": "classify", "CNN": "classify", "GPT": "lm"}

PRESETS: dict[str, dict[str, object]] = {
    "SimpleNN": {"type": "SimpleNN", "hidden": 128},
    "MLP": {"type": "MLP", "hidden": [512, 256, 128]},
    "CNN": {"type": "CNN", "hidden": 128, "channels": [16, 32]},
    "CNN-BN": {"type": "CNN", "hidden": 128, "channels": [32, 64], "batchnorm": True, "dropout": 0.25},
    "GPT": {"type": "GPT", "n_layer": 4, "n_head": 4, "n_embd": 128, "context": 64, "dropout": 0.0},
}
"""What `--model NAME` sets (a `--set model.KEY=...` after it still wins). CNN-BN is the
conv-BatchNorm-ReLU-pool network with dropout before its classifier; GPT is nanoGPT's small
character model for a CPU (4 layers, 4 heads, 128 wide, 64 characters of context)."""


def import_callable(path: str, key: str) -> Callable[..., Any]:
    """The callable `package.module:name` names, importable from the current directory or
    PYTHONPATH; a ConfigError naming `key` (e.g. 'model.type') when it cannot be had."""
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path:  # `smolcluster` runs from a script: the cwd is not on the path
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 (the user's module may raise anything while importing)
        raise ConfigError(f"{key}: cannot import {module_name} for {path} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{key}: {module_name} has no {attr} (from {path})") from None
    if not callable(obj):
        raise ConfigError(f"{key}: {path} is a {type(obj).__name__}, not a callable")
    return obj


def resolve(cfg: ModelConfig, meta: DataMeta | None = None) -> ModelConfig:
    """`cfg` with its sizes of 0 taken from the data. With `meta`, the sizes are also checked
    against the data (a ConfigError naming the key when the model cannot take it); without, 0s
    are MNIST's and explicit sizes are taken as they are. Import-path models are left alone."""
    if cfg.type not in MODELS:
        return cfg
    if meta is None and cfg.type == "GPT":
        for key in ("out", "context"):
            if not getattr(cfg, key):
                raise ConfigError(f"model.{key}: 0 takes it from the data, and no text dataset is described here")
        return cfg
    data = MNIST if meta is None else DataShape.of(meta)
    if data.task != TASKS[cfg.type]:
        hint = "GPT" if data.task == "lm" else "SimpleNN, MLP or CNN"
        raise ConfigError(f"model.type: {cfg.type} does not fit a '{data.task}' dataset; use {hint}")
    changes: dict[str, int] = {}
    if not cfg.out:
        changes["out"] = data.classes
    elif meta is not None and cfg.out < data.classes:
        what = "characters in its vocabulary" if data.task == "lm" else "classes"
        raise ConfigError(f"model.out: {cfg.out} outputs, but the data has {data.classes} {what} (0: from the data)")
    if cfg.type in ("SimpleNN", "MLP"):
        features = math.prod(data.input_shape)
        if not cfg.input_dim:
            changes["input_dim"] = features
        elif meta is not None and cfg.input_dim != features:
            raise ConfigError(f"model.input_dim: {cfg.input_dim}, but the data's samples have {features} values "
                              f"({'x'.join(map(str, data.input_shape))}); 0 takes it from the data")
    if cfg.type == "CNN":
        if len(data.input_shape) != 3:
            raise ConfigError(f"model.type: CNN takes images (channels, height, width), the data's samples "
                              f"are {list(data.input_shape)}")
        _, h, w = data.input_shape
        if min(h, w) >> len(cfg.channels) == 0:
            raise ConfigError(f"model.channels: {len(cfg.channels)} pooling stages shrink {h}x{w} images to nothing")
    if cfg.type == "GPT":
        length = data.input_shape[-1]
        if not cfg.context:
            changes["context"] = length
        elif cfg.context < length:
            raise ConfigError(f"model.context: {cfg.context} positions, but the data's samples are {length} "
                              "tokens long; raise model.context or shorten the dataset's")
    return dataclasses.replace(cfg, **changes) if changes else cfg


def build_model(cfg: ModelConfig, seed: int, meta: DataMeta | None = None) -> nn.Module:
    """The model, initialised from `seed` (only the server's initial weights matter: it sends them).

    `meta` describes the data (without it: MNIST); sizes of 0 in `cfg` come from it. An import
    path is called with `cfg.options` as keyword arguments under the same seeded RNG."""
    import torch
    from torch import nn

    if cfg.type in MODELS:
        resolved = resolve(cfg, meta)
        module = importlib.import_module(f"smolcluster.models.{MODELS[cfg.type]}")
        shape = (MNIST if meta is None else DataShape.of(meta)).input_shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return module.build(resolved, shape)
    factory = import_callable(cfg.type, "model.type")
    kwargs = call_args(cfg, factory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(**kwargs)
        except TypeError as e:  # most often an option the callable does not take
            raise ConfigError(f"model.type: {cfg.type}(**{kwargs}) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.type: {cfg.type} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def call_args(cfg: ModelConfig, factory: Any) -> dict[str, Any]:
    """An import-path model's keyword arguments: the section's keys that no built-in model has
    (`options`), plus the built-in ones (hidden, dropout, ...) set away from their defaults that
    the callable's signature takes by name. So `--set model.type=mynets:resnet8` works beside
    the shipped SimpleNN keys, and `hidden: 64` reaches a `def mine(hidden)`."""
    import dataclasses
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read: only what is surely its own
        return dict(cfg.options)
    takes = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if f.name not in ("type", "options") and getattr(cfg, f.name) != type(cfg)._default(f)}
    return {**{k: v for k, v in given.items() if k in takes}, **cfg.options}


def layout(model: nn.Module) -> list[list[Any]]:
    """Name and shape of every trainable parameter, in wire order."""
    return [[name, list(p.shape)] for name, p in model.named_parameters() if p.requires_grad]


def buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every floating-point buffer (BatchNorm's running mean and variance), in a fixed order:
    state the optimizer never sees, which replicas must share some other way. Integer buffers
    (BatchNorm's num_batches_tracked) count steps and are left out."""
    return [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
