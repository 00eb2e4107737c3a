"""In-memory image classification data: uint8 storage, float batches on demand."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from certbnn.errors import DataError


@dataclass(frozen=True)
class ArrayDataset:
    """Images and labels of one split, validated on construction.

    ``images``: (N, C, H, W) (or (N, D) feature vectors), either uint8 (pixel value / 255
    is the intensity) or float32 already in [0, 1]. ``labels``: (N,) integers in [0, num_classes).
    Storage stays uint8 (MNIST train is 47 MB, CIFAR-10 train 150 MB); float
    tensors in [0, 1] are made per batch by :meth:`batches`.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str = "arrays"
    split: str = "train"
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        where = f"{self.name}/{self.split}"
        images, labels = self.images, np.asarray(self.labels)
        if not isinstance(images, np.ndarray) or images.ndim not in (2, 4):
            shape = getattr(images, "shape", None)
            raise DataError(f"{where}: images must be an array of shape (N, C, H, W) or (N, D), got {shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{where}: {images.shape[0]} images but labels of shape {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
        if images.dtype == np.float32:
            if not np.isfinite(images).all():
                raise DataError(f"{where}: images contain NaN or infinite values")
            if images.size and (images.min() < 0.0 or images.max() > 1.0):
                raise DataError(f"{where}: float images must lie in [0, 1]")
        elif images.dtype != np.uint8:
            raise DataError(f"{where}: images must be uint8 or float32, got {images.dtype}")
        if self.num_classes < 1:
            raise DataError(f"{where}: num_classes must be positive, got {self.num_classes}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(
                f"{where}: labels must lie in [0, {self.num_classes}), found {labels.min()}..{labels.max()}"
            )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise DataError(f"{where}: {len(self.class_names)} class names for {self.num_classes} classes")
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image ((D,) for feature vectors)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> list[int]:
        """Number of examples of each class, indexed by label."""
        return np.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: np.ndarray | slice) -> ArrayDataset:
        """A view (slice) or copy (index array) holding the selected examples."""
        return ArrayDataset(
            self.images[indices],
            self.labels[indices],
            self.num_classes,
            self.name,
            self.split,
            self.class_names,
        )

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        flatten: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: x float in [0, 1] of shape (B, C, H, W), or (B, C*H*W)
        with ``flatten``; y int64 (B,). ``shuffle`` draws one permutation from
        ``numpy.random.default_rng(seed)``, so equal seeds give equal orders;
        ``drop_last`` skips a final incomplete batch."""
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else None
        for start in range(0, self.num_batches(batch_size, drop_last) * batch_size, batch_size):
            stop = min(start + batch_size, n)
            index = order[start:stop] if order is not None else slice(start, stop)
            yield (
                self._to_tensor(self.images[index], flatten, device, dtype),
                torch.from_numpy(self.labels[index]).to(device),
            )

    def tensors(self, *, flatten: bool = False, device=None, dtype=torch.float32):
        """All examples as one ``(x, y)`` pair (allocates N x C x H x W floats)."""
        return self._to_tensor(self.images, flatten, device, dtype), torch.from_numpy(self.labels).to(device)

    @staticmethod
    def _to_tensor(images: np.ndarray, flatten: bool, device, dtype) -> torch.Tensor:
        if not (images.flags.writeable and images.flags.c_contiguous):
            images = np.array(images)  # torch.from_numpy needs writable, contiguous memory
        x = torch.from_numpy(images).to(device)
        x = x.to(dtype) / 255.0 if images.dtype == np.uint8 else x.to(dtype)
        return x.reshape(x.shape[0], -1) if flatten else x
