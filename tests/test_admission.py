"""Caps on connections that have not authenticated, and raising the open-file limit (no sockets)."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import pytest

from smolcluster import admission
from smolcluster.admission import Admission, FdLimit, raise_fd_limit


@dataclass
class FakeSock:
    closed: bool = False

    def fileno(self) -> int:
        return -1 if self.closed else 7


@dataclass(eq=False)
class FakePeer:
    host: str
    worker_id: int = 0
    sock: FakeSock = field(default_factory=FakeSock)


def test_caps_derive_from_the_open_file_limit():
    assert str(Admission.for_fd_limit(256)) == "cap 96 total, 16 per address"  # (256 - 64) // 2
    assert str(Admission.for_fd_limit(10240)) == "cap 128 total, 16 per address"
    assert str(Admission.for_fd_limit(70)) == "cap 3 total, 3 per address"
    assert str(Admission.for_fd_limit(10)) == "cap 1 total, 1 per address"


def test_past_the_per_address_cap_that_address_sheds_its_oldest():
    a = Admission(total=10, per_address=3)
    flood = [FakePeer("10.0.0.9") for _ in range(5)]
    worker = FakePeer("10.0.0.2")
    shed = [v for p in [flood[0], worker, *flood[1:]] for v in a.add(p)]
    assert shed == flood[:2]  # the worker from another address is untouched
    assert list(a.pending) == [worker, *flood[2:]]


def test_past_the_total_cap_the_oldest_of_all_goes_and_closed_or_authenticated_ones_do_not_count():
    a = Admission(total=3, per_address=3)
    peers = [FakePeer(f"10.0.0.{k}") for k in range(6)]
    assert [v for p in peers[:3] for v in a.add(p)] == []
    peers[0].sock.closed = True  # dropped: purged, not shed
    peers[1].worker_id = 1  # authenticated: no longer waiting
    assert a.add(peers[3]) == []
    assert a.add(peers[4]) == []
    assert a.add(peers[5]) == [peers[2]]
    assert a.oldest() is peers[3]


def test_closes_are_logged_one_by_one_up_to_a_burst_then_counted():
    a = Admission(total=3, per_address=3)
    logged = sum(a.may_log() for _ in range(100))
    assert logged == admission.LOGGED_DROPS_BURST and a.quiet == 100 - logged
    a.shed = 7
    line = a.summary(a.window + 1.0)
    assert line.startswith("shed 7 connections that had not authenticated in the last 1 s (cap 3 total, 3 per address); ")
    assert line.endswith("; 80 more unauthenticated connections closed in the last 1 s (not logged one by one)")
    assert a.summary(a.window + 1.0) == ""  # a new window
    assert a.may_log() and a.tokens < admission.LOGGED_DROPS_BURST  # refilled, a little


@pytest.fixture
def rlimit(monkeypatch):
    """A fake RLIMIT_NOFILE: (soft, hard), and what setrlimit does with a new value."""
    state = {"limit": (256, 256), "refuse": None}

    def setrlimit(_what, value):
        if state["refuse"]:
            raise state["refuse"]
        state["limit"] = value

    monkeypatch.setattr(resource, "getrlimit", lambda _what: state["limit"])
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    return state


def test_the_soft_limit_is_raised_toward_the_hard_one(rlimit):
    rlimit["limit"] = (256, 4096)
    assert str(raise_fd_limit()) == "soft limit raised 256 -> 4096" and rlimit["limit"] == (4096, 4096)


def test_an_unlimited_hard_limit_is_clamped_to_open_max(rlimit):
    rlimit["limit"] = (256, resource.RLIM_INFINITY)
    assert str(raise_fd_limit()) == "soft limit raised 256 -> 10240"


def test_a_limit_that_cannot_be_raised_is_said_so(rlimit):
    rlimit["limit"] = (256, 256)
    assert str(raise_fd_limit()) == "soft limit 256 (the hard limit; cannot raise it)"
    rlimit["limit"], rlimit["refuse"] = (256, 65536), ValueError("current limit exceeds maximum limit")
    assert raise_fd_limit() == FdLimit(256, 256, "could not raise it to 10240: current limit exceeds maximum limit")
    rlimit["limit"] = (20000, 20000)
    assert str(raise_fd_limit()) == "soft limit 20000 (10240 or more already)"
