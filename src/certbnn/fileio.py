"""Durable, link-safe file writes: a file either keeps its old content or has the new one.

Every file certbnn writes goes through :func:`atomic_write_bytes` (or its wrappers):
the data goes to a temporary file ``.<name>.<random>.tmp`` created beside the
destination (``O_EXCL``: never an existing file or link), is fsynced, and is renamed
over the destination. A symbolic link at the destination is *replaced* by the new
file (``rename`` acts on the directory entry): the link's target is never opened,
so nothing outside what certbnn owns is written. A directory at the destination is
refused. Logs are appended with :func:`open_append` (streams: :func:`open_no_follow`),
which refuse a link.

Run directories carry a marker file (:data:`RUN_MARKER`, written first) that tells
certbnn's own folders from anyone else's; :func:`claim_dir` checks and writes it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from certbnn.errors import CertbnnError

RUN_MARKER = ".certbnn-run"
MARKER_FORMAT_VERSION = 1


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, what: str = "file", error: type[CertbnnError] = CertbnnError
) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and
    ``os.replace``; on any failure the old file is untouched and no temporary file
    is left. A symlink at ``path`` is replaced (its target untouched); a directory
    there is refused. OS errors become ``error("cannot write <what> <path>: <reason>")``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode):
            raise error(f"cannot write {what} {path}: a directory is in the way")
        # a regular file keeps its permissions; a link or anything else gets a fresh file
        mode = stat.S_IMODE(info.st_mode) if info is not None and stat.S_ISREG(info.st_mode) else 0o644
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


def save_figure(fig, path: str | os.PathLike, what: str = "plot", **savefig_kwargs) -> Path:
    """Render a matplotlib figure to PNG in memory, then write it with :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig_kwargs)
    atomic_write_bytes(path, buffer.getvalue(), what)
    return Path(path)


def open_no_follow(path: str | os.PathLike, mode: str = "ab") -> IO:
    """``path`` opened for writing (``mode``: ``a``, ``ab``, ``w`` or ``wb``; created 0644 if
    absent) without following a symbolic link there (``O_NOFOLLOW``), never blocking on a
    FIFO; an ``OSError`` for a link or anything but a regular file."""
    flags = {"a": os.O_APPEND, "ab": os.O_APPEND, "w": os.O_TRUNC, "wb": os.O_TRUNC}[mode]
    flags |= os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def open_append(path: str | os.PathLike, what: str = "log") -> IO[str]:
    """A text handle appending to ``path`` (:func:`open_no_follow`); a symlink or
    non-regular file at ``path`` is a one-line CertbnnError, its target never opened."""
    path = Path(path)
    try:
        return open_no_follow(path, "a")
    except OSError as err:
        reason = "a symbolic link is in the way" if path.is_symlink() else (err.strerror or str(err))
        raise CertbnnError(f"cannot write {what} {path}: {reason}") from None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True, what: str = "lock file") -> Iterator[bool]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` for the ``with`` block: between
    processes, and between two opens in one process. The file is created 0644 if absent, never
    through a symbolic link, and left in place (it is empty). Yields True; or, with
    ``blocking=False``, False at once when another holder has it. Where ``flock`` does not exist
    (not POSIX) it yields True without locking."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    try:
        handle = open_no_follow(path, "ab")
    except OSError as err:
        reason = "a symbolic link is in the way" if Path(path).is_symlink() else (err.strerror or str(err))
        raise CertbnnError(f"cannot open {what} {os.fspath(path)}: {reason}") from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _tmp_pattern(names: list[str]) -> re.Pattern[str]:
    # tempfile.mkstemp's random part: 8 characters of [a-z0-9_]
    return re.compile("|".join(rf"\.{re.escape(n)}\.[a-z0-9_]{{8}}\.tmp" for n in names))


def remove_stale_temps(directory: str | os.PathLike, names: list[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write_bytes` leaves when killed
    (``.<name>.<8 chars>.tmp`` for each of ``names``) from ``directory``; regular
    files only, links and everything else are left alone. Returns what was removed."""
    directory = Path(directory)
    pattern = _tmp_pattern(names)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def is_claimed(directory: str | os.PathLike, kind: str | tuple[str, ...]) -> bool:
    """True when ``directory`` holds certbnn's marker for a ``kind`` folder (``run``, ``grid``,
    ``eval``; a tuple: any of them)."""
    marker = Path(directory) / RUN_MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 4096:
            return False
        saved = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    kinds = (kind,) if isinstance(kind, str) else kind
    return isinstance(saved, dict) and saved.get("certbnn") in kinds


def check_output_dir(
    raw: str | os.PathLike, kind: str | tuple[str, ...], option: str = "--out", *, foreign_ok: bool = False
) -> Path:
    """Refuse, with one line, an output folder certbnn does not own: an empty path,
    ``/``, something that is not a directory, or (unless ``foreign_ok``: outputs of
    fixed names, e.g. an evaluation) a non-empty directory without the ``kind``
    marker. Writes nothing; returns the path."""
    text = os.fspath(raw)
    if text.strip() == "":
        raise CertbnnError(f"{option} is empty: name the directory to write")
    path = Path(text)
    if path.resolve() == Path(path.resolve().anchor):
        raise CertbnnError(f"{option} {text!r}: refusing to write into the filesystem root")
    if path.is_symlink() and not path.exists():
        raise CertbnnError(f"{option} {text!r}: a dangling symbolic link")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise CertbnnError(f"{option} {text!r}: not a directory")
        try:
            marker_tmp = _tmp_pattern([RUN_MARKER])  # another process of this run claiming it right now
            non_empty = any(not marker_tmp.fullmatch(e.name) for e in os.scandir(path))
        except OSError as err:
            raise CertbnnError(f"{option} {text!r}: cannot read the directory ({err.strerror or err})") from None
        if non_empty and not foreign_ok and not is_claimed(path, kind):
            what = kind if isinstance(kind, str) else " or ".join(kind)
            raise CertbnnError(
                f"{option} {text!r}: a non-empty directory that is not a certbnn {what} "
                f"(no {RUN_MARKER}); choose a new or empty directory"
            )
    else:
        ancestor = path.absolute().parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise CertbnnError(f"{option} {text!r}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise CertbnnError(f"{option} {text!r}: cannot create it ({ancestor} is not writable)")
        # root passes os.access everywhere: a read-only mount or a kernel's pseudo file system
        # (/proc, /sys) refuses the mkdir anyway, so say so now (a --dry-run never makes it)
        fstype = filesystem_type(ancestor)
        if fstype in PSEUDO_FILESYSTEMS:
            raise CertbnnError(
                f"{option} {text!r}: cannot create it ({ancestor} is on the {fstype} pseudo file system)"
            )
        with contextlib.suppress(OSError, AttributeError):
            if os.statvfs(ancestor).f_flag & os.ST_RDONLY:
                raise CertbnnError(f"{option} {text!r}: cannot create it ({ancestor} is on a read-only file system)")
    return path


# Linux file systems that hold the kernel's state, not files: nobody's outputs belong there.
PSEUDO_FILESYSTEMS = frozenset(
    "proc sysfs devtmpfs devpts cgroup cgroup2 debugfs tracefs securityfs pstore bpf configfs "
    "fusectl mqueue hugetlbfs efivarfs binfmt_misc selinuxfs autofs rpc_pipefs nsfs".split()
)


def filesystem_type(path: str | os.PathLike, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the file system that holds ``path`` (resolved), from the mount table with the
    longest mount point above it; ``None`` where the table cannot be read (not Linux)."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    target = Path(os.path.realpath(path))
    best, best_type = -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # the table writes space, tab, newline and backslash in mount points as octal escapes
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
        if (target == point or point in target.parents) and len(point.parts) >= best:
            best, best_type = len(point.parts), fields[2]
    return best_type


def claim_dir(raw: str | os.PathLike, kind: str | tuple[str, ...], option: str = "--out") -> Path:
    """:func:`check_output_dir`, then create the folder and write its marker (first,
    before any other file; a tuple of kinds: the first); a no-op on a folder already marked."""
    path = check_output_dir(raw, kind, option)
    if is_claimed(path, kind):
        return path
    make_dir(path, option)
    name = kind if isinstance(kind, str) else kind[0]
    atomic_write_text(
        path / RUN_MARKER,
        json.dumps({"certbnn": name, "format_version": MARKER_FORMAT_VERSION}) + "\n",
        f"{name} marker",
    )
    return path


def make_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """``mkdir -p``; an OSError (a file in the way, no permission) is a one-line CertbnnError."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CertbnnError(
            f"{option} {os.fspath(path)!r}: cannot create the directory ({err.strerror or err})"
        ) from None
    return Path(path)
