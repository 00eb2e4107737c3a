"""CIFAR-style augmentation: deterministic, label-preserving, exact for the identity and the flip."""

from __future__ import annotations

import numpy as np
import pytest

from certbnn.data import ArrayDataset
from certbnn.data.augment import AugmentSpec, augment
from certbnn.errors import ConfigError


def _dataset(n=12, shape=(3, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % 10, 10, "toy")


def test_copies_are_appended_with_their_sources_labels_and_are_seeded():
    ds = _dataset()
    out = augment(ds, 30, seed=1)
    assert len(out) == 42 and out.images.dtype == np.uint8 and out.image_shape == ds.image_shape
    np.testing.assert_array_equal(out.images[:12], ds.images)
    np.testing.assert_array_equal(out.labels[:12], ds.labels)
    again = augment(ds, 30, seed=1)
    np.testing.assert_array_equal(out.images, again.images)
    assert not np.array_equal(out.images, augment(ds, 30, seed=2).images)
    assert not np.array_equal(out.images[12:], ds.images[out.labels[12:] % 12])  # transformed, not copied


def test_zero_ranges_copy_sources_exactly_and_a_certain_flip_mirrors_them():
    ds = _dataset()
    still = augment(ds, 20, seed=3, spec=AugmentSpec(rotation=0, zoom=0, shift=0, hflip=0))
    flipped = augment(ds, 20, seed=3, spec=AugmentSpec(rotation=0, zoom=0, shift=0, hflip=1))
    # each copy equals some source image (labels say which class; find it by content)
    for copy, mirror, label in zip(still.images[12:], flipped.images[12:], still.labels[12:]):
        candidates = [i for i in range(12) if ds.labels[i] == label]
        assert any(np.array_equal(copy, ds.images[i]) for i in candidates)
        source = next(i for i in candidates if np.array_equal(copy, ds.images[i]))
        np.testing.assert_array_equal(mirror, ds.images[source][:, :, ::-1])


def test_float_images_stay_in_range_and_bad_arguments_fail():
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.random((5, 1, 6, 6), dtype=np.float32), np.arange(5) % 2, 2)
    out = augment(ds, 7)
    assert out.images.dtype == np.float32 and 0 <= out.images.min() and out.images.max() <= 1
    assert augment(ds, 0) is ds
    with pytest.raises(ConfigError, match=">= 0"):
        augment(ds, -1)
    with pytest.raises(ConfigError, match="out of bounds"):
        augment(ds, 3, spec=AugmentSpec(zoom=1.5))
