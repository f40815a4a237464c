"""The dashboard in a real browser: chromium's own headless mode runs the page's script against a
live 2-worker run and dumps the DOM it built; a screenshot is kept in tests/artifacts/.

CI installs chromium (.ci/run); elsewhere the test skips when there is none.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from helpers import ARTIFACTS, CHROMIUM, Cluster, free_port, wait_for

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here")]


def _chromium(url: str, *extra: str) -> str:
    """The page after its script ran for 2.5 s of (virtual) time: the DOM it built."""
    assert CHROMIUM, "CI must have chromium (.ci/run installs it)"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=2500", *extra, url],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _step(dom: str) -> int:
    found = re.search(r'data-key="step">(\d+)/(\d+)<', dom)
    assert found, dom[:3000]
    return int(found.group(1))


def test_the_dashboard_shows_both_workers_and_moving_numbers(tmp_path):
    port = free_port()
    cluster = Cluster(tmp_path, workers=2, args=[
        "--set", f"cluster.http_port={port}", "--set", "cluster.http_linger_s=3", "--set", "dataset.train_size=8192",
        "--set", "training.num_epochs=4"]).start()
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: "dashboard and metrics at" in cluster.procs["server"].output, 60, "the dashboard")
    wait_for(lambda: "all 2 workers joined" in cluster.procs["server"].output, 60, "the workers")
    first = _chromium(url, "--dump-dom")
    later: list[str] = []
    # Look again until the page shows a later step (each look runs the page for 2.5 s of its time).
    wait_for(lambda: _step(later.append(_chromium(url, "--dump-dom")) or later[-1]) > _step(first), 60,
             "the dashboard's step to move")
    for dom in (first, later[-1]):
        assert len(re.findall(r'<tr data-worker="\d+">', dom)) == 2, dom[:3000]
        assert "<polyline" in dom  # the loss chart was drawn
    assert _step(first) > 0
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    _chromium(url, f"--screenshot={shot}", "--window-size=1000,900", "--hide-scrollbars")
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    codes = cluster.wait(120)
    assert all(code == 0 for code in codes.values()), cluster.logs()
