"""Reader for the IDX format of the MNIST family (gzip-compressed or raw).

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, ``ndim``
big-endian uint32 dimensions, then the row-major data. MNIST and
Fashion-MNIST use type ``0x08`` (unsigned byte): images have 3 dimensions
(N, 28, 28) and labels 1 dimension (N,).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from certbnn.errors import DataError
from certbnn.safe_open import open_regular

_UBYTE = 0x08
#: Largest IDX body read (uncompressed); MNIST train images are 47 MB.
MAX_IDX_BYTES = 1 << 32
_CHUNK = 1 << 22


def _open(path: Path):
    """The file's (decompressed) byte stream and, for raw files, its size on disk."""
    raw = open_regular(path, "IDX file")
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), None, raw
    return raw, os.fstat(raw.fileno()).st_size, raw


def _read_body(f, path: Path, dims: tuple[int, ...], size: int) -> bytearray:
    """Read exactly ``size`` bytes in chunks, so memory grows only with bytes actually present."""
    buf = bytearray()
    while len(buf) < size:
        chunk = f.read(min(_CHUNK, size - len(buf)))
        if not chunk:
            raise DataError(f"{path}: truncated: header announces {dims} = {size} bytes, found {len(buf)}")
        buf += chunk
    return buf


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with ``ndim`` dimensions into a writable uint8 array.

    Raises :class:`DataError` naming ``path`` for a file that is not regular (FIFO,
    directory), a bad magic number, a wrong number of dimensions, dimensions whose
    product exceeds the file (raw) or :data:`MAX_IDX_BYTES`, a truncated body,
    trailing bytes, or a corrupt gzip stream. Nothing is allocated beyond the bytes
    actually read.
    """
    try:
        f, disk_size, raw = _open(path)
        with raw, f:
            header = f.read(4)
            if len(header) < 4:
                raise DataError(f"{path}: file is empty or truncated (no IDX header)")
            zero1, zero2, dtype_code, file_ndim = struct.unpack(">BBBB", header)
            if zero1 != 0 or zero2 != 0 or dtype_code != _UBYTE:
                raise DataError(
                    f"{path}: not an unsigned-byte IDX file (magic {header.hex()}, expected 000008{ndim:02x})"
                )
            if file_ndim != ndim:
                raise DataError(f"{path}: IDX file has {file_ndim} dimensions, expected {ndim}")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            size = math.prod(dims)
            available = None if disk_size is None else disk_size - 4 - 4 * ndim
            if available is not None and size > available:
                raise DataError(
                    f"{path}: truncated: header announces {dims} = {size} bytes, the file holds {available}"
                )
            if size > MAX_IDX_BYTES:
                raise DataError(
                    f"{path}: header announces {dims} = {size} bytes, more than the "
                    f"{MAX_IDX_BYTES} an IDX data file may hold"
                )
            buf = _read_body(f, path, dims, size)
            extra = len(f.read(1 << 16))
            if extra:
                raise DataError(f"{path}: {extra}+ unexpected bytes after the {dims} IDX body")
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise DataError(f"{path}: file not found") from None
        reason = str(exc) or type(exc).__name__
        raise DataError(f"{path}: corrupt or truncated file ({reason})") from None
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzip-compressed when ``path`` ends in ``.gz``).

    Used by tests and by users converting their own data to the MNIST layout.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, _UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header)
        f.write(array.tobytes())
