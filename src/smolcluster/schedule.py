"""Which of its samples a worker trains on at each draw, when its work per step can change mid-run.

A draw is one batch: a step in sync mode, a local step in the local modes. Draw d takes the next
`batch` samples of the worker's epoch order (data.epoch_order) from where draw d-1 stopped; an
epoch's last batch may be short, and the next draw starts the next epoch. With one batch size for
the whole run, draw d is batch d mod S of epoch d div S (S = batches per epoch), the rule of the
README. `training.balance` changes a worker's batch (sync) or its local steps per round (local
modes) from a given round on; the position of every later draw still follows from the changes
alone, so a worker that rejoins, or restarts a round after a resync, draws the same samples.
"""

from __future__ import annotations

import math


class Schedule:
    def __init__(self, size: int, batch: int, local_steps: int = 1) -> None:
        self.size = size
        """Samples in one pass over the worker's training shard."""
        self.batches: list[tuple[int, int]] = [(0, batch)]
        """(first draw, batch size) from that draw on."""
        self.steps: list[tuple[int, int]] = [(0, local_steps)]
        """(first round, local steps per round) from that round on."""

    def change(self, round_: int, batch: int, local_steps: int) -> None:
        """From round `round_` on (a step, in sync): `batch` samples a draw, `local_steps` draws a round."""
        draw = self.first_draw(round_)
        self.batches = [b for b in self.batches if b[0] < draw] + [(draw, batch)]
        self.steps = [s for s in self.steps if s[0] < round_] + [(round_, local_steps)]

    def local_steps(self, round_: int) -> int:
        return [h for start, h in self.steps if start <= round_][-1]

    def batch(self, draw: int) -> int:
        return [b for start, b in self.batches if start <= draw][-1]

    def first_draw(self, round_: int) -> int:
        """The first draw of round `round_`: the local steps of every round before it."""
        total = 0
        for i, (start, h) in enumerate(self.steps):
            end = self.steps[i + 1][0] if i + 1 < len(self.steps) else round_
            total += max(0, min(end, round_) - start) * h
        return total

    def position(self, draw: int) -> tuple[int, int]:
        """(epoch, sample position in that epoch's order) where draw `draw` starts."""
        epoch, pos = 0, 0
        for i, (start, b) in enumerate(self.batches):
            end = self.batches[i + 1][0] if i + 1 < len(self.batches) else draw
            n = min(end, draw) - start
            if n <= 0:
                break
            rest = math.ceil((self.size - pos) / b)  # draws left in the current epoch
            if n < rest:
                pos += n * b
                continue
            n -= rest
            per = math.ceil(self.size / b)
            epoch, pos = epoch + 1 + n // per, (n % per) * b
        return epoch, pos
