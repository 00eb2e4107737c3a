"""Robust, resumable, atomic HTTP(S) downloads with checksum verification.

Used by ``certbnn data download NAME``; :func:`file_digest` and
:func:`verify_file` are also meant for checking files placed by hand.

Guarantees of :func:`download_file`:

* the final name ``dest`` only ever holds a complete, verified file: bytes go
  to ``<dest>.part``, which is fsynced and then ``os.replace``\\ d onto ``dest``
  once its size and checksum(s) match;
* interrupted transfers resume with an HTTP ``Range`` request (also across
  calls, from a ``.part`` left by an earlier run); a server that ignores the
  range (200) or rejects it (416) makes the download restart from zero;
* connection errors, timeouts, truncated bodies and 408/429/5xx answers are
  retried with exponential backoff, resuming each time;
* every failure is a one-line :class:`~certbnn.errors.DownloadError`.

Concurrent downloads of the same ``dest`` by several processes are not
coordinated (they would share the ``.part`` file); run one at a time.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import stat
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

import certbnn
from certbnn.errors import DataError, DownloadError
from certbnn.fileio import open_no_follow
from certbnn.safe_open import open_regular

if TYPE_CHECKING:
    from certbnn.data.registry import DatasetSpec

__all__ = ["download_dataset", "download_file", "file_digest", "verify_file"]

USER_AGENT = f"certbnn/{certbnn.__version__}"
_BACKOFF_S = 1.0  # first retry delay; doubles on each further retry
_BACKOFF_MAX_S = 30.0
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_READ_CHUNK = 1 << 20
MAX_TIMEOUT_S = 86400.0  # per network read; larger values overflow the socket layer


# --------------------------------------------------------------------------- #
# Verification helpers
# --------------------------------------------------------------------------- #
def file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    """Hex digest of the file at ``path`` with ``algorithm`` (e.g. ``"md5"``,
    ``"sha256"``), read in streaming chunks."""
    h = hashlib.new(algorithm)
    with open_regular(path, "file") as f:  # a FIFO would block forever
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(path: Path, *, md5: str | None, sha256: str | None, expected_size: int | None) -> str | None:
    """Describe the first way ``path`` fails the given expectations, or ``None``."""
    if expected_size is not None:
        size = path.stat().st_size
        if size != expected_size:
            return f"size mismatch (expected {expected_size} bytes, got {size})"
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is not None:
            got = file_digest(path, algorithm)
            if got.lower() != expected.strip().lower():
                return f"{algorithm} mismatch (expected {expected.strip().lower()}, got {got})"
    return None


def verify_file(
    path: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    expected_size: int | None = None,
) -> None:
    """Check ``path`` against the given size/checksum(s); do nothing for those
    left ``None``.

    Raises :class:`~certbnn.errors.DataError` (one line, naming the file) if the
    file is missing or does not match.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    problem = _mismatch(p, md5=md5, sha256=sha256, expected_size=expected_size)
    if problem is not None:
        raise DataError(f"{p}: {problem}")


# --------------------------------------------------------------------------- #
# Download
# --------------------------------------------------------------------------- #
class _Retryable(Exception):
    """A transient failure of one attempt; the message is for the final error."""


class _Restart(Exception):
    """The server cannot continue the ``.part`` file; start again from zero."""


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so a rename survives a crash."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fetch(
    url: str,
    part: Path,
    *,
    label: str,
    timeout: float,
    progress: bool,
    chunk_size: int,
) -> bool:
    """One attempt: continue ``part`` from its current size up to the end.

    Returns whether the bytes were appended to an existing prefix (206).
    Raises :class:`_Retryable`, :class:`_Restart` or :class:`DownloadError`.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset > 0:
            raise _Restart(f"HTTP 416 for a resume at byte {offset}") from e
        if e.code in _RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise _Retryable(f"cannot connect ({e.reason})") from e
    except (http.client.HTTPException, OSError) as e:
        raise _Retryable(f"connection failed ({e!r})") from e

    with response:
        status = response.status
        total: int | None = None
        if status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != offset:
                if offset == 0:
                    raise _Retryable("server sent a partial answer (206) to a full request")
                raise _Restart("server answered a different range")
            if m.group(3) != "*":
                total = int(m.group(3))
            mode, appended = "ab", offset > 0
        elif status == 200:
            offset, mode, appended = 0, "wb", False
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status}")

        written = offset
        with (
            open_no_follow(part, mode) as f,  # a link at the .part is an error, never followed
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                file=sys.stderr,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            try:
                while chunk := response.read(chunk_size):
                    f.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as e:
                raise _Retryable(f"transfer interrupted at byte {written} ({e!r})") from e
            finally:
                f.flush()
                os.fsync(f.fileno())
        if total is not None and written < total:
            raise _Retryable(f"transfer interrupted at byte {written} of {total}")
        return appended


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    expected_size: int | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    progress: bool = True,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, atomic, verified) and return ``dest``.

    * If ``dest`` already exists and matches ``md5``/``sha256``/``expected_size``
      it is returned without any network access. If it does not match it is
      deleted and downloaded again. With no checksum and no size given an
      existing ``dest`` is trusted as is.
    * Bytes go to ``<dest>.part``; an existing ``.part`` is resumed with a
      ``Range`` request. Only a complete file whose size and checksum(s) match
      is fsynced and renamed to ``dest``.
    * Transient failures (connection errors, timeouts, truncated bodies,
      408/429/5xx) are retried up to ``retries`` times (so ``retries + 1``
      attempts) with exponential backoff, resuming each time.
    * On a checksum/size mismatch of the complete file the ``.part`` is
      deleted and :class:`~certbnn.errors.DownloadError` is raised. (If the
      file had been assembled from a resumed prefix, it is first downloaded
      once more from scratch, since a stale ``.part`` may have caused it.)

    Raises :class:`~certbnn.errors.DownloadError` with a one-line message on any
    failure (HTTP error, offline machine, mismatch).
    """
    dest = Path(dest)
    _check_url(url)
    try:
        return _download_file(
            url,
            dest,
            md5=md5,
            sha256=sha256,
            expected_size=expected_size,
            timeout=timeout,
            retries=retries,
            progress=progress,
            chunk_size=chunk_size,
        )
    except OSError as err:  # local file system: unwritable folder, disk full, a directory in the way
        where = err.filename or dest
        raise DownloadError(f"cannot write {where}: {err.strerror or err}") from None


def _check_url(url: str) -> None:
    """One-line DownloadError unless ``url`` is an absolute http(s) URL."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.strip("/"):
        raise DownloadError(f"{url!r}: not an http:// or https:// URL (only HTTP(S) mirrors are supported)")


def _download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None,
    sha256: str | None,
    expected_size: int | None,
    timeout: float,
    retries: int,
    progress: bool,
    chunk_size: int,
) -> Path:
    """:func:`download_file` without the URL check and OSError translation."""
    part = dest.with_name(dest.name + ".part")
    for path in (dest, part):  # a FIFO, directory or device in the way: refuse, never open it
        mode = path.lstat().st_mode if os.path.lexists(path) else None
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise DownloadError(f"{path}: exists and is not a regular file; move it away and retry")
    checks = {"md5": md5, "sha256": sha256, "expected_size": expected_size}
    verifiable = any(v is not None for v in checks.values())

    if dest.exists():
        if not verifiable or _mismatch(dest, **checks) is None:
            return dest
        _unlink(dest)  # corrupt or truncated: fetch it again

    dest.parent.mkdir(parents=True, exist_ok=True)
    attempts = max(0, retries) + 1
    failures = 0
    clean_retry_left = True
    last_error = ""
    used_prefix = part.exists() and part.stat().st_size > 0
    while True:
        try:
            used_prefix |= _fetch(
                url,
                part,
                label=dest.name,
                timeout=timeout,
                progress=progress,
                chunk_size=chunk_size,
            )
        except _Restart:
            _unlink(part)
            used_prefix = False
            continue  # the next request has no Range header, so this cannot loop
        except _Retryable as e:
            failures += 1
            last_error = str(e)
            if failures >= attempts:
                break
            time.sleep(min(_BACKOFF_S * 2 ** (failures - 1), _BACKOFF_MAX_S))
            continue

        problem = _mismatch(part, **checks)
        if problem is None:
            os.replace(part, dest)
            _fsync_dir(dest.parent)
            return dest
        _unlink(part)
        if used_prefix and clean_retry_left:
            clean_retry_left, used_prefix = False, False
            continue
        raise DownloadError(f"{url}: {problem}; the partial file was removed")

    if last_error.startswith("cannot connect"):
        raise DownloadError(
            f"{url}: {last_error} after {attempts} attempt(s); the machine may be "
            f"offline - you can download the file elsewhere and place it manually "
            f"at {dest} (under the data directory)"
        )
    raise DownloadError(f"{url}: {last_error} (gave up after {attempts} attempt(s))")


def download_dataset(
    spec: DatasetSpec,
    root: Path,
    *,
    mirror: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
) -> Path:
    """Fetch every resource of ``spec`` into ``root / <first folder name>`` and return
    that folder. Files already present and verified are kept; mirrors are tried in
    order (``mirror``, a base URL, replaces them all: ``<mirror>/<filename>``)."""
    if not spec.resources:
        raise DownloadError(f"{spec.name}: no download source is known for this data set")
    if mirror is not None:
        _check_url(mirror)
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise DownloadError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {timeout}")
    if retries < 0:
        raise DownloadError(f"retries must be 0 or more, got {retries}")
    folder = Path(root) / spec.folders()[0]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create data folder {folder}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DownloadError(f"cannot write into data folder {folder}: permission denied")
    for resource in spec.resources:
        urls = (f"{mirror.rstrip('/')}/{resource.filename}",) if mirror else resource.urls
        errors: list[str] = []
        for url in urls:
            try:
                download_file(
                    url,
                    folder / resource.filename,
                    md5=resource.md5,
                    sha256=resource.sha256,
                    timeout=timeout,
                    retries=retries,
                    progress=progress,
                )
                break
            except DownloadError as exc:
                errors.append(str(exc))
        else:
            raise DownloadError(
                errors[-1] if len(errors) == 1 else f"{resource.filename}: every mirror failed; last: {errors[-1]}"
            )
    return folder
