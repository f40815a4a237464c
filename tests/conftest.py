"""Shared fixtures: a reaper that never lets a test leak a process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helpers
sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository root, for bench/ (the process harness)


def _kill_descendants() -> list[str]:
    me = psutil.Process(os.getpid())
    leftovers = me.children(recursive=True)
    names = []
    for proc in leftovers:
        try:
            names.append(" ".join(proc.cmdline()[-6:]))
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=5)
    return names


@pytest.fixture(autouse=True)
def reap_children():
    """Kill any process a test left behind (a failing fault test must not leak workers)."""
    yield
    _kill_descendants()


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest, and on a busy machine several spin against each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
