"""The server's last line of defence: a known-good copy of the replica to fall back to.

The admission rules keep absurd gradients out of the average, but nothing else guards the
optimizer: a finite gradient can still overflow Adam's second moment to inf (the model then
stops moving, silently, on every replica) or a huge learning rate can overflow the parameters.
So after every optimizer step the server checks that parameters and optimizer state are finite
(one sum per tensor: NaN and Inf survive a sum), and if they are not it restores the last
snapshot and makes every worker resync to it. Snapshots are taken every `every` steps, after a
check passed, into preallocated buffers (a copy of the 7.9M MLP with Adam costs ~15 ms, so not
every step); a rollback loses at most that many steps.
"""

from __future__ import annotations

import math

import torch

from smolcluster.flat import FlatModel


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every floating-point tensor of the optimizer's state (moments, momentum buffers, step counts)."""
    return [v for s in optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()]


def replica_finite(flat: FlatModel, optimizer: torch.optim.Optimizer) -> bool:
    """Whether parameters and optimizer state hold only finite numbers."""
    sums = [flat.dev_params.sum(), flat.dev_buffers.sum(), *(t.sum() for t in state_tensors(optimizer))]
    return math.isfinite(float(torch.stack(sums).sum()))


class Snapshot:
    """Parameters and optimizer state as of `step`, restorable in place."""

    def __init__(self, flat: FlatModel, optimizer: torch.optim.Optimizer, every: int = 20) -> None:
        self.flat, self.optimizer, self.every = flat, optimizer, every
        self.step = -1
        self.params = torch.empty_like(flat.dev_params)  # where the model is: no copy to the CPU
        self.buffers = torch.empty_like(flat.dev_buffers)
        self.state: list[torch.Tensor] = []

    def due(self, step: int) -> bool:
        return self.step < 0 or step - self.step >= self.every

    def take(self, step: int) -> None:
        """Copy the replica (checked finite by the caller) as it is after `step` steps."""
        self.params.copy_(self.flat.dev_params)
        self.buffers.copy_(self.flat.dev_buffers)
        live = state_tensors(self.optimizer)
        if len(live) != len(self.state) or any(a.shape != b.shape for a, b in zip(live, self.state)):
            self.state = [t.detach().clone() for t in live]  # the state appears at the first step
        elif live:
            torch._foreach_copy_(self.state, live)
        self.step = step

    def restore(self) -> int:
        """Put the snapshot back in place (the optimizer keeps its tensors); returns its step."""
        if self.step < 0:
            raise RuntimeError("no snapshot to roll back to")
        self.flat.dev_params.copy_(self.params)
        self.flat.dev_buffers.copy_(self.buffers)
        live = state_tensors(self.optimizer)
        if live and len(live) == len(self.state):
            torch._foreach_copy_(live, self.state)
        else:  # the snapshot predates the optimizer's first step: no state then
            self.optimizer.state.clear()
        return self.step
