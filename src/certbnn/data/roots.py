"""Where data sets are looked for, in order.

1. an explicit directory (``--data-dir`` / ``data_dir=``): authoritative, no fallback;
2. the ``CERTBNN_DATA`` environment variable (one or more roots joined by ``os.pathsep``);
3. the user cache, ``$XDG_CACHE_HOME/certbnn/data`` (default ``~/.cache/certbnn/data``),
   where ``certbnn data download`` puts files;
4. system locations: ``/usr/share/datasets`` (Debian's ``dataset-*`` packages, e.g.
   ``dataset-fashion-mnist``) and ``/usr/local/share/datasets``.

Under a root, a data set lives in a folder named after it (``mnist/``,
``fashion-mnist/``, ``cifar10/``) or ``<name>-<variant>/`` (``cifar10-jpeg-q75/``).
An explicit directory may also be the data set's folder itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from certbnn.data.registry import DatasetSpec
from certbnn.errors import DataError

ENV_VAR = "CERTBNN_DATA"
SYSTEM_ROOTS = (Path("/usr/share/datasets"), Path("/usr/local/share/datasets"))


def cache_root() -> Path:
    """The user cache data root (created on demand by downloads, not here)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "certbnn" / "data"


@dataclass(frozen=True)
class Root:
    path: Path
    origin: str  # "explicit", "CERTBNN_DATA", "cache" or "system"


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Root]:
    """The roots searched, in order (only the explicit one when ``data_dir`` is given)."""
    if data_dir is not None:
        return [Root(Path(data_dir).expanduser(), "explicit")]
    roots = [Root(Path(p).expanduser(), ENV_VAR) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    roots.append(Root(cache_root(), "cache"))
    roots.extend(Root(p, "system") for p in SYSTEM_ROOTS)
    return roots


def candidate_folders(spec: DatasetSpec, root: Path) -> list[Path]:
    """Folders under ``root`` that may hold ``spec``: exact names first, then
    ``<name>-<variant>`` folders in name order; the root itself last."""
    exact = [root / name for name in spec.folders()]
    variants = (
        sorted(p for name in spec.folders() for p in root.glob(f"{name}-*") if p.is_dir()) if root.is_dir() else []
    )
    return [p for p in exact if p.is_dir()] + variants + [root]


def find_dataset(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> Root | None:
    """First folder holding ``spec`` along :func:`search_roots`, with its origin, or None.
    An in-memory data set needs no folder: its root is the current directory, origin ``"memory"``."""
    if spec.in_memory:
        return Root(Path("."), "memory")
    if spec.source is not None:  # an npz file: found where it is, or not at all
        return Root(spec.source.parent, "file") if spec.source.is_file() else None
    for root in search_roots(data_dir):
        for folder in candidate_folders(spec, root.path):
            if folder.is_dir() and spec.marker(folder):
                return Root(folder, root.origin)
    return None


def locate(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``spec``; a one-line :class:`DataError` saying where it looked."""
    found = find_dataset(spec, data_dir)
    if found is not None:
        return found.path
    if spec.source is not None:
        raise DataError(f"{spec.name}: its file {spec.source} is missing (moved or deleted?)")
    looked = ", ".join(str(r.path) for r in search_roots(data_dir))
    names = "/, ".join(spec.folders())
    raise DataError(
        f"{spec.name} not found: looked for {names}/ or {spec.folders()[0]}-<variant>/ under {looked}; "
        f"run `certbnn data download {spec.name}` or set {ENV_VAR}"
    )
