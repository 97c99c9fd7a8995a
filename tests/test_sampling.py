"""A structure under 0.5 % of the volume is reached by the patch sampler at the configured rate."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import load_config
from common.sampling import PatchSampler, as_volume, extract

SHAPE = (64, 64, 64)


def tiny_lesion_volume():
    image = np.random.default_rng(0).normal(size=(1, *SHAPE)).astype(np.float32)
    label = np.zeros((1, *SHAPE), dtype=np.uint8)
    label[0, 50:53, 7:10, 40:43] = 1  # 27 voxels: 0.01 % of the volume, off-centre
    return as_volume((image, label), 2)


@pytest.mark.parametrize("fraction", [0.33, 0.5])
def test_foreground_rate_holds_for_a_tiny_structure(fraction):
    volume = tiny_lesion_volume()
    assert volume.label.mean() < 0.005
    cfg = load_config(None, ["data.patch_size=[16, 16, 16]", f"data.foreground_fraction={fraction}"])
    sampler = PatchSampler(cfg.data, batch_size=2, seed=1, augment="none")
    n = 300
    hits = sum(bool(sampler.patch(volume)[1].any()) for _ in range(n))
    assert sampler.forced == int(n * fraction)
    chance = 0.05  # a random 16^3 patch rarely meets a 3^3 lesion in 64^3
    assert fraction <= hits / n <= fraction + chance


def test_without_oversampling_the_structure_is_rarely_seen():
    volume = tiny_lesion_volume()
    cfg = load_config(None, ["data.patch_size=[16, 16, 16]", "data.foreground_fraction=0"])
    sampler = PatchSampler(cfg.data, batch_size=2, seed=1, augment="none")
    hits = sum(bool(sampler.patch(volume)[1].any()) for _ in range(300))
    assert hits / 300 < 0.1


def test_patches_reaching_past_the_volume_are_zero_padded():
    array = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4) + 1
    patch = extract(array, (-2, 1, 2), (6, 3, 4))
    assert patch.shape == (2, 6, 3, 4)
    assert np.all(patch[:, :2] == 0) and np.all(patch[:, :, :, 2:] == 0)
    assert np.array_equal(patch[:, 2:, :, :2], array[:, :4, 1:4, 2:4])


def test_augmented_patches_keep_their_shape_and_labels():
    volume = tiny_lesion_volume()
    cfg = load_config(None, ["data.patch_size=[16, 16, 16]", "data.foreground_fraction=1"])
    sampler = PatchSampler(cfg.data, batch_size=2, seed=3)
    for _ in range(10):
        image, label = sampler.patch(volume)
        assert image.shape == (1, 16, 16, 16) and label.shape == (1, 16, 16, 16)
        assert set(np.unique(label)) <= {0, 1}


def test_class_locations_cover_every_annotator_and_cap_the_sample():
    from common.preprocess import LOCATIONS_PER_CLASS, class_locations

    label = np.zeros((2, 30, 30, 30), dtype=np.uint8)
    label[0, 2:4, 2:4, 2:4] = 1  # class 1 by the first annotator only
    label[1, 20:22, 5, 5] = 1  # ... and a different place by the second
    label[1, :, :, 10:25] = 2  # class 2: 13,500 voxels, more than are kept
    found = class_locations(label, 3, np.random.default_rng(0))
    expected_1 = np.argwhere(np.any(label == 1, axis=0))
    assert np.array_equal(found[1], expected_1) and found[1].dtype == np.int32
    assert len(found[2]) == LOCATIONS_PER_CLASS
    assert np.all(label[1][tuple(found[2].T)] == 2) and len(np.unique(found[2], axis=0)) == LOCATIONS_PER_CLASS
    assert set(found) == {1, 2}
