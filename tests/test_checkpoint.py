"""Optimizer state and checkpoints: exact round trips, atomic files, clear errors."""

from __future__ import annotations

import pytest
import torch

from smolcluster.checkpoint import (CheckpointError, decode_state, encode_state, load_checkpoint,
                                    save_checkpoint)
from smolcluster.config import ModelConfig, TrainingConfig
from smolcluster.flat import FlatModel
from smolcluster.models import build_model
from smolcluster.train import build_optimizer


def trained(opt: str, seed: int = 0, steps: int = 3):
    cfg = TrainingConfig(optimizer=opt, momentum=0.9 if opt == "sgd" else 0.0)
    model = build_model(ModelConfig(hidden=16), seed)
    flat = FlatModel(model)
    optimizer = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        flat.grads.copy_(torch.randn(flat.numel, generator=g))
        optimizer.step()
    return flat, optimizer, cfg


def same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    return sa.keys() == sb.keys() and all(
        torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i]
    )


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_optimizer_state_round_trips_exactly_and_training_continues_identically(opt):
    flat_a, opt_a, cfg = trained(opt)
    flat_b, opt_b, _ = trained(opt, seed=1, steps=0)
    decode_state(opt_b, encode_state(opt_a), "test")
    flat_b.params.copy_(flat_a.params)
    assert same_state(opt_a, opt_b)
    grad = torch.randn(flat_a.numel)
    for flat, o in ((flat_a, opt_a), (flat_b, opt_b)):
        flat.grads.copy_(grad)
        o.step()
    assert torch.equal(flat_a.params, flat_b.params)


def test_empty_state_round_trips():
    flat, opt, _ = trained("adam", steps=0)
    decode_state(opt, encode_state(opt), "test")
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize("blob", [b"", b"\x80\x04pickle", b"\xff" * 64, (10**9).to_bytes(8, "little") + b"{}"])
def test_garbage_state_is_a_checkpoint_error(blob):
    _, opt, _ = trained("adam", steps=0)
    with pytest.raises(CheckpointError, match="peer X"):
        decode_state(opt, blob, "peer X")


def test_checkpoint_restores_params_and_state_and_keeps_the_newest(tmp_path):
    flat, opt, _ = trained("adam")
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, flat, opt, step, {"epoch": step / 10}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000020", "checkpoint-00000030"]
    assert not list(tmp_path.glob(".*tmp"))
    flat2, opt2, _ = trained("adam", seed=1, steps=0)
    ckpt = load_checkpoint(tmp_path, flat2, opt2)
    assert ckpt.step == 30 and ckpt.info["epoch"] == 3.0
    assert torch.equal(flat.params, flat2.params) and same_state(opt, opt2)


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    flat, opt, _ = trained("adam")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, flat, opt)
    save_checkpoint(tmp_path, flat, opt, 5, {})
    other = FlatModel(build_model(ModelConfig(hidden=8), 0))
    with pytest.raises(CheckpointError, match="parameters"):
        load_checkpoint(tmp_path, other, opt)
