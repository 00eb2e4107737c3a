"""Writers of small data sets in the official formats, for the loader tests."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from certbnn.data import cifar
from certbnn.data.idx import write_idx

IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def fake_images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_mnist_dir(folder: Path, counts=None, gz: bool = True) -> dict:
    """Write an MNIST-layout folder; returns {split: (images (N,28,28), labels)}."""
    counts = counts or {"train": 30, "test": 20}
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    written = {}
    for i, (split, n) in enumerate(counts.items()):
        images, labels = fake_images(n, (28, 28), seed=i)
        image_stem, label_stem = IDX_STEMS[split]
        write_idx(folder / f"{image_stem}{suffix}", images)
        write_idx(folder / f"{label_stem}{suffix}", labels)
        written[split] = (images, labels)
    return written


def _python_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    return pickle.dumps(
        {b"batch_label": b"x", b"labels": labels.tolist(), b"data": images.reshape(len(labels), -1)}, protocol=2
    )


def write_cifar(folder: Path, layout: str = "bin", archive: bool = False, per_batch: int = 10) -> dict:
    """Write CIFAR-10 in the binary or python layout, unpacked or as a .tar.gz;
    returns {split: (images (N,3,32,32), labels)}."""
    dirname, suffix = cifar.LAYOUTS[layout]
    members: dict[str, bytes] = {}
    written = {}
    for s, (split, batches) in enumerate(cifar.SPLIT_BATCHES.items()):
        parts = []
        for b, batch in enumerate(batches):
            images, labels = fake_images(per_batch, (3, 32, 32), seed=100 * s + b)
            parts.append((images, labels))
            if layout == "bin":
                buf = np.concatenate([labels[:, None], images.reshape(per_batch, -1)], axis=1).tobytes()
            else:
                buf = _python_batch(images, labels)
            members[batch + suffix] = buf
        written[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    folder.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(folder / f"cifar-10-{'binary' if layout == 'bin' else 'python'}.tar.gz", "w:gz") as tar:
            for name, blob in members.items():
                info = tarfile.TarInfo(f"{dirname}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (folder / dirname).mkdir()
        for name, blob in members.items():
            (folder / dirname / name).write_bytes(blob)
    return written
