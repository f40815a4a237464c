"""`smolcluster predict` on a model trained here: image files of any size read as the test set's samples."""

from __future__ import annotations

import re
import subprocess

import pytest
from PIL import Image

from helpers import REPO, env, mnist_test_digit, smolcluster, train_mnist

pytestmark = pytest.mark.timeout(180)
SAMPLES = list(range(10))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(smolcluster(*args), capture_output=True, text=True, env=env(), cwd=REPO, timeout=150)


def test_predict_reads_png_files_of_any_size_like_the_test_set(tmp_path):
    model = str(train_mnist(tmp_path / "run"))
    files = []
    for n in SAMPLES:
        digit, _ = mnist_test_digit(n)
        digit.save(tmp_path / f"{n}.png")  # as MNIST has it: light on dark, 28 x 28
        # as someone would draw it: dark ink on white, ten times the size, as JPEG
        Image.eval(digit, lambda v: 255 - v).resize((280, 280), Image.Resampling.NEAREST).save(tmp_path / f"{n}.jpg")
        files += [str(tmp_path / f"{n}.png"), str(tmp_path / f"{n}.jpg")]
    got = _run("predict", model, *files, *[a for n in SAMPLES for a in ("--index", str(n))])
    assert got.returncode == 0, got.stderr[-2000:]
    lines = got.stdout.splitlines()
    top = {name: int(cls) for name, cls in (re.match(r"(\S+): (\d+) \(", line).groups() for line in lines)}
    labels = {int(n): int(y) for n, y in re.findall(r"test\[(\d+)\]: .*\[label (\d+)\]", got.stdout)}
    for n in SAMPLES:
        assert top[str(tmp_path / f"{n}.png")] == top[f"test[{n}]"], got.stdout  # the same input, exactly
    drawn = sum(top[str(tmp_path / f"{n}.jpg")] == labels[n] for n in SAMPLES)
    assert drawn >= 8, got.stdout
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    refused = _run("predict", model, str(bad))
    assert refused.returncode == 2 and "not an image Pillow can read" in refused.stderr, refused.stderr[-1000:]
