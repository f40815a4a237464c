"""devices.py: what training.device resolves to, refusals naming the key, and the copy path a GPU
takes (tested on the CPU with SMOLCLUSTER_COPY_PATH=1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smolcluster import devices
from smolcluster.config import load_config
from smolcluster.errors import ConfigError
from smolcluster.flat import FlatModel

ACCELERATED = torch.cuda.is_available() or devices._mps_available()


@pytest.mark.skipif(ACCELERATED, reason="this machine has a GPU")
def test_auto_is_the_cpu_on_a_machine_without_a_gpu():
    assert devices.resolve("auto") == torch.device("cpu")
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.describe(torch.device("cpu")).startswith("cpu (")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3", "mps"])
def test_a_missing_gpu_is_a_config_error_naming_training_device(spec):
    if (spec.startswith("cuda") and torch.cuda.is_available()) or (spec == "mps" and devices._mps_available()):
        pytest.skip("this machine has it")
    with pytest.raises(ConfigError, match=rf"^training\.device: {spec} asked for"):
        devices.resolve(spec)


@pytest.mark.parametrize("value", ["gpu", "cuda:", "CUDA", "cuda:x", "mps:0", ""])
def test_malformed_device_values_are_refused_at_load_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"training\.device: expected (auto, cpu, cuda, cuda:N or mps|a string)"):
        load_config(overrides=[f"training.device={value}"])


def test_the_device_is_not_part_of_the_fingerprint():
    a = load_config(overrides=["training.device=cpu"]).fingerprint()
    assert a == load_config(overrides=["training.device=cuda:1"]).fingerprint()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def test_the_copy_path_keeps_the_model_apart_and_copies_at_the_edges(monkeypatch):
    monkeypatch.setenv(devices.COPY_PATH_ENV, "1")
    flat = FlatModel(_net())
    assert flat.copies and flat.dev_params.data_ptr() != flat.params.data_ptr()
    assert torch.equal(flat.params, flat.dev_params)  # the wire's copy starts equal
    x = torch.randn(8, 6)
    flat.zero_grad()
    flat.model(x).sum().backward()  # forward moved BatchNorm's statistics, backward filled the gradient
    assert not torch.equal(flat.buffers, flat.dev_buffers) and flat.grads.abs().sum() == 0
    flat.stage(0, flat.numel + flat.nbuf + 1)  # a bucket over everything, loss slot included
    assert torch.equal(flat.grads, flat.dev_grads) and torch.equal(flat.buffers, flat.dev_buffers)
    flat.wire[: flat.numel + flat.nbuf].mul_(0.5)  # "the averages landed"
    flat.land()
    assert torch.equal(flat.dev_wire, flat.wire[: flat.numel + flat.nbuf])
    flat.dev_params.add_(1.0)
    crc = flat.checksum()  # pulls first
    assert torch.equal(flat.params, flat.dev_params)
    flat.params.zero_()
    flat.push()
    assert flat.dev_params.abs().sum() == 0 and flat.checksum() != crc


def test_without_the_switch_the_cpu_path_is_zero_copy(monkeypatch):
    monkeypatch.delenv(devices.COPY_PATH_ENV, raising=False)
    flat = FlatModel(_net())
    assert not flat.copies and flat.dev_params is flat.params
    p = next(flat.model.parameters())
    assert p.data_ptr() == flat.params.data_ptr()


class _LacksAnOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("The operator 'aten::_fft_r2c' is not currently implemented for the MPS device.")


def test_a_missing_operation_is_detected_and_any_other_error_propagates():
    sample = (torch.randn(2, 6), torch.tensor([0, 1]))
    loss = nn.functional.cross_entropy
    assert "aten::_fft_r2c" in devices.lacks_op(_LacksAnOp(), sample, loss, torch.device("cpu"))
    assert devices.lacks_op(nn.Linear(6, 3), sample, loss, torch.device("cpu")) == ""
    with pytest.raises(RuntimeError):  # a shape error is the model's, not the device's
        devices.lacks_op(nn.Linear(5, 3), sample, loss, torch.device("cpu"))


def test_batches_keep_their_dtype_on_the_cpu():
    x = torch.zeros(2, dtype=torch.float64)
    assert devices.batch_to(x, torch.device("cpu")) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_wire_memory_is_pinned_and_round_trips():
    raw, floats = devices.host_buffer(4 * 1000, torch.device("cuda"))
    assert floats.is_pinned() and len(raw) == 4000
    src = torch.arange(1000, dtype=torch.float32, device="cuda")
    devices.to_host(floats, src)
    assert torch.equal(floats, src.cpu())
    back = torch.empty_like(src)
    devices.to_device(back, floats)
    torch.cuda.synchronize()
    assert torch.equal(back, src)
