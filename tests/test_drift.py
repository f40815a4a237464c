"""drift.py: a sketch of 64 numbers estimates how far apart two replicas are."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smolcluster.drift import CHUNKS, digest, parse_sketch, relative_drift, sketch_length
from smolcluster.flat import FlatModel
from smolcluster.wire import ProtocolError


def _flat() -> FlatModel:
    torch.manual_seed(1)
    return FlatModel(nn.Sequential(nn.Linear(50, 40), nn.BatchNorm1d(40), nn.Linear(40, 10)))


def test_equal_replicas_have_equal_digests_and_no_drift():
    flat = _flat()
    a, b = digest(flat, 7), digest(_flat(), 7)
    assert a == b and relative_drift(a, b.sketch) == 0.0
    assert len(a.sketch) == sketch_length(flat.nbuf) == CHUNKS + min(CHUNKS, flat.nbuf)  # parameters, then buffers


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e-1])
def test_spread_drift_is_estimated_within_a_factor_of_two(scale):
    ours, theirs = _flat(), _flat()
    noise = torch.randn(theirs.numel, generator=torch.Generator().manual_seed(3))
    theirs.params.add_(noise * scale)
    true = float((theirs.params - ours.params).norm()) / math.sqrt(float(ours.params.square().sum() + ours.buffers.square().sum()))
    estimate = relative_drift(digest(ours, 7), digest(theirs, 7).sketch)
    assert 0.5 * true < estimate < 2 * true, (estimate, true)


def test_drift_in_one_parameter_is_measured_exactly():
    ours, theirs = _flat(), _flat()
    theirs.params[123] += 0.5
    d = digest(ours, 7)
    assert relative_drift(d, digest(theirs, 7).sketch) == pytest.approx(0.5 / d.norm, rel=1e-4)


def test_drift_of_the_buffers_counts_too():
    ours, theirs = _flat(), _flat()
    theirs.buffers[0] += 1.0
    assert relative_drift(digest(ours, 7), digest(theirs, 7).sketch) > 0


def test_a_non_finite_sketch_is_infinitely_far():
    d = digest(_flat(), 7)
    assert relative_drift(d, (math.nan,) * len(d.sketch)) == math.inf


@pytest.mark.parametrize("body", [{}, {"sketch": "x"}, {"sketch": [1.0] * 3}, {"sketch": [True] * 4},
                                  {"sketch": [None] * 4}])
def test_a_malformed_sketch_is_a_protocol_error_naming_the_peer(body):
    with pytest.raises(ProtocolError, match="worker 3"):
        parse_sketch(body, 4, "worker 3")
