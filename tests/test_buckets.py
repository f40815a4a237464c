"""Bucketing of the flat gradient buffer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smolcluster.buckets import make_buckets


@given(st.lists(st.integers(1, 500), min_size=1, max_size=12), st.integers(1, 2000))
def test_buckets_tile_the_buffer_in_reverse_parameter_order(sizes, limit):
    buckets = make_buckets(sizes, limit)
    numel = sum(sizes)
    assert (buckets[0].lo, buckets[0].hi, buckets[0].params) == (numel, numel + 1, ())
    grads = buckets[1:]
    assert grads[0].hi == numel and grads[-1].lo == 0
    for a, b in zip(grads, grads[1:]):
        assert a.lo == b.hi  # contiguous, walking down the buffer
    order = [p for b in grads for p in b.params]
    assert order == list(reversed(range(len(sizes))))  # the order backward finishes them
    for b in grads:
        assert b.numel == sum(sizes[p] for p in b.params)
        assert b.numel <= limit or len(b.params) == 1  # only a single big parameter exceeds it
    assert [b.index for b in buckets] == list(range(len(buckets)))


def test_one_huge_limit_is_one_gradient_bucket():
    assert len(make_buckets([5, 6, 7], 10**9)) == 2
