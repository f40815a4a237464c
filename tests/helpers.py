"""Start real smolcluster processes for end-to-end tests: bench/cluster.py's harness, with a tiny job.

conftest.py puts the repository root on sys.path, so `bench` imports here.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.cluster import REPO, Proc, assert_same_params, env, free_port, smolcluster, wait_for
from bench.cluster import Cluster as _Cluster

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ARTIFACTS", "CHROMEDRIVER", "CHROMIUM", "FAST", "REPO", "Cluster", "Proc", "assert_same_params", "env",
           "free_port", "mnist_test_digit", "smolcluster", "train_mnist", "wait_for"]

# A tiny job: synthetic data, 512 samples, quick to run in a few seconds per process.
FAST = [
    "--set", "dataset.name=synthetic", "--set", "dataset.train_size=512", "--set", "dataset.test_size=256",
    "--set", "training.batch_size=16", "--set", "training.num_epochs=2", "--set", "training.eval_steps=0",
    "--set", "training.threads=1", "--set", "wandb.mode=disabled", "--set", "cluster.checksum_steps=5",
    "--set", "cluster.connect_timeout=60", "--set", "cluster.worker_timeout=60",
    "--set", "cluster.join_timeout=60", "--set", "cluster.http_port=0",
]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = REPO / "tests" / "artifacts"
"""Screenshots the browser tests leave for a person to look at (ignored by git)."""


@dataclass
class Cluster(_Cluster):
    """The harness, with the tiny job (FAST) before each test's own flags."""

    base: list[str] = field(default_factory=lambda: list(FAST))


def train_mnist(out: Path, steps: int = 300) -> Path:
    """A SimpleNN trained on real MNIST by `smolcluster run` in about 10 s (about 94% test
    accuracy); returns its model file."""
    done = subprocess.run(smolcluster("run", "--set", f"training.max_steps={steps}", "--set", "wandb.mode=disabled",
                                      "--out", str(out)), capture_output=True, text=True, env=env(), cwd=REPO,
                          timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "model.safetensors"


def mnist_test_digit(n: int) -> tuple[Image.Image, int]:
    """Sample n of MNIST's test set as a 28 x 28 grey picture (light on dark, as MNIST has it) and its label."""
    from PIL import Image

    from smolcluster.config import DatasetConfig
    from smolcluster.datasets.mnist import MNIST_FILES, mnist_root, read_idx

    images, labels = MNIST_FILES["test"]
    (_, rows, cols), pixels = read_idx(mnist_root(DatasetConfig()) / images, 2051)
    _, ys = read_idx(mnist_root(DatasetConfig()) / labels, 2049)
    return Image.frombytes("L", (cols, rows), bytes(pixels[n * rows * cols : (n + 1) * rows * cols])), ys[n]


def raw_http(port: int, data: bytes) -> bytes:
    """The answer of 127.0.0.1:port to bytes sent as they are; b"" if it closed (or reset) without one."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
        except OSError:  # it may stop reading (and close) before the last byte is sent
            pass
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except OSError:
            pass
    return answer
