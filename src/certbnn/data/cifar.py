"""Readers for CIFAR-10 in its two official layouts.

* binary (``cifar-10-batches-bin/``): ``data_batch_1.bin`` .. ``data_batch_5.bin``
  and ``test_batch.bin``; each record is one label byte then 3072 pixel bytes
  (the R, G and B planes of a 32x32 image); ``batches.meta.txt`` lists class names.
* python (``cifar-10-batches-py/``): ``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``, pickled dicts with ``b"data"`` (N, 3072) uint8 and ``b"labels"``;
  read with :mod:`certbnn.data.safe_pickle`, never plain pickle.

Either layout may sit unpacked in a directory or inside the official
``.tar.gz`` archive, which is then read member by member without extracting.
"""

from __future__ import annotations

import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from certbnn.data.safe_pickle import safe_loads
from certbnn.errors import DataError
from certbnn.fileio import atomic_write_bytes
from certbnn.safe_open import open_regular, read_regular

IMAGE_BYTES = 3 * 32 * 32
#: Largest batch file or archive member read; an official batch is 30 MB.
MAX_BATCH_BYTES = 1 << 30
SPLIT_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
LAYOUTS = {"bin": ("cifar-10-batches-bin", ".bin"), "py": ("cifar-10-batches-py", "")}


def parse_binary_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Split a binary batch into images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    record = IMAGE_BYTES + 1
    if len(data) == 0 or len(data) % record:
        raise DataError(
            f"{source}: size {len(data)} bytes is not a positive multiple of the "
            f"{record}-byte CIFAR-10 record (truncated or not a CIFAR-10 batch)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = records[:, 0].astype(np.int64)
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def parse_python_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle (restricted) a python batch into images (N, 3, 32, 32) and labels (N,)."""
    try:
        batch = safe_loads(data)
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        MemoryError,
        RecursionError,
    ) as exc:
        raise DataError(f"{source}: not a valid CIFAR-10 python batch ({exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{source}: pickled object is not a dict with b'data' and b'labels'")
    images, labels = batch[b"data"], batch[b"labels"]
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 2
        or images.shape[1] != IMAGE_BYTES
    ):
        raise DataError(f"{source}: b'data' must be a uint8 array of shape (N, {IMAGE_BYTES})")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != (images.shape[0],):
        raise DataError(f"{source}: b'labels' must hold {images.shape[0]} integers")
    return images.reshape(-1, 3, 32, 32).copy(), labels.astype(np.int64)


def find_source(folder: Path) -> Path | None:
    """Locate CIFAR-10 in ``folder``: an unpacked layout directory
    (``cifar-10-batches-bin/`` or ``cifar-10-batches-py/``), else the first archive
    (``*.tar.gz``, ``*.tgz``, ``*.tar``) in name order. Returns None if neither exists."""
    for dirname, _ in LAYOUTS.values():
        if (folder / dirname).is_dir():
            return folder / dirname
    archives = sorted(p for pattern in ("*.tar.gz", "*.tgz", "*.tar") for p in folder.glob(pattern))
    return archives[0] if archives else None


def _read_archive(archive: Path, split: str) -> tuple[str, dict[str, bytes]]:
    """Stream through ``archive`` once; return its layout and the split's member bytes."""
    wanted = {
        (dirname, batch + suffix) for layout, (dirname, suffix) in LAYOUTS.items() for batch in SPLIT_BATCHES[split]
    }
    found: dict[str, dict[str, bytes]] = {layout: {} for layout in LAYOUTS}
    layout_of = {dirname: layout for layout, (dirname, _) in LAYOUTS.items()}
    try:
        with open_regular(archive, "CIFAR-10 archive") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if member.isfile() and (path.parent.name, path.name) in wanted:
                    if member.size > MAX_BATCH_BYTES:
                        raise DataError(
                            f"{archive}: member {member.name} announces {member.size} "
                            f"bytes, more than the {MAX_BATCH_BYTES} a CIFAR-10 batch may hold"
                        )
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    found[layout_of[path.parent.name]][path.name] = extracted.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: corrupt or truncated archive ({exc})") from None
    layout = max(found, key=lambda k: len(found[k]))
    return layout, found[layout]


def read_cifar10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split (``train`` or ``test``) of CIFAR-10 stored in ``folder``."""
    source = find_source(folder)
    if source is None:
        raise DataError(
            f"{folder}: no CIFAR-10 found (expected cifar-10-batches-bin/, "
            "cifar-10-batches-py/ or the official .tar.gz archive)"
        )
    path = source
    if path.is_dir():
        layout = next(k for k, (dirname, _) in LAYOUTS.items() if dirname == path.name)
        dirname, suffix = LAYOUTS[layout]
        names = [b + suffix for b in SPLIT_BATCHES[split]]
        blobs = {}
        for name in names:
            if not (path / name).exists():
                raise DataError(f"{path / name}: missing batch of the {split} split")
            blobs[name] = read_regular(path / name, "CIFAR-10 batch", max_bytes=MAX_BATCH_BYTES)
        where = {name: str(path / name) for name in names}
    else:
        layout, blobs = _read_archive(path, split)
        dirname, suffix = LAYOUTS[layout]
        names = [b + suffix for b in SPLIT_BATCHES[split]]
        missing = [n for n in names if n not in blobs]
        if missing:
            raise DataError(f"{path}: archive lacks {dirname}/{missing[0]} (needed for the {split} split)")
        where = {name: f"{path}:{dirname}/{name}" for name in names}
    parse: Callable[[bytes, str], tuple[np.ndarray, np.ndarray]] = (
        parse_binary_batch if layout == "bin" else parse_python_batch
    )
    parts = [parse(blobs[name], where[name]) for name in names]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return images, labels


def write_binary_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images (N, 3, 32, 32) uint8 and labels (N,) in the official binary layout."""
    records = np.concatenate(
        [np.asarray(labels, np.uint8)[:, None], np.asarray(images, np.uint8).reshape(len(labels), -1)],
        axis=1,
    )
    atomic_write_bytes(path, records.tobytes(), "CIFAR batch")
