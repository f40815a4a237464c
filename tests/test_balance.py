"""balance.py: work shares follow measured speeds, within bounds (STATS are checked in test_stats.py)."""

from __future__ import annotations

from smolcluster.balance import MAX_SCALE, plan


def test_a_worker_twice_as_fast_gets_twice_the_batch_in_sync():
    sizes = plan({1: 0.001, 2: 0.002}, 2, 30, 8, sync=True)
    assert sizes == {1: (40, 1), 2: (20, 1)}


def test_in_the_local_modes_the_local_steps_scale_and_the_batch_stays():
    sizes = plan({1: 0.001, 2: 0.003, 3: 0.003}, 3, 16, 10, sync=False)
    assert sizes == {1: (16, 18), 2: (16, 6), 3: (16, 6)}


def test_unmeasured_workers_count_as_the_median_and_shares_are_bounded():
    assert plan({1: 0.001}, 3, 10, 1, sync=True) == {1: (10, 1), 2: (10, 1), 3: (10, 1)}
    sizes = plan({1: 1e-6, 2: 1.0}, 2, 10, 1, sync=True)
    assert sizes[1] == (min(MAX_SCALE * 10, 20), 1) and sizes[2] == (1, 1)
