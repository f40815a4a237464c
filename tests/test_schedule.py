"""schedule.py: which samples each draw takes, with the batch size or the local steps changing mid-run."""

from __future__ import annotations

import math

import pytest

from smolcluster.schedule import Schedule


def _walk(size: int, sizes: list[int]) -> list[tuple[int, int]]:
    """The rule spelled out: draw after draw, `sizes[d]` samples each, an epoch's last batch short."""
    out, epoch, pos = [], 0, 0
    for b in sizes:
        out.append((epoch, pos))
        pos += b
        if pos >= size:
            epoch, pos = epoch + 1, 0
    return out


@pytest.mark.parametrize("size, batch", [(100, 32), (96, 32), (10, 3), (5, 7)])
def test_one_batch_size_is_the_readme_rule(size, batch):
    s = Schedule(size, batch)
    per = math.ceil(size / batch)
    for d in range(40):
        assert s.position(d) == (d // per, (d % per) * batch)
    assert s.position(0) == (0, 0) and s.first_draw(7) == 7


def test_a_batch_change_mid_epoch_carries_on_from_where_the_last_draw_stopped():
    s = Schedule(100, 32)
    s.change(5, 20, 1)  # draws 0-4 at 32 (an epoch of 4 draws: 32, 32, 32, 4), then 20
    positions = [s.position(d) for d in range(35)]
    assert positions == _walk(100, [32, 32, 32, 4, 32] + [20] * 30)
    assert positions[:7] == [(0, 0), (0, 32), (0, 64), (0, 96), (1, 0), (1, 32), (1, 52)]
    assert s.batch(4) == 32 and s.batch(5) == 20


def test_local_steps_change_from_a_round_on():
    s = Schedule(1000, 10, local_steps=4)
    s.change(3, 10, 7)
    assert [s.local_steps(r) for r in range(5)] == [4, 4, 4, 7, 7]
    assert [s.first_draw(r) for r in range(6)] == [0, 4, 8, 12, 19, 26]
    s.change(3, 10, 2)  # a later plan for the same round replaces the earlier one
    assert s.first_draw(5) == 16
