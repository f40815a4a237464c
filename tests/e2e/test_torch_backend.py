"""cluster.backend torch end to end: real processes in a real gloo process group on loopback,
started by `smolcluster run`, by hand, and by torchrun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST, REPO, env, free_port, smolcluster

pytestmark = pytest.mark.timeout(300)
TORCH = ["--set", "cluster.backend=torch"]
# 2 workers x batch 16 over 3200 samples: 100 steps an epoch, 200 in all, a checkpoint at step 100.
SGD = [*FAST, "--set", "dataset.train_size=3200", "--set", "training.optimizer=sgd", "--set", "training.momentum=0.9",
       "--set", "training.learning_rate=0.05", "--set", "cluster.checkpoint_steps=100"]


def run(out: Path, *args: str, timeout: float = 240) -> dict:
    done = subprocess.run(smolcluster("run", *args, "--out", str(out)), env=env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((out / "summary.json").read_text())


def params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """The same parameters to float tolerance (gloo's allreduce may sum in another order)."""
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), \
            f"{what}: {key} differs by {(a[key] - b[key]).abs().max().item():.3g}"


def test_ps_and_torch_give_the_same_parameters_and_checkpoints_cross_both_ways(tmp_path):
    ps = run(tmp_path / "ps", *SGD)
    tc = run(tmp_path / "torch", *SGD, *TORCH)
    assert (ps["backend"], tc["backend"]) == ("ps", "torch")
    assert ps["steps"] == tc["steps"] == 200
    assert tc["replicas_verified"] == [1, 2]
    assert_close(params(tmp_path / "ps"), params(tmp_path / "torch"), "ps vs torch after 200 SGD steps")
    # Each run's checkpoint of step 100 resumes on the other backend and ends where its own run did.
    for src, dst_args, name in (("ps", TORCH, "ps-then-torch"), ("torch", [], "torch-then-ps")):
        out = tmp_path / name
        shutil.copytree(tmp_path / src / "checkpoints", out / "checkpoints")
        summary = run(out, *SGD, *dst_args, "--resume")
        assert summary["backend"] == ("torch" if dst_args else "ps")
        logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
        assert "at step 100/200" in logs, logs[-3000:]
        assert_close(params(tmp_path / src), params(out), f"{name} vs the uninterrupted {src} run")


def test_the_default_job_on_the_torch_backend(tmp_path):
    summary = run(tmp_path, "--set", "wandb.mode=disabled", *TORCH)
    assert summary["workers"] == 2 and summary["backend"] == "torch", summary
    assert summary["test_accuracy"] >= 97.0, summary["test_accuracy"]
    assert summary["replicas_verified"] == [1, 2]


def _by_hand(tmp_path: Path, extra: dict[int, list[str]], tokens: dict[int, str]) -> dict[int, subprocess.CompletedProcess]:
    port = free_port()
    procs = {}
    for k in (1, 2):
        argv = smolcluster("worker", "--id", str(k), *FAST, *TORCH, "--set", f"cluster.port={port}",
                           "--set", "cluster.join_timeout=20", "--out", str(tmp_path), *extra.get(k, []))
        procs[k] = subprocess.Popen(argv, env=env(SMOLCLUSTER_TOKEN=tokens[k]), cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    return {k: subprocess.CompletedProcess(p.args, p.wait(timeout=120), p.stdout.read()) for k, p in procs.items()}


@pytest.mark.parametrize("case", ["token", "job"])
def test_a_rank_of_another_cluster_is_refused_before_training(tmp_path, case):
    tokens = {1: "a" * 32, 2: "b" * 32 if case == "token" else "a" * 32}
    extra = {2: ["--set", "training.learning_rate=0.5"]} if case == "job" else {}
    done = _by_hand(tmp_path, extra, tokens)
    assert done[1].returncode != 0 and done[2].returncode != 0, done
    why = "cluster token" if case == "token" else "learning_rate"
    assert "refused worker 2 (rank 1)" in done[1].stdout and why in done[1].stdout, done[1].stdout[-2000:]
    assert "refused this rank" in done[2].stdout and why in done[2].stdout, done[2].stdout[-2000:]
    assert "ranks joined; training" not in done[1].stdout + done[2].stdout
    assert not (tmp_path / "summary.json").exists()


def test_a_reachable_address_needs_the_opt_in():
    argv = smolcluster("worker", "--id", "1", *FAST, *TORCH, "--set", "cluster.host_ip=192.0.2.7")
    done = subprocess.run(argv, env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cluster.torch_trust_network" in done.stderr and "192.0.2.7" in done.stderr, done.stderr[-2000:]


def test_torchrun_starts_the_ranks_and_int8_runs_as_a_ddp_hook(tmp_path):
    """torchrun's environment places the ranks; the job sends int8 with error feedback, through
    our DDP communication hook (its error bounds: tests/test_ddp_hooks.py)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "smolcluster", "worker", *FAST, "--set", "cluster.compression=int8", "--out", str(tmp_path)]
    done = subprocess.run(argv, env=env(OMP_NUM_THREADS="1"), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "started by torchrun" in done.stderr and "gradients exchanged as int8" in done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"] == "torch"
    assert summary["replicas_verified"] == [1, 2]  # every rank decodes the same bytes: bit-equal replicas
    assert summary["test_accuracy"] > 50  # it learned (synthetic data: 10 classes)
