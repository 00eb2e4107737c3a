"""Open input files without surprises: regular files only, sizes bounded.

A FIFO, socket or device named as a data or posterior file would block
``open()`` forever or stream without end; :func:`open_regular` opens with
``O_NONBLOCK`` (so a FIFO never blocks), checks with ``fstat`` that the
descriptor is a regular file, and only then hands back a normal blocking
binary file object.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from certbnn.errors import CertbnnError, DataError


def open_regular(path: str | os.PathLike, what: str = "file", error: type[CertbnnError] = DataError) -> BinaryIO:
    """``path`` opened for binary reading; ``error`` (one line naming ``what`` and the
    path) if it is missing, unreadable, or not a regular file (directory, FIFO, device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise error(f"cannot read {what} {os.fspath(path)}: {err.strerror or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (FIFO, socket or device?)"
            raise error(f"{what} {os.fspath(path)} is {kind}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: str | os.PathLike, what: str = "file", error: type[CertbnnError] = DataError, max_bytes: int | None = None
) -> bytes:
    """All bytes of the regular file ``path`` (see :func:`open_regular`); ``error`` if it is
    larger than ``max_bytes`` (checked before reading) or cannot be read."""
    with open_regular(path, what, error) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise error(f"{what} {os.fspath(path)} is {size} bytes, more than the {max_bytes} allowed")
            return f.read()
        except OSError as err:
            raise error(f"cannot read {what} {os.fspath(path)}: {err.strerror or err}") from None
