"""A tiny separable image data set for end-to-end tests (no files needed)."""

from __future__ import annotations

import numpy as np


def separable_images(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of 1x6x6 uint8 images: bright left half (label 0) vs bright right half (1)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 1, 6, 6)).astype(np.uint8)
    images[labels == 0, :, :, :3] += 150
    images[labels == 1, :, :, 3:] += 150
    return images, labels
