"""``certbnn data list | check | download`` end to end, on generated files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading

import pytest
from make_datafiles import write_mnist_dir

from certbnn import data
from certbnn.cli import main
from certbnn.data.registry import DatasetSpec, Resource, _has_idx, read_idx_split


def test_check_json_reports_counts_and_fails_on_wrong_counts(isolated_roots, capsys):
    write_mnist_dir(isolated_roots / "env-root" / "mnist", counts={"train": 30, "test": 20})
    status = main(["data", "check", "mnist", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert status == 1  # 30/20 examples, not 60000/10000
    assert report["splits"]["train"]["count"] == 30 and report["splits"]["test"]["count"] == 20
    assert report["splits"]["train"]["class_counts"] == [3] * 10
    assert report["ok"] is False
    err = captured.err.strip()
    assert err.startswith("certbnn: error: mnist: train: 30 examples, expected 60000") and "\n" not in err


def test_check_corrupt_file_one_line_error(isolated_roots, capsys):
    folder = isolated_roots / "env-root" / "mnist"
    write_mnist_dir(folder)
    target = folder / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:100])
    assert main(["data", "check", "mnist"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train-images-idx3-ubyte.gz" in err


def test_list_shows_found_and_missing(isolated_roots, capsys):
    write_mnist_dir(isolated_roots / "env-root" / "mnist")
    assert main(["data", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mnist"]["found"] and rows["mnist"]["origin"] == "CERTBNN_DATA"
    assert not rows["cifar10"]["found"]
    assert main(["data", "list"]) == 0
    assert "not found" in capsys.readouterr().out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def static_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _tiny_spec(served, base_url, counts):
    write_mnist_dir(served, counts=counts)
    resources = tuple(
        Resource(p.name, (f"{base_url}/{p.name}",), md5=hashlib.md5(p.read_bytes()).hexdigest())
        for p in sorted(served.glob("*.gz"))
    )
    return DatasetSpec(
        name="tiny-digits",
        image_shape=(1, 28, 28),
        num_classes=10,
        reader=read_idx_split,
        marker=_has_idx,
        splits=counts,
        resources=resources,
    )


def test_download_then_check(isolated_roots, static_server, capsys):
    served, url = static_server
    counts = {"train": 30, "test": 20}
    data.register(_tiny_spec(served, url, counts), overwrite=True)
    try:
        dest = isolated_roots / "dl"
        assert main(["data", "download", "tiny-digits", "--data-dir", str(dest), "--no-progress"]) == 0
        assert sorted(p.name for p in (dest / "tiny-digits").iterdir()) == sorted(p.name for p in served.iterdir())
        assert main(["data", "check", "tiny-digits", "--data-dir", str(dest), "--json"]) == 0
        report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
        assert report["ok"] and all(f["canonical_md5"] for f in report["files"].values())
    finally:
        data.unregister("tiny-digits")


def test_download_corrupted_source_fails_and_keeps_nothing(isolated_roots, static_server, capsys):
    served, url = static_server
    counts = {"train": 30, "test": 20}
    data.register(_tiny_spec(served, url, counts), overwrite=True)
    try:
        victim = served / "t10k-labels-idx1-ubyte.gz"
        victim.write_bytes(victim.read_bytes()[:-3] + b"xyz")
        dest = isolated_roots / "dl"
        assert (
            main(["data", "download", "tiny-digits", "--data-dir", str(dest), "--no-progress", "--retries", "0"]) == 1
        )
        err = capsys.readouterr().err.strip()
        assert "md5 mismatch" in err and "\n" not in err
        assert not (dest / "tiny-digits" / victim.name).exists()
        assert not list((dest / "tiny-digits").glob("*.part"))
    finally:
        data.unregister("tiny-digits")


def test_download_to_env_root_by_default(isolated_roots, static_server, capsys):
    served, url = static_server
    data.register(_tiny_spec(served, url, {"train": 10, "test": 10}), overwrite=True)
    try:
        assert main(["data", "download", "tiny-digits", "--no-progress"]) == 0
        assert (isolated_roots / "env-root" / "tiny-digits" / "train-images-idx3-ubyte.gz").exists()
    finally:
        data.unregister("tiny-digits")
