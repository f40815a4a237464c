"""Optimizer state and checkpoints: exact round trips, atomic files, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smolcluster.checkpoint import (INFO_KEY, CheckpointError, decode_state, encode_state, load_checkpoint,
                                    remove_stale, save_checkpoint)
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


# --- damaged checkpoints: verified, skipped, named ------------------------------------------------

@pytest.fixture
def warnings():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    yield lines
    logger.remove(sink)


def two_checkpoints(root: Path):
    """Checkpoints at steps 10 and 20 of one run; returns the run and its parameters at step 10."""
    flat, opt, _ = trained("adam")
    save_checkpoint(root, flat, opt, 10, {"epoch": 1.0})
    at10 = flat.params.clone()
    flat.grads.copy_(torch.ones(flat.numel))
    opt.step()
    save_checkpoint(root, flat, opt, 20, {"epoch": 2.0})
    return flat, opt, at10


def fresh():
    return trained("adam", seed=1, steps=0)[:2]


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_latest_falls_back_to_the_previous_checkpoint(tmp_path, warnings):
    _, _, at10 = two_checkpoints(tmp_path)
    state = tmp_path / "checkpoint-00000020" / "state.safetensors"
    flip_bit(state, state.stat().st_size - 5)  # inside a tensor: safetensors alone would load it
    flat, opt = fresh()
    ckpt = load_checkpoint(tmp_path, flat, opt)
    assert ckpt.step == 10 and ckpt.info == {"step": 10, "epoch": 1.0}
    assert torch.equal(flat.params, at10)
    assert any(f"checkpoint {tmp_path / 'checkpoint-00000020'} is not usable: state.safetensors: content hash "
               "mismatch" in w and w.endswith("trying the previous one") for w in warnings), warnings
    assert any("resuming from the older checkpoint" in w and "(step 10)" in w for w in warnings), warnings


def test_when_no_checkpoint_is_usable_the_error_names_each_and_why(tmp_path):
    two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-00000020" / "checkpoint.json").write_text("{not json")
    state = tmp_path / "checkpoint-00000010" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    flat, opt = fresh()
    before = flat.params.clone()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, flat, opt)
    message = str(info.value)
    assert message.startswith(f"no usable checkpoint in {tmp_path}: checkpoint-00000020: checkpoint.json: not valid JSON")
    assert "checkpoint-00000010: state.safetensors: 100 bytes, checkpoint.json says" in message
    assert "\n" not in message and len(message) < 1000
    assert torch.equal(flat.params, before) and opt.state_dict()["state"] == {}, "nothing may be half-loaded"


def rewrite(folder: Path, tensors=None, meta=None, record=None) -> None:
    """Change a checkpoint as a buggy writer would, with a matching hash: only the checks see it."""
    from smolcluster.checkpoint import _digest

    state = folder / "state.safetensors"
    old_tensors = load_file(str(state))
    with safe_open(str(state), framework="pt") as f:
        old_meta = f.metadata()
    save_file(tensors(old_tensors) if tensors else old_tensors, str(state), metadata=meta(old_meta) if meta else old_meta)
    digest, size = _digest(state)
    old_record = json.loads((folder / "checkpoint.json").read_text())
    new_record = record(old_record) if record else old_record
    (folder / "checkpoint.json").write_text(json.dumps({**new_record, "state_sha256": digest, "state_bytes": size}))


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


DAMAGE = {
    # name: (how, the reason in the error)
    "no params": (dict(tensors=lambda t: without(t, "params")), "state.safetensors: no 'params' tensor"),
    "short params": (dict(tensors=lambda t: {**t, "params": t["params"][:-1].clone()}),
                     r"params is torch.float32 \[\d+\]; the model has \d+ float32 parameters"),
    "NaN params": (dict(tensors=lambda t: {**t, "params": torch.full_like(t["params"], float("nan"))}),
                   "params hold NaN or infinity"),
    "wrong-shape state": (dict(tensors=lambda t: {**t, "opt.0.exp_avg": torch.zeros(3, 3)}),
                          r"optimizer tensor opt.0.exp_avg has shape \[3, 3\], parameter 0 has \[16, 784\]"),
    "state of no parameter": (dict(tensors=lambda t: {**t, "opt.99.exp_avg": torch.zeros(1)}),
                              r"optimizer tensor opt.99.exp_avg: expected '<parameter 0..3>.<name>'"),
    "groups not JSON": (dict(meta=lambda m: {**m, "optimizer.groups": "[{"}), "metadata optimizer.groups: not valid JSON"),
    "groups missing": (dict(meta=lambda m: without(m, "optimizer.groups")), "metadata optimizer.groups: missing"),
    "two groups": (dict(meta=lambda m: {**m, "optimizer.groups": json.dumps(json.loads(m["optimizer.groups"]) * 2)}),
                   "metadata optimizer.groups: 2 parameter groups, the optimizer has 1"),
    "lr a string": (dict(meta=lambda m: {**m, "optimizer.groups": m["optimizer.groups"].replace('"lr": 0.003', '"lr": "x"')}),
                    r"optimizer.groups\[0\].lr: 'x' does not fit this optimizer"),
    "scalars a list": (dict(meta=lambda m: {**m, "optimizer.scalars": "[]"}),
                       "metadata optimizer.scalars: expected a JSON dict, got list"),
    "step not an integer": (dict(meta=lambda m: {**m, INFO_KEY: json.dumps({"step": 2.5})}, record=lambda r: {**r, "step": 2.5}),
                            r"step: expected an integer >= 0, got '2.5'"),
    "steps disagree": (dict(record=lambda r: {**r, "step": 99}), "checkpoint.json says step 99, state.safetensors says 20"),
    "info not JSON": (dict(meta=lambda m: {**m, INFO_KEY: "{"}), "metadata smolcluster.checkpoint: not valid JSON"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_metadata_with_a_valid_hash_is_a_clear_error_and_loads_nothing(tmp_path, name):
    how, reason = DAMAGE[name]
    flat, opt, _ = trained("adam")
    save_checkpoint(tmp_path, flat, opt, 20, {})
    rewrite(tmp_path / "checkpoint-00000020", **how)
    flat2, opt2 = fresh()
    before = flat2.params.clone()
    with pytest.raises(CheckpointError, match=rf"^no usable checkpoint in .*: checkpoint-00000020: .*{reason}") as info:
        load_checkpoint(tmp_path, flat2, opt2)
    assert "\n" not in str(info.value)
    assert torch.equal(flat2.params, before) and opt2.state_dict()["state"] == {}


@pytest.mark.parametrize(
    "latest, warning",
    [
        (None, "no 'latest' file; trying the checkpoint folders, newest first"),
        ("../../etc/passwd", "'latest' names '../../etc/passwd', not a checkpoint folder"),
        ("checkpoint-00000099", None),  # names a folder that is gone: skipped like a damaged one
    ],
)
def test_a_bad_latest_pointer_falls_back_to_the_newest_folder(tmp_path, warnings, latest, warning):
    two_checkpoints(tmp_path)
    if latest is None:
        (tmp_path / "latest").unlink()
    else:
        (tmp_path / "latest").write_text(latest)
    ckpt = load_checkpoint(tmp_path, *fresh())
    assert ckpt.step == 20
    expected = warning or f"checkpoint {tmp_path / latest} is not usable: the folder is missing"
    assert any(expected in w for w in warnings), warnings


def test_stale_temp_files_of_a_killed_writer_are_removed_on_save_and_on_load(tmp_path, warnings):
    flat, opt, _ = trained("adam")
    save_checkpoint(tmp_path, flat, opt, 10, {})

    def litter() -> None:
        (tmp_path / ".checkpoint-00000020.tmp").mkdir()
        (tmp_path / ".checkpoint-00000020.tmp" / "state.safetensors").write_bytes(b"half")
        (tmp_path / ".latest.k2j3h4").write_text("checkpoint-000")

    litter()
    save_checkpoint(tmp_path, flat, opt, 20, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000010", "checkpoint-00000020", "latest"]
    assert any("removed 2 stale temporary file(s) of an interrupted checkpoint: .checkpoint-00000020.tmp, "
               ".latest.k2j3h4" in w for w in warnings), warnings
    litter()
    assert load_checkpoint(tmp_path, *fresh()).step == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000010", "checkpoint-00000020", "latest"]
    assert remove_stale(tmp_path / "nonexistent") == []


def test_the_record_holds_the_hash_and_size_of_the_state_file(tmp_path):
    import hashlib

    flat, opt, _ = trained("sgd")
    folder = save_checkpoint(tmp_path, flat, opt, 7, {"epoch": 0.5})
    record = json.loads((folder / "checkpoint.json").read_text())
    data = (folder / "state.safetensors").read_bytes()
    assert record == {"step": 7, "epoch": 0.5, "state_sha256": hashlib.sha256(data).hexdigest(),
                      "state_bytes": len(data)}


def test_a_checkpoint_without_a_hash_still_loads_with_a_warning(tmp_path, warnings):
    """Written by the version before hashes: the same files, without the hash and the info key."""
    flat, opt, _ = trained("adam")
    folder = save_checkpoint(tmp_path, flat, opt, 5, {"epoch": 0.25})
    rewrite(folder, meta=lambda m: without(m, INFO_KEY))
    record = json.loads((folder / "checkpoint.json").read_text())
    (folder / "checkpoint.json").write_text(json.dumps(without(without(record, "state_sha256"), "state_bytes")))
    flat2, opt2 = fresh()
    assert load_checkpoint(tmp_path, flat2, opt2).info == {"step": 5, "epoch": 0.25}
    assert torch.equal(flat.params, flat2.params) and same_state(opt, opt2)
    assert any("no content hash in checkpoint.json" in w for w in warnings)


def test_a_wrong_shape_state_from_a_peer_is_refused_before_loading():
    from safetensors.torch import save

    from smolcluster.checkpoint import optimizer_tensors

    flat, opt, _ = trained("adam")
    tensors, meta = optimizer_tensors(opt)
    tensors["opt.1.exp_avg"] = torch.zeros(7)
    target = trained("adam", seed=1, steps=0)[1]
    with pytest.raises(CheckpointError, match=r"server: optimizer state is not usable .*opt.1.exp_avg has shape \[7\]"):
        decode_state(target, save(tensors, metadata=meta), "server")
    assert target.state_dict()["state"] == {}


def test_steps_past_eight_digits_keep_their_order(tmp_path):
    flat, opt, _ = trained("adam")
    for step in (99_999_999, 100_000_000, 100_000_001):
        save_checkpoint(tmp_path, flat, opt, step, {})
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-100000000", "checkpoint-100000001"]
    (tmp_path / "latest").unlink()  # the folders alone, newest first
    assert load_checkpoint(tmp_path, *fresh()).step == 100_000_001


def test_another_optimizers_state_is_named_as_such(tmp_path):
    flat, opt, _ = trained("sgd")
    save_checkpoint(tmp_path, flat, opt, 3, {})
    with pytest.raises(CheckpointError, match=r"optimizer.groups\[0\]: has dampening, .*which Adam does not: another optimizer's state"):
        load_checkpoint(tmp_path, *fresh())
