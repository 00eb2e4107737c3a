"""Hostile input files for the bad-input tests: each writer builds one crafted file
(or data folder) under a given directory and returns its path."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def idx_bytes(dims: tuple[int, ...], body: bytes = b"") -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + body


def _mnist(folder: Path, images: bytes, labels: bytes, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, blob in ((IMAGES, images), (LABELS, labels), (TEST_IMAGES, images), (TEST_LABELS, labels)):
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / stem).write_bytes(blob)
    return folder


def idx_overflow(folder: Path, gz: bool = False) -> Path:
    """MNIST folder whose image header announces (2^32-1)^3 bytes over a 10-byte body."""
    big = 2**32 - 1
    return _mnist(folder, idx_bytes((big, big, big), b"\0" * 10), idx_bytes((1,), b"\0"), gz)


def idx_huge_count(folder: Path, gz: bool = False) -> Path:
    """MNIST folder announcing 2^31 images of 28x28 (60 TB) in a few bytes."""
    return _mnist(folder, idx_bytes((2**31, 28, 28), b"\0" * 784), idx_bytes((2**31,), b"\0"), gz)


def empty_split(folder: Path) -> Path:
    """MNIST folder whose splits hold 0 images and 0 labels (valid headers)."""
    return _mnist(folder, idx_bytes((0, 28, 28)), idx_bytes((0,)), gz=True)


class _BigArray:
    """Pickles as numpy's reconstruct of a 2^50-element uint8 array holding 1 byte."""

    def __reduce__(self):
        return (
            np.ndarray.__reduce__(np.zeros(1, np.uint8))[0],
            (np.ndarray, (0,), b"b"),
            (1, (2**50,), np.dtype("u1"), False, b"\0"),
        )


class _BigEmpty:
    """Pickles as numpy's reconstruct called with a 2^50-element shape."""

    def __reduce__(self):
        return (np.ndarray.__reduce__(np.zeros(1, np.uint8))[0], (np.ndarray, (2**50,), b"b"), None)


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def cifar_python(folder: Path, batch: object) -> Path:
    """cifar10 folder in the python layout whose every batch is ``pickle.dumps(batch)``."""
    layout = folder / "cifar-10-batches-py"
    layout.mkdir(parents=True, exist_ok=True)
    blob = pickle.dumps(batch, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (layout / name).write_bytes(blob)
    return folder


def cifar_big_array(folder: Path) -> Path:
    return cifar_python(folder, {b"data": _BigArray(), b"labels": [0]})


def cifar_big_shape(folder: Path) -> Path:
    return cifar_python(folder, {b"data": _BigEmpty(), b"labels": [0]})


def cifar_evil_global(folder: Path) -> Path:
    return cifar_python(folder, {b"data": _Evil(), b"labels": [0]})


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def mnist_fifo(folder: Path) -> Path:
    """MNIST folder whose image files (both splits) are FIFOs (nobody ever writes to them)."""
    _mnist(folder, idx_bytes((1, 28, 28), b"\0" * 784), idx_bytes((1,), b"\0"), gz=False)
    for stem in (IMAGES, TEST_IMAGES):
        (folder / stem).unlink()
        fifo(folder / stem)
    return folder


def cifar_fifo_batch(folder: Path) -> Path:
    """cifar10 folder (binary layout) whose first training batch and test batch are FIFOs."""
    layout = folder / "cifar-10-batches-bin"
    layout.mkdir(parents=True, exist_ok=True)
    fifo(layout / "data_batch_1.bin")
    fifo(layout / "test_batch.bin")
    return folder


def cifar_fifo_archive(folder: Path) -> Path:
    """cifar10 folder holding only a FIFO named like the official archive."""
    fifo(folder / "cifar-10-binary.tar.gz")
    return folder


def posterior_with_metadata(path: Path, text: str) -> Path:
    """A safetensors file with one tensor and ``text`` as its certbnn metadata."""
    path.write_bytes(st_save({"mean/w": torch.zeros(2), "std/w": torch.ones(2)}, metadata={"certbnn": text}))
    return path


def posterior_deep(path: Path, depth: int = 200_000) -> Path:
    """Posterior file whose metadata is ``depth`` nested JSON arrays."""
    return posterior_with_metadata(path, "[" * depth + "]" * depth)


def posterior_deep_object(path: Path, depth: int = 200_000) -> Path:
    """Posterior file whose metadata is a JSON object nesting ``depth`` objects (brackets in strings too)."""
    return posterior_with_metadata(path, '{"a]}": ' * depth + "1" + "}" * depth)
