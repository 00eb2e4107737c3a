"""Tests of certbnn.data.download against a local, misbehaving HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import certbnn
from certbnn.data import download as dl
from certbnn.data.download import download_file, file_digest, verify_file
from certbnn.errors import DataError, DownloadError

DATA = random.Random(1234).randbytes(3 * 1024 * 1024 + 17)
MD5 = hashlib.md5(DATA).hexdigest()
SHA256 = hashlib.sha256(DATA).hexdigest()


@dataclass
class ServerConfig:
    """Misbehaviours of the test server, and a log of what it received."""

    corrupt: bool = False  # flip one byte in the middle of every body
    ignore_range: bool = False  # always answer 200 with the whole file
    drop_after: int | None = None  # first request: close after this many body bytes
    status: int | None = None  # answer every request with this error status
    requests: list[dict[str, str]] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # silence stderr
        pass

    def do_GET(self) -> None:
        cfg = self.server.config
        cfg.requests.append(dict(self.headers.items()))
        first = len(cfg.requests) == 1
        if cfg.status is not None:
            self.send_response(cfg.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = bytearray(DATA)
        if cfg.corrupt:
            data[len(data) // 2] ^= 0xFF
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and not cfg.ignore_range:
            start, status = int(m.group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = bytes(data[start:])
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if first and cfg.drop_after is not None:
            self.wfile.write(body[: cfg.drop_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    config: ServerConfig


@dataclass
class Served:
    url: str
    config: ServerConfig


@pytest.fixture
def server() -> Iterator[Served]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.config = ServerConfig()
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{srv.server_address[1]}/data.bin", srv.config)
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "_BACKOFF_S", 0.0)


def _get(url: str, dest: Path, **kw: object) -> Path:
    kw.setdefault("timeout", 5.0)
    kw.setdefault("progress", False)
    return download_file(url, dest, **kw)  # type: ignore[arg-type]


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_good_download_verifies_and_is_atomic(server: Served, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "data.bin"
    assert _get(server.url, dest, md5=MD5, sha256=SHA256, expected_size=len(DATA)) == dest
    assert dest.read_bytes() == DATA
    assert not _part(dest).exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.bin"]
    assert len(server.config.requests) == 1
    req = server.config.requests[0]
    assert req["User-Agent"] == f"certbnn/{certbnn.__version__}"
    assert "Range" not in req


def test_corrupted_download_raises_and_leaves_nothing(server: Served, tmp_path: Path) -> None:
    server.config.corrupt = True
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match="md5 mismatch") as info:
        _get(server.url, dest, md5=MD5)
    msg = str(info.value)
    assert "\n" not in msg and server.url in msg and MD5 in msg and "removed" in msg
    assert not dest.exists() and not _part(dest).exists()


def test_sha256_mismatch(server: Served, tmp_path: Path) -> None:
    server.config.corrupt = True
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        _get(server.url, tmp_path / "data.bin", sha256=SHA256)


def test_interrupted_download_resumes_with_range(server: Served, tmp_path: Path) -> None:
    server.config.drop_after = 1_000_000
    dest = tmp_path / "data.bin"
    _get(server.url, dest, md5=MD5, retries=2, chunk_size=64 * 1024)
    assert dest.read_bytes() == DATA
    reqs = server.config.requests
    assert len(reqs) == 2
    assert "Range" not in reqs[0]
    m = re.fullmatch(r"bytes=(\d+)-", reqs[1]["Range"])
    assert m is not None and 0 < int(m.group(1)) <= 1_000_000
    assert not _part(dest).exists()


def test_interrupted_download_without_retries_keeps_part(server: Served, tmp_path: Path) -> None:
    server.config.drop_after = 500_000
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match="interrupted"):
        _get(server.url, dest, md5=MD5, retries=0, chunk_size=64 * 1024)
    assert not dest.exists()
    prefix = _part(dest).read_bytes()
    assert 0 < len(prefix) <= 500_000 and DATA.startswith(prefix)
    # A later call resumes where the first one stopped.
    _get(server.url, dest, md5=MD5)
    assert dest.read_bytes() == DATA
    assert server.config.requests[-1]["Range"] == f"bytes={len(prefix)}-"


def test_existing_part_file_resumes(server: Served, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    _part(dest).write_bytes(DATA[:1_234_567])
    _get(server.url, dest, md5=MD5)
    assert dest.read_bytes() == DATA
    assert [r.get("Range") for r in server.config.requests] == ["bytes=1234567-"]
    assert not _part(dest).exists()


def test_server_without_range_support_restarts(server: Served, tmp_path: Path) -> None:
    server.config.ignore_range = True
    dest = tmp_path / "data.bin"
    _part(dest).write_bytes(DATA[:1_000_000])
    _get(server.url, dest, sha256=SHA256)
    assert dest.read_bytes() == DATA
    assert len(server.config.requests) == 1


def test_interrupted_without_range_support(server: Served, tmp_path: Path) -> None:
    server.config.ignore_range = True
    server.config.drop_after = 700_000
    dest = tmp_path / "data.bin"
    _get(server.url, dest, md5=MD5, chunk_size=64 * 1024)
    assert dest.read_bytes() == DATA
    assert len(server.config.requests) == 2


def test_oversized_part_gets_416_and_restarts(server: Served, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    _part(dest).write_bytes(DATA + b"junk")
    _get(server.url, dest, md5=MD5)
    assert dest.read_bytes() == DATA
    assert [r.get("Range") for r in server.config.requests] == [f"bytes={len(DATA) + 4}-", None]


def test_stale_part_with_wrong_prefix_is_redownloaded(server: Served, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    _part(dest).write_bytes(b"\0" * 100_000)
    _get(server.url, dest, md5=MD5)
    assert dest.read_bytes() == DATA
    assert [r.get("Range") for r in server.config.requests] == ["bytes=100000-", None]


def test_existing_valid_dest_short_circuits(server: Served, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    dest.write_bytes(DATA)
    mtime = dest.stat().st_mtime_ns
    assert _get(server.url, dest, md5=MD5, sha256=SHA256) == dest
    assert server.config.requests == []
    assert dest.stat().st_mtime_ns == mtime


def test_existing_dest_without_checksum_is_trusted(server: Served, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"whatever")
    _get(server.url, dest)
    assert server.config.requests == [] and dest.read_bytes() == b"whatever"


def test_existing_corrupt_dest_is_redownloaded(server: Served, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    dest.write_bytes(DATA[:-1] + b"X")
    _get(server.url, dest, md5=MD5)
    assert dest.read_bytes() == DATA
    assert len(server.config.requests) == 1


def test_size_mismatch(server: Served, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match="size mismatch"):
        _get(server.url, dest, expected_size=len(DATA) + 1)
    assert not dest.exists() and not _part(dest).exists()


def test_404_is_a_clear_error_without_retries(server: Served, tmp_path: Path) -> None:
    server.config.status = 404
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        _get(server.url, dest, md5=MD5, retries=3)
    assert server.url in str(info.value) and "\n" not in str(info.value)
    assert len(server.config.requests) == 1
    assert not dest.exists() and not _part(dest).exists()


def test_500_is_retried_then_reported(server: Served, tmp_path: Path) -> None:
    server.config.status = 500
    with pytest.raises(DownloadError, match="HTTP 500") as info:
        _get(server.url, tmp_path / "data.bin", retries=2)
    assert server.url in str(info.value) and "3 attempt" in str(info.value)
    assert len(server.config.requests) == 3


def test_unreachable_server_fails_quickly(tmp_path: Path) -> None:
    with socket.socket() as s:  # find a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.bin"
    dest = tmp_path / "data.bin"
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="offline") as info:
        _get(url, dest, md5=MD5, timeout=1.0, retries=1)
    assert time.monotonic() - t0 < 3.0
    msg = str(info.value)
    assert url in msg and "manually" in msg and "\n" not in msg
    assert not dest.exists()


def test_progress_bar_goes_to_stderr(server: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _get(server.url, tmp_path / "data.bin", md5=MD5, progress=True)
    out, _ = capsys.readouterr()
    assert out == ""


def test_file_digest_and_verify_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(DATA)
    assert file_digest(path, "md5") == MD5
    assert file_digest(os.fspath(path), "sha256") == SHA256
    verify_file(path, md5=MD5, sha256=SHA256.upper(), expected_size=len(DATA))
    verify_file(path)  # nothing to check
    with pytest.raises(DataError, match=r"f\.bin: md5 mismatch"):
        verify_file(path, md5="0" * 32)
    with pytest.raises(DataError, match="sha256 mismatch"):
        verify_file(path, md5=MD5, sha256="0" * 64)
    with pytest.raises(DataError, match="not found"):
        verify_file(tmp_path / "missing.bin", md5=MD5)
