"""Training-set augmentation: append randomly transformed copies (the paper's CIFAR-10 recipe).

The authors appended 40,000 copies of CIFAR-10 training images transformed by
Keras' ``ImageDataGenerator`` (small rotations, zoom, shifts, horizontal
flips). :func:`augment` does the same with one random affine map per copy,
applied with bilinear interpolation and edge-replicating borders (Keras'
``fill_mode="nearest"``). The result is a function of ``seed`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from certbnn.data.dataset import ArrayDataset
from certbnn.errors import ConfigError


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random transforms (each drawn uniformly, independently per copy).

    ``rotation``: degrees, in [-rotation, rotation]; ``zoom``: scale in
    [1 - zoom, 1 + zoom]; ``shift``: translation as a fraction of the image
    side, in [-shift, shift] per axis; ``hflip``: probability of a left-right flip.
    """

    rotation: float = 10.0
    zoom: float = 0.1
    shift: float = 0.1
    hflip: float = 0.5

    def validate(self) -> AugmentSpec:
        if not (0 <= self.rotation <= 180 and 0 <= self.zoom < 1 and 0 <= self.shift <= 1 and 0 <= self.hflip <= 1):
            raise ConfigError(f"augmentation ranges out of bounds: {self}")
        return self


def augment(
    dataset: ArrayDataset, copies: int, *, seed: int = 0, spec: AugmentSpec = AugmentSpec(), chunk: int = 2048
) -> ArrayDataset:
    """``dataset`` followed by ``copies`` transformed images (sources drawn with replacement).

    Labels are copied from the sources. uint8 images stay uint8 (rounded); the
    output keeps ``dataset``'s name, split and class names.
    """
    if copies < 0:
        raise ConfigError(f"augmentation copies must be >= 0, got {copies}")
    if copies == 0:
        return dataset
    if len(dataset) == 0:
        raise ConfigError("cannot augment an empty data set")
    if dataset.images.ndim != 4:
        raise ConfigError(
            f"augmentation transforms images (N, C, H, W); {dataset.name} holds feature vectors {dataset.image_shape}"
        )
    spec.validate()
    rng = np.random.default_rng(seed)
    sources = rng.integers(0, len(dataset), size=copies)
    generator = torch.Generator().manual_seed(seed)
    out = np.empty((copies, *dataset.image_shape), dtype=dataset.images.dtype)
    for start in range(0, copies, chunk):
        idx = sources[start : start + chunk]
        images = torch.from_numpy(np.ascontiguousarray(dataset.images[idx])).float()
        moved = _random_affine(images, spec, generator)
        if dataset.images.dtype == np.uint8:
            out[start : start + len(idx)] = moved.round().clamp(0, 255).to(torch.uint8).numpy()
        else:
            out[start : start + len(idx)] = moved.clamp(0, 1).numpy()
    return ArrayDataset(
        np.concatenate([dataset.images, out]),
        np.concatenate([dataset.labels, dataset.labels[sources]]),
        dataset.num_classes,
        dataset.name,
        dataset.split,
        dataset.class_names,
    )


def _random_affine(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """One random rotation / zoom / shift / flip per image of the (n, C, H, W) batch."""
    n = images.shape[0]

    def uniform(half_width: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * half_width

    angle = uniform(math.radians(spec.rotation))
    scale = 1.0 + uniform(spec.zoom)  # > 1 zooms out: the grid samples a larger area
    flip = torch.where(torch.rand(n, generator=generator) < spec.hflip, -1.0, 1.0)
    tx, ty = uniform(2 * spec.shift), uniform(2 * spec.shift)  # normalised coordinates span 2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], -1), torch.stack([sin * flip, cos, ty], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
