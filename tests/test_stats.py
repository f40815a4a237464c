"""stats.py: a worker's STATS body is checked field by field; a step splits into parts that add up."""

from __future__ import annotations

import math

import pytest

from smolcluster.stats import REPORT_S, StepClock, parse_stats, split
from smolcluster.wire import ProtocolError

TIMING = {"compute_s": 0.01, "wait_s": 0.002, "comm_s": 0.003, "steps": 40}


def test_each_field_is_optional_and_read():
    assert parse_stats({"s_per_sample": 0.0004}, "w").s_per_sample == 0.0004
    full = parse_stats({"timing": TIMING, "bytes_sent": 10, "bytes_received": 0}, "w")
    assert full.s_per_sample is None and full.timing == TIMING
    assert full.row() == {"compute_s": 0.01, "wait_s": 0.002, "comm_s": 0.003, "bytes_sent": 10, "bytes_received": 0}
    assert parse_stats({"s_per_sample": 0.5, "bytes_sent": 3}, "w").row() == {"bytes_sent": 3}


@pytest.mark.parametrize("body, says", [
    ({}, "nothing in it"),
    ({"s_per_sample": 0.1, "extra": 1}, "unknown fields ['extra']"),
    ({"s_per_sample": "1"}, "s_per_sample='1'"),
    ({"s_per_sample": -1.0}, "s_per_sample=-1.0"),
    ({"s_per_sample": 0}, "s_per_sample=0: expected a number > 0"),
    ({"s_per_sample": math.nan}, "s_per_sample=nan"),
    ({"s_per_sample": True}, "s_per_sample=True"),
    ({"s_per_sample": 1e9}, "s_per_sample=1000000000.0"),
    ({"timing": [1, 2, 3]}, "timing: expected an object"),
    ({"timing": {**TIMING, "more_s": 1.0}}, "timing: expected an object"),
    ({"timing": {k: v for k, v in TIMING.items() if k != "steps"}}, "timing: expected an object"),
    ({"timing": {**TIMING, "wait_s": -0.001}}, "timing.wait_s=-0.001"),
    ({"timing": {**TIMING, "comm_s": math.inf}}, "timing.comm_s=inf"),
    ({"timing": {**TIMING, "compute_s": 1e6}}, "timing.compute_s=1000000.0"),
    ({"timing": {**TIMING, "steps": 0}}, "timing.steps=0: expected an integer > 0"),
    ({"timing": {**TIMING, "steps": 1.5}}, "timing.steps=1.5"),
    ({"bytes_sent": -1}, "bytes_sent=-1"),
    ({"bytes_sent": 1.0}, "bytes_sent=1.0: expected an integer"),
    ({"bytes_received": 1 << 70}, "bytes_received="),
    ({"bytes_received": None}, "bytes_received=None"),
    ({"bytes_sent": "x" * 1000}, "bytes_sent='xxxxx"),
])
def test_a_bad_field_is_a_protocol_error_naming_the_peer(body, says):
    with pytest.raises(ProtocolError, match="^worker 2 \\(1.2.3.4:5\\): STATS ") as e:
        parse_stats(body, "worker 2 (1.2.3.4:5)")
    assert says in str(e.value) and len(str(e.value)) < 300, str(e.value)


def test_without_overlap_sending_is_communicate_and_the_parts_add_up():
    # forward+backward 0..10, sending 10..12, waiting 12..20 of which 1 s reading the averages, applying 20..23
    compute, wait, comm = split(0.0, 10.0, 12.0, 20.0, 23.0, received_s=1.0, last_sent=12.0)
    assert (compute, wait, comm) == (13.0, 7.0, 3.0)


def test_with_overlap_only_the_send_that_outlasts_backward_is_communicate():
    # backward ends at 10 with the sender thread still busy until 11.5; averages in at 20 (0.5 s reading them)
    compute, wait, comm = split(0.0, 10.0, 10.0, 20.0, 21.0, received_s=0.5, last_sent=11.5)
    assert (compute, wait, comm) == (11.0, 8.0, 2.0)
    assert compute + wait + comm == 21.0
    # a send hidden behind backward costs nothing beyond compute
    assert split(0.0, 10.0, 10.0, 12.0, 12.0, received_s=0.0, last_sent=9.0) == (10.0, 2.0, 0.0)


def test_the_clock_reports_means_about_once_a_second(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("smolcluster.stats.time.monotonic", lambda: now[0])
    clock = StepClock()
    assert clock.add(1.0, 0.0, 0.5) is None
    now[0] += REPORT_S / 2
    assert clock.add(3.0, 1.0, 0.5) is None
    now[0] += REPORT_S / 2
    assert clock.add(2.0, 2.0, 0.5) == {"compute_s": 2.0, "wait_s": 1.0, "comm_s": 0.5, "steps": 3}
    now[0] += 0.1
    assert clock.add(1.0, 1.0, 1.0) is None  # the next second starts afresh
