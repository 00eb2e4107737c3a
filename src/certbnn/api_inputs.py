"""The data the Python API (:mod:`certbnn.api`) accepts, checked and converted: one-line
ConfigErrors naming the argument (wrong shapes, NaN or infinite values, pixels outside [0, 1],
labels that are not integers or out of range for the model)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from certbnn import data
from certbnn.errors import ConfigError


def arrays(source: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` numpy arrays of a data argument, checked (one-line errors naming ``what``)."""
    if isinstance(source, data.ArrayDataset):
        return source.images, source.labels
    if isinstance(source, (tuple, list)) and len(source) == 2 and not _is_batch_list(source):
        x, y = source
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes, Mapping, np.ndarray, Tensor)):
        x, y = _concatenated(source, what)
    else:
        raise ConfigError(
            f"{what} must be (x, y) arrays, an ArrayDataset or an iterable of (x, y) batches, "
            f"got {type(source).__name__}"
        )
    return _images(x, f"{what} x"), _labels(y, f"{what} y", len(as_numpy(x, f"{what} x")))


def _is_batch_list(source: Any) -> bool:
    """A list of two (x, y) batches rather than one (x, y) pair."""
    return all(isinstance(item, (tuple, list)) and len(item) == 2 for item in source)


def _concatenated(batches: Iterable, what: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise ConfigError(f"{what}: batch {i} is not an (x, y) pair (got {type(batch).__name__})")
        xs.append(as_numpy(batch[0], f"{what} batch {i} x"))
        ys.append(as_numpy(batch[1], f"{what} batch {i} y"))
    if not xs:
        raise ConfigError(f"{what} holds no batches")
    if len({x.shape[1:] for x in xs}) != 1:
        raise ConfigError(f"{what}: batches have images of different shapes {sorted({x.shape[1:] for x in xs})}")
    return np.concatenate(xs), np.concatenate(ys)


def as_numpy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} is not an array ({err})") from None


def _images(value: Any, what: str) -> np.ndarray:
    """Images (N, C, H, W) or feature vectors (N, D): uint8, or float32 finite in [0, 1]."""
    x = as_numpy(value, what)
    if x.ndim not in (2, 4) or x.shape[0] == 0:
        raise ConfigError(f"{what} must have shape (N, C, H, W) or (N, D) with N >= 1, got {x.shape}")
    return x if x.dtype == np.uint8 else _pixels(x, what)


def _pixels(x: np.ndarray, what: str) -> np.ndarray:
    """Float pixels checked finite and in [0, 1], as float32."""
    if x.dtype.kind != "f":
        raise ConfigError(f"{what} must be floats in [0, 1] or uint8 pixels, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ConfigError(f"{what} contains NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise ConfigError(
            f"{what} must lie in [0, 1] (eps-balls are clipped to the pixel range; normalise inside "
            f"the model), found {float(x.min()):.4g}..{float(x.max()):.4g}"
        )
    return x.astype(np.float32, copy=False)


def _labels(value: Any, what: str, n: int) -> np.ndarray:
    y = as_numpy(value, what)
    if y.shape != (n,):
        raise ConfigError(f"{what} must have shape ({n},) (one label per image), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise ConfigError(f"{what} must be integer class labels, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            f"{what} holds labels {int(y.min())}..{int(y.max())}, but the model has {num_classes} "
            f"outputs (labels must lie in [0, {num_classes}))"
        )


def points(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Test points as tensors: ``x`` (N, ...) float32 in [0, 1] (uint8 pixels / 255), ``y`` (N,) int64."""
    xs = as_numpy(x, "x")
    if xs.ndim < 2 or xs.shape[0] == 0:
        raise ConfigError(f"x must have shape (N, ...) with N >= 1, got {xs.shape}")
    xs = xs.astype(np.float32) / 255 if xs.dtype == np.uint8 else _pixels(xs, "x")
    return torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(_labels(y, "y", len(xs)))


def dataset_name(splits: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """A name fixed by the data's content: a resumed fit finds its run's data set under the same name,
    and resuming with other data is refused as a changed configuration."""
    digest = hashlib.sha256()
    for split, (x, y) in sorted(splits.items()):
        for array in (x, y):
            digest.update(f"{split}{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return f"arrays-{digest.hexdigest()[:16]}"
