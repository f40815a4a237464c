"""Batches for the training loop: straight from memory, or read ahead in a background thread.

`batches(dataset, index_batches)` yields one (x, y) per tensor of dataset indices. A dataset held
as tensors (one with `batch()`: `Split`, text `Windows`) is indexed directly on the caller's
thread: one fancy index, what the worker always did. Any other dataset is read item by item
(`__getitem__`, then torch's `default_collate`) by one background thread that keeps up to `ahead`
batches ready in a bounded queue, so reading the next batch overlaps this step's compute.

A reading error (a broken image) is raised by the iterator at the batch it belongs to. Closing
the iterator (or dropping it: a resync jumps to another step) stops the thread after the batch it
is reading; start a new one from the remaining index batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import Dataset

from smolcluster.datasets import fetch

AHEAD = 2
"""Batches the background thread reads ahead of the one being trained on."""
_END = object()


def batches(dataset: Dataset, index_batches: Iterable[torch.Tensor], ahead: int = AHEAD) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of each batch of indices, in order; see the module docstring."""
    if hasattr(dataset, "batch"):
        return (dataset.batch(idx) for idx in index_batches)
    return Prefetcher(dataset, index_batches, ahead)


class Prefetcher(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """Reads batches in a daemon thread, at most `ahead` in front of the consumer. The thread holds
    only the queue and the stop flag, so dropping the iterator stops it too."""

    def __init__(self, dataset: Dataset, index_batches: Iterable[torch.Tensor], ahead: int = AHEAD) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._done = False
        threading.Thread(target=_read, args=(dataset, iter(index_batches), self._queue, self._stop),
                         name="smolcluster-prefetch", daemon=True).start()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, BaseException):
            self.close()
            if item is _END:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        self._done = True
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


def _read(dataset: Dataset, index_batches: Iterator[torch.Tensor], out: queue.Queue, stop: threading.Event) -> None:
    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for idx in index_batches:
            if not put(fetch(dataset, idx)):
                return
    except BaseException as e:  # handed to the consumer, raised there with its own traceback
        put(e)
        return
    put(_END)
