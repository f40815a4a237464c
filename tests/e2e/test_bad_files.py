"""Damaged files given to the real command: checkpoints for `server --resume`, models for `eval`.

Each case runs the `smolcluster` process a user would run and asserts on what they would see:
the exit code, one error line naming the file and what is wrong (never a traceback), and, where
the run goes on, numbers (the resumed run's parameters against an uninterrupted one).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import FAST, REPO, Cluster, assert_same_params, env, free_port, smolcluster

pytestmark = pytest.mark.timeout(90)

# 512 samples, batch 16, 2 workers: 16 steps per epoch; stop at 12, checkpoints after 4 and 8.
JOB = ["--set", "training.max_steps=12", "--set", "cluster.checkpoint_steps=4"]


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(smolcluster(*args), capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The ERROR log lines, after checking nothing else went wrong in a noisier way."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    return [line for line in result.stderr.splitlines() if "| ERROR" in line]


# --- server --resume ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Cluster:
    """A real run of 12 steps: its checkpoints (steps 4 and 8) and its final parameters."""
    run = Cluster(tmp_path_factory.mktemp("run"), workers=2, args=JOB).start()
    codes = run.wait(60)
    assert set(codes.values()) == {0}, run.logs()
    assert sorted(p.name for p in (run.out / "checkpoints").iterdir()) == [
        "checkpoint-00000004", "checkpoint-00000008", "latest"]
    return run


def copy_checkpoints(run: Cluster, tmp: Path) -> Path:
    root = tmp / "out" / "checkpoints"
    shutil.copytree(run.out / "checkpoints", root)
    return root


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # in the last tensor's bytes: safetensors alone would load it
    path.write_bytes(bytes(data))


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_and_ends_like_an_uninterrupted_run(finished_run, tmp_path):
    root = copy_checkpoints(finished_run, tmp_path)
    flip_bit(root / "checkpoint-00000008" / "state.safetensors")
    (root / ".checkpoint-00000012.tmp").mkdir()  # what a server killed while writing leaves
    (root / ".latest.x7k2p9").write_text("checkpoint-0000")
    resumed = Cluster(tmp_path, workers=2, args=JOB)
    resumed.start_server("--resume")
    for k in (1, 2):
        resumed.start_worker(k)
    codes = resumed.wait(60)
    log = resumed.procs["server"].output
    assert set(codes.values()) == {0}, resumed.logs()
    assert (f"checkpoint {root / 'checkpoint-00000008'} is not usable: state.safetensors: content hash mismatch"
            in log), log[-3000:]
    assert "removed 2 stale temporary file(s) of an interrupted checkpoint: .checkpoint-00000012.tmp, .latest.x7k2p9" in log
    assert f"resuming from {root} at step 4/12" in log
    assert resumed.summary()["steps"] == 12
    assert_same_params(finished_run.server_params(), resumed.server_params(), "resumed from step 4 vs uninterrupted")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:64])


DAMAGE = {
    # name: (what is done to the checkpoints folder, the error line's text)
    "bits flipped in both": (lambda root: [flip_bit(root / f"checkpoint-0000000{s}" / "state.safetensors") for s in (4, 8)],
                             "checkpoint-00000008: state.safetensors: content hash mismatch"),
    "checkpoint.json not JSON in both": (
        lambda root: [(root / f"checkpoint-0000000{s}" / "checkpoint.json").write_text("{\"step\": 4,") for s in (4, 8)],
        "checkpoint-00000004: checkpoint.json: not valid JSON"),
    "truncated, and no checkpoint.json": (
        lambda root: (truncate(root / "checkpoint-00000008" / "state.safetensors"),
                      (root / "checkpoint-00000004" / "checkpoint.json").unlink()),
        "checkpoint-00000004: checkpoint.json: cannot read it (No such file or directory)"),
    "no checkpoint at all": (lambda root: shutil.rmtree(root), "no checkpoint to resume from in"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_no_usable_checkpoint_is_exit_1_with_one_error_line(finished_run, tmp_path, name):
    damage, text = DAMAGE[name]
    root = copy_checkpoints(finished_run, tmp_path)
    damage(root)
    t0 = time.monotonic()
    result = cli("server", "--resume", *FAST, *JOB, "--set", f"cluster.port={free_port()}",
                 "--set", f"training.out_dir={tmp_path / 'out'}")
    assert result.returncode == 1, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1 and text in errors[0] and len(errors[0]) < 1200, errors
    assert time.monotonic() - t0 < 30


# --- eval MODEL -----------------------------------------------------------------------------------


def model_file(tmp_path: Path, tensors=None, **meta: str) -> Path:
    """A model file as the server writes it (SimpleNN, hidden 16, synthetic data), then changed."""
    from smolcluster.config import ModelConfig
    from smolcluster.models import build_model

    cfg = {"type": "SimpleNN", "input_dim": 784, "hidden": 16, "out": 10, "channels": [16, 32]}
    state = {k: v.contiguous() for k, v in build_model(ModelConfig(hidden=16), 0).state_dict().items()}
    base = {"smolcluster.model": json.dumps(cfg), "smolcluster.seed": "42",
            "smolcluster.dataset": json.dumps({"name": "synthetic", "root": None, "train_size": 512, "test_size": 256})}
    path = tmp_path / "model.safetensors"
    save_file(tensors(state) if tensors else state, str(path), metadata={**base, **meta})
    return path


def model_meta(**changes) -> str:
    return json.dumps({"type": "SimpleNN", "input_dim": 784, "hidden": 16, "out": 10, **changes})


EVAL_CASES = {
    # name: (tensors changed, metadata changed, the error's text after the path)
    "hidden in metadata != tensors": (None, {"smolcluster.model": model_meta(hidden=64)},
                                      "tensor 1.weight is [16, 784] in the file, but its metadata says SimpleNN "
                                      "input_dim=784 hidden=64 out=10, which makes it [64, 784]"),
    "absurd hidden": (None, {"smolcluster.model": model_meta(hidden=10**12)},
                      "tensor 1.weight is [16, 784] in the file, but its metadata says SimpleNN input_dim=784 "
                      "hidden=1000000000000 out=10, which makes it [1000000000000, 784]"),
    "missing tensor": (lambda t: {k: v for k, v in t.items() if k != "3.bias"}, {},
                       "tensor 3.bias is missing (its metadata says SimpleNN input_dim=784 hidden=16 out=10, "
                       "which has 4 tensors: 1.weight, 1.bias, 3.weight, 3.bias)"),
    "extra tensor": (lambda t: {**t, "5.weight": torch.zeros(2)}, {}, "tensor 5.weight is not part of the model"),
    "integer tensor": (lambda t: {**t, "3.bias": torch.zeros(10, dtype=torch.int64)}, {},
                       "tensor 3.bias is torch.int64, expected floating point"),
    "model metadata not JSON": (None, {"smolcluster.model": "{type: SimpleNN"},
                                "metadata smolcluster.model is not usable (Expecting property name"),
    "model metadata a list": (None, {"smolcluster.model": "[1, 2]"},
                              "metadata smolcluster.model is not usable (model: expected a mapping, got [1, 2] (list))"),
    "model metadata NaN size": (None, {"smolcluster.model": model_meta(hidden=float("nan"))},
                                "metadata smolcluster.model is not usable (model.hidden: expected an integer, got nan (float)"),
    "dataset metadata not JSON": (None, {"smolcluster.dataset": "{"},
                                  "metadata smolcluster.dataset is not usable (Expecting property name"),
    "dataset metadata unknown key": (None, {"smolcluster.dataset": '{"name": "synthetic", "size": 3}'},
                                     "metadata smolcluster.dataset is not usable (dataset.size: unknown key"),
    "seed not an integer": (None, {"smolcluster.seed": "4.2e1"},
                            "metadata smolcluster.seed: expected an integer, got '4.2e1'"),
    "input_dim that fits its tensors, not the data": (
        lambda t: {**t, "1.weight": torch.zeros(16, 100)}, {"smolcluster.model": model_meta(input_dim=100)},
        "the model takes 100 inputs (SimpleNN input_dim=100 hidden=16 out=10), the test data has 784 per sample"),
    "fewer outputs than classes": (
        lambda t: {**t, "3.weight": torch.zeros(5, 16), "3.bias": torch.zeros(5)}, {"smolcluster.model": model_meta(out=5)},
        "the model has 5 outputs (SimpleNN input_dim=784 hidden=16 out=5), the test data has 10 classes"),
}


IN_A_PROCESS = ("model metadata not JSON", "fewer outputs than classes")
"""Cases run as a real `smolcluster eval` process; the rest call the same `main` in this one (each
process would spend seconds importing torch to read one file)."""


def in_process(*args: str, capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """`smolcluster ARGS` through cli.main here: its exit code and what it printed."""
    from smolcluster.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["smolcluster", *args], code, out.out, out.err)


@pytest.mark.parametrize("name", list(EVAL_CASES))
def test_a_model_file_that_disagrees_with_itself_is_exit_1_naming_the_difference(tmp_path, name, capsys):
    tensors, meta, text = EVAL_CASES[name]
    path = model_file(tmp_path, tensors, **meta)
    result = cli("eval", str(path), timeout=30) if name in IN_A_PROCESS else in_process("eval", str(path), capsys=capsys)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1 and f"{path}: {text}" in errors[0], errors
    assert result.stdout == ""


def test_the_unchanged_model_file_evaluates(tmp_path):
    """The control for the cases above: the same file, unchanged, is a working model."""
    result = cli("eval", str(model_file(tmp_path)), timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("test accuracy: ") and "256 samples" in result.stdout
