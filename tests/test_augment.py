"""augment(): the same (seed, worker, epoch, step) gives the same bits; anything else differs."""

from __future__ import annotations

import pytest
import torch

from smolcluster import data
from smolcluster.augment import augment, augment_batch
from smolcluster.config import DatasetConfig


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return data.load_data(DatasetConfig(train_size=16, test_size=1), 0).train.x


def test_augment_is_bit_identical_for_the_same_draw_and_differs_otherwise(images):
    a = augment(images, 42, 1, 0, 7)
    assert a.shape == images.shape and a.dtype == images.dtype
    assert torch.equal(a, augment(images, 42, 1, 0, 7))
    for other in ((43, 1, 0, 7), (42, 2, 0, 7), (42, 1, 1, 7), (42, 1, 0, 8)):
        assert not torch.equal(a, augment(images, *other)), other
    assert not torch.equal(a, images)


def test_each_sample_gets_its_own_transform_and_the_global_generator_is_untouched(images):
    twice = torch.cat([images[:1], images[:1]])
    state = torch.random.get_rng_state()
    out = augment(twice, 0, 1, 0, 0)
    assert torch.equal(state, torch.random.get_rng_state())
    assert not torch.equal(out[0], out[1])


def test_nothing_moves_with_zero_ranges_and_augment_off_is_the_batch_itself(images):
    assert torch.allclose(augment(images, 0, 1, 0, 0, degrees=0, translate=0, scale=0), images, atol=1e-5)
    assert augment_batch(images, DatasetConfig(), 0, 1, 0, 0) is images
    on = augment_batch(images, DatasetConfig(augment=True, augment_degrees=30), 0, 1, 0, 0)
    assert torch.equal(on, augment(images, 0, 1, 0, 0, degrees=30, translate=0.1, scale=0.1))
