"""Durable file writes: a file either keeps its old content or has the new one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from certbnn.errors import CertbnnError


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "file",
                       error: type[CertbnnError] = CertbnnError) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and
    ``os.replace``; on any failure the old file is untouched and no temporary file
    is left. OS errors become ``error("cannot write <what> <path>: <reason>")``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise error(f"cannot write {what} {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise error(f"cannot write {what} {path}: {err.strerror or err}") from None
        raise
    fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), what)
