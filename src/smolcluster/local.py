"""A worker's half of a round in the local modes (local_sgd / FedAvg, diloco): steps on its own.

Between two exchanges a worker takes `local_steps` optimizer steps on its shard with its own
(inner) optimizer, starting from the round's global parameters. What it sends is not a gradient
but the round's change, start - now, through the same wire, codecs and averaging as a gradient
(weighted by the samples it trained on); then it puts the round's start back, and every replica
applies the averaged change with the outer optimizer (train.build_outer). With one local step,
plain SGD and an outer SGD at lr 1 this is exactly a synchronous step (a test checks it).

FedProx adds mu/2 * ||w - w_start||^2 to each local loss, i.e. mu * (w - w_start) to its gradient,
which keeps workers on non-IID shards from wandering off; with `prox_adaptive` mu follows the
averaged loss, which every replica holds the same, so every worker computes the same mu.
"""

from __future__ import annotations

import torch
from loguru import logger

from smolcluster.config import TrainingConfig
from smolcluster.flat import FlatModel
from smolcluster.train import build_optimizer, optimizer_step

ADAPT_STEP = 0.1
"""FedProx's heuristic: mu moves by this much."""
ADAPT_PATIENCE = 5
"""Rounds in a row with a falling loss before mu goes down."""


class LocalSteps:
    def __init__(self, flat: FlatModel, cfg: TrainingConfig) -> None:
        self.flat, self.cfg = flat, cfg
        self.inner = build_optimizer(flat.model, cfg)
        """This worker's own optimizer; its state stays on this worker, across rounds."""
        self.start = torch.empty_like(flat.dev_params)
        self.mu = cfg.prox_mu
        self._last_loss: float | None = None
        self._falling = 0

    def begin(self) -> None:
        """A round starts from the global parameters the replicas share."""
        self.start.copy_(self.flat.dev_params)

    def step(self, loss: torch.Tensor, index: int, total: int) -> None:
        """One local optimizer step on `loss` (backward, FedProx's pull, the inner optimizer)."""
        loss.backward()
        flat = self.flat
        if self.mu:
            flat.dev_grads.add_(flat.dev_params - self.start, alpha=self.mu)
        optimizer_step(self.inner, self.cfg, index, total)

    def end(self, round_: int) -> None:
        """The round's change goes where the wire reads gradients; the parameters go back to the start.

        A non-finite change (a NaN batch, an overflow) is sent as it is, and the server refuses
        it like a NaN gradient; but the inner optimizer's state took the NaN in too, and would make
        every later round NaN: it starts afresh."""
        flat = self.flat
        torch.sub(self.start, flat.dev_params, out=flat.dev_grads)
        flat.dev_params.copy_(self.start)
        if not bool(torch.isfinite(flat.dev_grads).all()):
            self.inner.state.clear()
            logger.warning(f"round {round_}: this worker's local steps went non-finite; the server will refuse "
                           "the round's change, and the inner optimizer starts afresh")

    def adapt(self, averaged_loss: float) -> None:
        """FedProx's adaptive mu from the round's averaged loss (the same on every replica)."""
        if not self.cfg.prox_adaptive:
            return
        last, self._last_loss = self._last_loss, averaged_loss
        if last is None:
            return
        if averaged_loss > last:
            self.mu, self._falling = self.mu + ADAPT_STEP, 0
        else:
            self._falling += 1
            if self._falling >= ADAPT_PATIENCE:
                self.mu, self._falling = max(0.0, self.mu - ADAPT_STEP), 0
