"""The data sets certbnn knows, as data: adding one is a single ``register`` call.

A :class:`DatasetSpec` says what a data set looks like (image shape, classes,
expected split sizes), which folder names it may live in under a data root,
how to read one split from such a folder, and where its canonical files can
be downloaded (with checksums). Users add their own with :func:`register`,
or skip files entirely with :func:`register_arrays`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from certbnn.data import cifar
from certbnn.data.idx import read_idx
from certbnn.errors import DataError

Reader = Callable[[Path, str], tuple[np.ndarray, np.ndarray]]
"""(dataset folder, split name) -> (images (N, C, H, W) uint8, labels (N,) ints)."""


@dataclass(frozen=True)
class Resource:
    """One downloadable file: saved as ``filename`` in the data set's folder.

    ``urls`` are mirrors tried in order; ``md5``/``sha256`` verify the download.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a data set.

    ``folder_names``: folders under a data root that may hold it; a folder named
    ``<folder>-<variant>`` (e.g. ``cifar10-jpeg-q75``) is accepted too, so a
    re-encoded copy needs no code change. ``marker``: a function telling whether
    a folder actually holds the data (used to accept a data set's own folder as a
    root). ``splits``: expected number of examples per split (``None`` = unknown).
    ``image_shape``: one example's shape, (C, H, W) images or (D,) feature vectors.
    ``source``: the data set's own file (an ``.npz``, see :mod:`certbnn.data.npz`), found
    there rather than searched for under the data roots; ``sha256``: that file's digest.
    """

    name: str
    image_shape: tuple[int, ...]
    num_classes: int
    reader: Reader
    marker: Callable[[Path], bool]
    folder_names: tuple[str, ...] = ()
    splits: Mapping[str, int | None] = field(default_factory=lambda: {"train": None, "test": None})
    class_names: tuple[str, ...] = ()
    resources: tuple[Resource, ...] = ()
    description: str = ""
    in_memory: bool = False
    source: Path | None = None
    sha256: str | None = None

    def folders(self) -> tuple[str, ...]:
        return self.folder_names or (self.name,)


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, *, overwrite: bool = False) -> DatasetSpec:
    """Add ``spec`` to the registry (``overwrite`` to replace one of the same name)."""
    if spec.name in _REGISTRY and not overwrite:
        raise DataError(f"a data set named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_spec(name: str, data_dir: str | Path | None = None) -> DatasetSpec:
    """The registered spec called ``name``; else an npz data set: ``name`` a path ending in
    ``.npz``, or a folder ``<root>/<name>/data.npz`` under the data roots (``data_dir`` when
    given), registered on first use (:mod:`certbnn.data.npz`); a one-line error listing the
    known names otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    from certbnn.data.npz import resolve  # npz imports this module

    spec = resolve(name, data_dir)
    if spec is None:
        known = ", ".join(sorted(n for n, s in _REGISTRY.items() if s.source is None)) or "none"
        raise DataError(
            f"unknown data set {name!r} (known: {known}; or a PATH.npz file, or a folder "
            f"{name}/data.npz under a data root)"
        )
    return spec


def registered_spec(name: str) -> DatasetSpec | None:
    """The spec registered as ``name``, or None (nothing is looked for on disk)."""
    return _REGISTRY.get(name)


def known_datasets() -> list[str]:
    return sorted(_REGISTRY)


def register_arrays(
    name: str,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    class_names: tuple[str, ...] = (),
) -> DatasetSpec:
    """Register in-memory arrays ``{split: (inputs, labels (N,))}`` as a data set usable wherever a
    name is accepted; inputs are images (N, C, H, W) or feature vectors (N, D), uint8 or float32
    in [0, 1]."""
    if not splits:
        raise DataError(f"{name}: register_arrays needs at least one split")
    shapes = {tuple(np.shape(x)[1:]) for x, _ in splits.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) not in (1, 3):
        raise DataError(f"{name}: every split needs inputs of one shape, (N, C, H, W) or (N, D), got {shapes}")
    frozen = {split: (np.asarray(x), np.asarray(y)) for split, (x, y) in splits.items()}

    def reader(_folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        return frozen[split]

    return register(
        DatasetSpec(
            name=name,
            image_shape=shapes.pop(),
            num_classes=num_classes,
            reader=reader,
            marker=lambda _folder: True,
            splits={s: len(y) for s, (_, y) in frozen.items()},
            class_names=class_names,
            description="in-memory arrays",
            in_memory=True,
        ),
        overwrite=True,
    )


# --- the MNIST family (IDX files) ------------------------------------------------

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_path(folder: Path, stem: str) -> Path:
    """``stem.gz`` if present, else the raw ``stem`` (also reported when neither exists)."""
    gz = folder / f"{stem}.gz"
    return gz if gz.exists() else folder / stem


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of an MNIST-layout folder (gzip or raw IDX files)."""
    image_stem, label_stem = _IDX_FILES[split]
    image_path, label_path = _idx_path(folder, image_stem), _idx_path(folder, label_stem)
    for path in (image_path, label_path):
        if not path.exists():
            raise DataError(f"{path}(.gz): missing file of the {split} split")
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{label_path}: {labels.shape[0]} labels for {images.shape[0]} images in {image_path.name}")
    return images[:, None, :, :], labels.astype(np.int64)


def _has_idx(folder: Path) -> bool:
    return any(_idx_path(folder, stem).exists() for pair in _IDX_FILES.values() for stem in pair)


def _idx_resources(base_urls: tuple[str, ...], md5: dict[str, str]) -> tuple[Resource, ...]:
    return tuple(
        Resource(f"{stem}.gz", tuple(f"{base}/{stem}.gz" for base in base_urls), md5=md5[stem])
        for pair in _IDX_FILES.values()
        for stem in pair
    )


register(
    DatasetSpec(
        name="mnist",
        description="MNIST handwritten digits, 60,000 train / 10,000 test, 1x28x28",
        image_shape=(1, 28, 28),
        num_classes=10,
        reader=read_idx_split,
        marker=_has_idx,
        splits={"train": 60000, "test": 10000},
        class_names=tuple(str(i) for i in range(10)),
        resources=_idx_resources(
            ("https://ossci-datasets.s3.amazonaws.com/mnist", "http://yann.lecun.com/exdb/mnist"),
            {
                "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
            },
        ),
    )
)

register(
    DatasetSpec(
        name="fashion-mnist",
        description="Zalando Fashion-MNIST, 60,000 train / 10,000 test, 1x28x28",
        image_shape=(1, 28, 28),
        num_classes=10,
        reader=read_idx_split,
        marker=_has_idx,
        folder_names=("fashion-mnist", "fashion_mnist", "fashionmnist"),
        splits={"train": 60000, "test": 10000},
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        resources=_idx_resources(
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",),
            {
                "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
            },
        ),
    )
)

register(
    DatasetSpec(
        name="cifar10",
        description="CIFAR-10 natural images, 50,000 train / 10,000 test, 3x32x32",
        image_shape=(3, 32, 32),
        num_classes=10,
        reader=cifar.read_cifar10,
        marker=lambda folder: cifar.find_source(folder) is not None,
        folder_names=("cifar10", "cifar-10"),
        splits={"train": 50000, "test": 10000},
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        resources=(
            Resource(
                "cifar-10-binary.tar.gz",
                ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
                md5="c32a1d4ab5d03f1284b67883e8d87530",
            ),
        ),
    )
)
