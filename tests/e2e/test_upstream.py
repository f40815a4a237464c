"""Upstream smolcluster's own config files, where upstream keeps them, as its README shows them.

Upstream reads `host_ip: null` as "detect my address"; here null means the server listens on every
interface and prints the addresses workers can use, and a worker must be given one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import REPO, env, free_port, smolcluster

pytestmark = pytest.mark.timeout(120)

CLUSTER = """\
host_ip: null  # null = auto-detect local IP
port: 65432
num_workers: 2  # Number of worker nodes
timeout: 0.1   # Timeout for gradient collection (seconds)
"""
NN = """\
batch_size: 32
learning_rate: 0.001
num_epochs: 2
eval_steps: 200        # Evaluate every N steps
track_gradients: true  # Log gradient norms to W&B
model:
  type: SimpleNN
  input_dim: 784
  hidden: 128
  out: 10
dataset:
  name: MNIST
"""
SMALL = ["--set", "dataset.train_size=1024", "--set", "dataset.test_size=256", "--set", "training.max_steps=20",
         "--set", "dataset.root=" + str(REPO / "data" / "mnist")]


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A folder laid out like upstream's checkout: src/smolcluster/configs/ and no configs/."""
    folder = tmp_path / "src" / "smolcluster" / "configs"
    folder.mkdir(parents=True)
    (folder / "cluster_config.yaml").write_text(CLUSTER)
    (folder / "nn_config.yaml").write_text(NN)
    return tmp_path


def test_upstreams_config_files_load_from_its_folder_and_run(upstream):
    done = subprocess.run(smolcluster("run", *SMALL), cwd=upstream, env=env(), capture_output=True, text=True,
                          timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test accuracy:" in done.stdout
    assert "src/smolcluster/configs/nn_config.yaml: key 'batch_size' now lives under 'training.batch_size'" in done.stderr
    assert "key 'timeout' is now called 'step_timeout'" in done.stderr


def test_host_ip_null_server_prints_where_workers_can_reach_it(upstream):
    server = subprocess.Popen(smolcluster("server", "--set", f"cluster.port={free_port()}", *SMALL), cwd=upstream,
                              env=env(SMOLCLUSTER_TOKEN="upstream test token"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:  # bounded by the test's timeout
            lines.append(line)
            if "workers can reach this server at" in line:
                break
        assert "listening on 0.0.0.0:" in "".join(lines), "".join(lines)
        assert "start each with --set cluster.host_ip=ADDRESS" in lines[-1]
    finally:
        server.kill()
        server.wait()


def test_a_worker_with_host_ip_null_is_told_to_name_the_server(upstream):
    done = subprocess.run(smolcluster("worker", "--id", "1", *SMALL), cwd=upstream, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "host_ip: null lets the server pick its addresses, but a worker must be told one" in done.stderr
