"""Your own dataset by import path: `dataset.name: package.module:callable`.

The callable gets the section's other keys as keyword arguments (`DatasetConfig.options`):
`dataset: {name: mydata:load, path: train.npz, scale: 2}` calls `mydata.load(path="train.npz",
scale=2)`. The module is imported from the current directory (put first on sys.path) or from
anywhere on PYTHONPATH. It is called on every machine, so it must return the same data on each
(the handshake compares the sizes and a digest of a sample; set dataset.version to name a version).

It returns either

- `(train, test)`, each one of
  - a pair of tensors `(x, y)`: x (n, ...) any float dtype, y (n,) integer class indices. Held in
    memory and batched with one index: the fastest (a `TensorDataset(x, y)` is taken as the pair);
  - a map-style `torch.utils.data.Dataset` whose item i is `(x, y)`: x a tensor, y an int (or a 0-d
    integer tensor). Read item by item in a background thread while the model trains;
- or a `smolcluster.datasets.Data(train, test, meta)`, to state the `DataMeta` yourself (an "lm"
  task; more classes than the largest label + 1).

Without a Data the meta is inferred: task "classify", input_shape = item 0's x shape, classes =
the largest label of both sets + 1 (from the y tensor; from a Dataset's `targets`, as torchvision's
datasets have one; else by reading every item once). dataset.train_size / test_size keep the first N
as for any dataset.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, TensorDataset

from smolcluster.config import DatasetConfig
from smolcluster.datasets import Data, DataMeta, Split
from smolcluster.errors import ConfigError, cut


def resolve(name: str) -> Callable[..., Any]:
    """The callable `package.module:attr` names, importable from the current directory."""
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"dataset.name: no module {e.name!r} (looked in the current directory "
                              f"{os.getcwd()} and on PYTHONPATH)") from e
        raise ConfigError(f"dataset.name: importing {module_name!r} failed: {e}") from e
    except Exception as e:  # the user's module raised while it was imported
        raise ConfigError(f"dataset.name: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"dataset.name: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                              f"has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"dataset.name: {name} is a {type(obj).__name__}, not something to call")
    return obj


def _dataset(obj: Any, which: str, name: str) -> Dataset:
    """`obj` as a Dataset of (x, y); ConfigError saying what is wrong with it otherwise."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"dataset.name: {name} returned {what} as the {which} set; expected an (x, y) "
                           "pair of tensors or a Dataset whose items are (x, y) (see smolcluster/datasets/custom.py)")

    if isinstance(obj, TensorDataset) and len(obj.tensors) == 2:
        obj = obj.tensors
    if isinstance(obj, torch.Tensor):
        raise bad(f"one tensor {tuple(obj.shape)}")
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        x, y = obj
        if y.dim() != 1 or len(x) != len(y) or y.is_floating_point() or y.is_complex():
            raise ConfigError(f"dataset.name: {name} returned x {tuple(x.shape)} and y {tuple(y.shape)} of {y.dtype} "
                              f"as the {which} set; y must be (n,) integer class indices, n = len(x)")
        return Split(x, y.long())
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")) or isinstance(obj, (tuple, list, dict, str)):
        raise bad(f"a {type(obj).__name__}")
    if len(obj):
        item = obj[0]
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)):
            raise bad(f"a {type(obj).__name__} whose item 0 is {cut(repr(item), 80)}")
    return obj


def _labels(ds: Dataset) -> torch.Tensor:
    if isinstance(ds, Split):
        return ds.y
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == len(ds):
        return torch.as_tensor(targets)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])


def infer_meta(train: Dataset, test: Dataset, name: str) -> DataMeta:
    if not len(train):
        raise ConfigError(f"dataset.name: {name} returned an empty training set")
    ys = [y for y in (_labels(train), _labels(test)) if len(y)]
    low = min(int(y.min()) for y in ys)
    if low < 0:
        raise ConfigError(f"dataset.name: {name} returned a label {low}; labels are class indices 0, 1, ...")
    return DataMeta("classify", max(int(y.max()) for y in ys) + 1, tuple(train[0][0].shape))


def load(cfg: DatasetConfig, seed: int) -> Data:
    fn = resolve(cfg.name)
    try:
        inspect.signature(fn).bind(**cfg.options)
    except TypeError as e:
        raise ConfigError(f"dataset.name: {cfg.name} cannot take the section's keys {sorted(cfg.options)} "
                          f"as keyword arguments: {e}") from None
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    return coerce(fn(**cfg.options), cfg.name)


def coerce(result: Any, name: str) -> Data:
    """What a user's data callable returned (see the module docstring), as Data."""
    if isinstance(result, Data):
        return Data(_dataset(result.train, "training", name), _dataset(result.test, "test", name), result.meta)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ConfigError(f"dataset.name: {name} returned {cut(repr(result), 80)}; expected (train, test) "
                          "or a smolcluster.datasets.Data (see smolcluster/datasets/custom.py)")
    train, test = _dataset(result[0], "training", name), _dataset(result[1], "test", name)
    return Data(train, test, infer_meta(train, test, name))
