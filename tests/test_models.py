"""The model registry and the flat parameter/gradient buffers."""

from __future__ import annotations

import pytest
import torch

from smolcluster.config import ModelConfig
from smolcluster.flat import FlatModel
from smolcluster.models import MODELS, PRESETS, build_model


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_maps_mnist_images_to_ten_logits(name):
    model = build_model(ModelConfig(type=name, **PRESETS[name]), seed=0)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_takes_any_list_of_hidden_sizes():
    model = build_model(ModelConfig(type="MLP", hidden=[512, 256, 128]), seed=0)
    assert sum(p.numel() for p in model.parameters()) == 567434


def test_same_seed_same_weights():
    a, b = build_model(ModelConfig(), 5), build_model(ModelConfig(), 5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_flat_buffers_hold_params_and_grads_through_training():
    model = build_model(ModelConfig(type="CNN", hidden=32, channels=[4]), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = FlatModel(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        flat.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        assert flat.grads_are_views()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.equal(flat.grads, expected)
        opt.step()
    assert torch.equal(flat.params, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    crc = flat.checksum()
    flat.params[0] += 1
    assert flat.checksum() != crc


def test_loss_rides_in_the_slot_after_the_gradient():
    flat = FlatModel(build_model(ModelConfig(), 0))
    flat.loss = 2.5
    assert flat.loss == 2.5 and len(flat.grad_bytes) == 4 * (flat.numel + flat.nbuf + 1)
    flat.zero_grad()
    assert flat.loss == 2.5
