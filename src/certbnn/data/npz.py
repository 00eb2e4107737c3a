"""Data sets in one ``.npz`` file: ``--dataset PATH.npz``, or a folder ``<root>/<name>/data.npz``.

File format (``numpy.savez`` / ``savez_compressed``; read with ``allow_pickle=False``, so a
file holding pickled Python objects is refused, never unpickled):

* ``x_train``, ``x_test``: inputs, ``(N, C, H, W)`` images or ``(N, D)`` feature vectors, the
  same per-example shape in both; ``uint8`` (value / 255 is the intensity) or float16/32/64
  in ``[0, 1]``, finite (floats are kept as float32);
* ``y_train``, ``y_test``: ``(N,)`` integer labels in ``0..K-1`` with ``K >= 2``, one per input;
* ``class_names`` (optional): ``(K,)`` strings; fixes ``K`` (else ``K`` = largest label + 1).

Any other key is refused (a typo never passes silently). Every problem is a one-line
:class:`~certbnn.errors.DataError`. A name that is not a registered data set is looked for
as ``<root>/<name>/data.npz`` under the data roots (:mod:`certbnn.data.roots`), so a data set
is "registered" by putting its folder under ``$CERTBNN_DATA`` (or the user cache).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from certbnn.data.registry import DatasetSpec, register
from certbnn.errors import DataError
from certbnn.safe_open import read_regular

SPLIT_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
OPTIONAL_KEYS = ("class_names",)
FOLDER_FILE = "data.npz"
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_FLOATS = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class NpzData:
    """The checked contents of one file: ``splits[split] = (x, y)`` with x uint8 or float32
    of shape (N, *input_shape) and y int64 (N,)."""

    path: Path
    sha256: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]


def is_npz_name(name: str) -> bool:
    """True when a data set name is a path to an ``.npz`` file (it ends with ``.npz``)."""
    return str(name).lower().endswith(".npz")


_CACHE: OrderedDict[tuple, NpzData] = OrderedDict()  # (real path, size, mtime_ns) -> contents; 2 kept


def read_npz(path: str | os.PathLike) -> NpzData:
    """Read and check ``path`` (see the module doc); the two most recent files stay cached
    by (path, size, modification time), so repeated loads of an unchanged file are free."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
        key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    raw = read_regular(path, "npz data set")  # regular files only: a FIFO never blocks
    loaded = _parse(path, raw)
    if key is not None:
        _CACHE[key] = loaded
        while len(_CACHE) > 2:
            _CACHE.popitem(last=False)
    return loaded


def _parse(path: Path, raw: bytes) -> NpzData:
    where = f"{path}:"
    if not raw.startswith(b"PK"):
        raise DataError(f"{where} not an .npz archive (numpy.savez writes a zip file; this one has no zip header)")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            names = list(archive.files)
            required = [k for pair in SPLIT_KEYS.values() for k in pair]
            missing = [k for k in required if k not in names]
            unknown = sorted(set(names) - set(required) - set(OPTIONAL_KEYS))
            if missing:
                raise DataError(f"{where} missing array(s) {', '.join(missing)} (has: {', '.join(names) or 'none'})")
            if unknown:
                raise DataError(
                    f"{where} unknown array(s) {', '.join(unknown)} (expected x_train, y_train, x_test, "
                    "y_test and optionally class_names)"
                )
            arrays = {k: archive[k] for k in names}
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle, which is refused
        text = str(exc)
        reason = "holds pickled Python objects (object arrays), which are refused" if "pickle" in text else text
        raise DataError(f"{where} {_one_line(reason)}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{where} not a readable .npz archive ({_one_line(str(exc)) or type(exc).__name__})") from None
    splits = {
        split: (_inputs(where, xk, arrays[xk]), _labels(where, yk, arrays[yk]))
        for split, (xk, yk) in SPLIT_KEYS.items()
    }
    for split, (xk, yk) in SPLIT_KEYS.items():
        x, y = splits[split]
        if len(x) != len(y):
            raise DataError(f"{where} {xk} has {len(x)} examples but {yk} has {len(y)} labels")
        if len(x) == 0:
            raise DataError(f"{where} {xk} is empty (0 examples)")
    input_shape = tuple(int(d) for d in splits["train"][0].shape[1:])
    if tuple(splits["test"][0].shape[1:]) != input_shape:
        raise DataError(
            f"{where} x_train examples have shape {input_shape} but x_test examples "
            f"{tuple(splits['test'][0].shape[1:])}"
        )
    top = max(int(y.max()) for _, y in splits.values())
    class_names: tuple[str, ...] = ()
    if "class_names" in arrays:
        names_array = arrays["class_names"]
        if names_array.ndim != 1 or names_array.dtype.kind not in "US":
            raise DataError(
                f"{where} class_names must be a 1-d array of strings, got dtype {names_array.dtype} "
                f"shape {names_array.shape}"
            )
        class_names = tuple(str(n) for n in names_array.tolist())
        if top >= len(class_names):
            raise DataError(f"{where} labels go up to {top} but class_names names only {len(class_names)} classes")
    num_classes = len(class_names) if class_names else top + 1
    if num_classes < 2:
        raise DataError(f"{where} needs at least 2 classes, labels are all 0")
    return NpzData(path, hashlib.sha256(raw).hexdigest(), splits, input_shape, num_classes, class_names)


def _inputs(where: str, key: str, x: np.ndarray) -> np.ndarray:
    if x.ndim not in (2, 4):
        raise DataError(f"{where} {key} must have shape (N, C, H, W) or (N, D), got {x.shape}")
    if any(d == 0 for d in x.shape[1:]):
        raise DataError(f"{where} {key} has an empty example shape {x.shape[1:]}")
    if x.dtype == np.uint8:
        return x
    if x.dtype.type not in _FLOATS:
        raise DataError(f"{where} {key} must be uint8 or float in [0, 1], got dtype {x.dtype}")
    if x.size and not np.isfinite(x).all():
        raise DataError(f"{where} {key} contains NaN or infinite values")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(
            f"{where} {key} must lie in [0, 1] (scale images to [0, 1] or store them as uint8), "
            f"found {float(x.min()):g}..{float(x.max()):g}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)  # [0, 1] rounds into [0, 1]


def _labels(where: str, key: str, y: np.ndarray) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{where} {key} must have shape (N,), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{where} {key} must hold integer labels, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DataError(f"{where} {key} has negative labels (min {int(y.min())}); labels are 0..K-1")
    return y.astype(np.int64, copy=False)


def npz_spec(name: str, path: str | os.PathLike) -> DatasetSpec:
    """A :class:`DatasetSpec` called ``name`` reading the checked file ``path`` (its ``source``
    and ``sha256`` recorded)."""
    contents = read_npz(path)
    source = contents.path.resolve()

    def reader(_folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        current = read_npz(source)  # cached; re-read (and re-checked) if the file changed
        if current.sha256 != contents.sha256:
            raise DataError(
                f"{source} changed since it was checked (sha256 {current.sha256[:12]}..., "
                f"was {contents.sha256[:12]}...)"
            )
        return current.splits[split]

    counts = {split: len(y) for split, (_, y) in contents.splits.items()}
    return DatasetSpec(
        name=name,
        image_shape=contents.input_shape,
        num_classes=contents.num_classes,
        reader=reader,
        marker=lambda folder: (Path(folder) / source.name).is_file(),
        splits=counts,
        class_names=contents.class_names,
        source=source,
        sha256=contents.sha256,
        description=f"npz file {source}, {counts['train']:,} train / {counts['test']:,} test, "
        + "x".join(map(str, contents.input_shape)),
    )


def find_folder(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """``<root>/<name>/data.npz`` under the first data root holding it (an explicit
    ``data_dir`` may also be that folder itself), or None."""
    from certbnn.data.roots import search_roots

    if not _FOLDER_NAME.fullmatch(name):
        return None
    for root in search_roots(data_dir):
        for candidate in (
            root.path / name / FOLDER_FILE,
            *((root.path / FOLDER_FILE,) if root.origin == "explicit" and root.path.name == name else ()),
        ):
            if candidate.is_file():
                return candidate
    return None


def resolve(
    name: str, data_dir: str | os.PathLike | None = None, file: str | os.PathLike | None = None
) -> DatasetSpec | None:
    """Register (replacing an older one) and return the npz data set ``name``: the file
    ``file`` when it exists, else ``name`` itself when it is a ``.npz`` path, else a folder
    ``<root>/<name>/data.npz`` under the data roots; None when none of these exists and
    ``name`` is not an ``.npz`` path (a DataError when it is)."""
    if file is not None and Path(file).is_file():
        path = Path(file)
    elif is_npz_name(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(f"npz data set {name} not found" + (f" (nor the recorded {file})" if file else ""))
    else:
        path = find_folder(name, data_dir)
        if path is None:
            return None
    return register(npz_spec(name, path), overwrite=True)


def discover(data_dir: str | os.PathLike | None = None) -> list[tuple[str, Path, str]]:
    """``(name, data.npz path, root origin)`` of every folder ``<root>/<name>/data.npz``
    under the data roots (first root wins for a name), for ``certbnn data list``."""
    from certbnn.data.roots import search_roots

    found: dict[str, tuple[str, Path, str]] = {}
    for root in search_roots(data_dir):
        if not root.path.is_dir():
            continue
        try:
            entries = sorted(root.path.iterdir())
        except OSError:
            continue
        for folder in entries:
            if folder.name not in found and _FOLDER_NAME.fullmatch(folder.name) and (folder / FOLDER_FILE).is_file():
                found[folder.name] = (folder.name, folder / FOLDER_FILE, root.origin)
    return list(found.values())


def _one_line(text: str) -> str:
    return " ".join(text.split())
