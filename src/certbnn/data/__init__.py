"""Data sets: official on-disk formats in, uint8 arrays in memory, float batches out.

Main entry points::

    from certbnn import data
    train = data.load("mnist", "train")          # ArrayDataset, located automatically
    for x, y in train.batches(128, shuffle=True, seed=0):
        ...                                       # x: (128, 1, 28, 28) float32 in [0, 1]

Known names: ``mnist``, ``fashion-mnist``, ``cifar10``; add more with
:func:`register` (a :class:`DatasetSpec`) or :func:`register_arrays`, or use an
``.npz`` file: a path ``PATH.npz`` or a folder ``<root>/<name>/data.npz``
(:mod:`certbnn.data.npz`).
See :mod:`certbnn.data.roots` for where data is looked for.
"""

from __future__ import annotations

import os

from certbnn.data.dataset import ArrayDataset
from certbnn.data.registry import (
    DatasetSpec,
    Resource,
    get_spec,
    known_datasets,
    register,
    register_arrays,
    registered_spec,
    unregister,
)
from certbnn.data.roots import ENV_VAR, cache_root, find_dataset, locate, search_roots
from certbnn.errors import DataError

__all__ = [
    "ArrayDataset",
    "DatasetSpec",
    "Resource",
    "DataError",
    "ENV_VAR",
    "cache_root",
    "find_dataset",
    "get_spec",
    "known_datasets",
    "load",
    "locate",
    "register",
    "register_arrays",
    "registered_spec",
    "search_roots",
    "unregister",
]


def load(name: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> ArrayDataset:
    """Load one split of a registered data set, validated (magic numbers, shapes,
    counts, label range; an empty split is refused). Raises :class:`DataError` with a one-line message."""
    spec = get_spec(name, data_dir)
    if split not in spec.splits:
        raise DataError(f"{name} has no split {split!r} (splits: {', '.join(spec.splits)})")
    folder = locate(spec, data_dir)
    images, labels = spec.reader(folder, split)
    if tuple(images.shape[1:]) != spec.image_shape:
        raise DataError(
            f"{folder}: {name}/{split} images have shape {tuple(images.shape[1:])}, expected {spec.image_shape}"
        )
    if len(images) == 0:
        raise DataError(f"{folder}: {name}/{split} is empty (0 examples)")
    return ArrayDataset(images, labels, spec.num_classes, name, split, spec.class_names)
