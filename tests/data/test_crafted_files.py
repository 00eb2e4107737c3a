"""Crafted (hostile) data and posterior files: each is refused with one DataError /
PosteriorFileError line, quickly, without allocating what the header announces and
without blocking on a FIFO."""

from __future__ import annotations

import pickle
import signal

import crafted_inputs as crafted
import numpy as np
import pytest

from certbnn import data
from certbnn.cli import main
from certbnn.data.cifar import parse_python_batch
from certbnn.data.download import download_dataset, download_file
from certbnn.data.idx import read_idx
from certbnn.data.safe_pickle import safe_loads
from certbnn.errors import DataError, DownloadError
from certbnn.posterior.storage import PosteriorFileError, load_posterior


@pytest.fixture(autouse=True)
def _deadline():
    """A FIFO that blocks would hang the suite: fail after 20 s instead."""

    def expire(*_):
        raise TimeoutError("crafted input blocked for 20 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "writer, message",
    [
        (crafted.idx_overflow, r"header announces \(4294967295, 4294967295, 4294967295\)"),
        (crafted.idx_huge_count, r"header announces \(2147483648, 28, 28\)"),
    ],
)
def test_idx_dimensions_beyond_the_file(tmp_path, gz, writer, message):
    folder = writer(tmp_path / "mnist", gz=gz)
    with pytest.raises(DataError, match=message) as info:
        data.load("mnist", "train", folder)
    assert "\n" not in str(info.value)


def test_idx_size_checked_against_file_before_reading(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(crafted.idx_bytes((1000, 28, 28), b"\0" * 784))
    with pytest.raises(
        DataError,
        match=r"truncated: header announces \(1000, 28, 28\) = 784000 bytes, "
        r"the file holds 784",
    ):
        read_idx(path, 3)


def test_idx_roundtrip_still_works(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(__import__("gzip").compress(crafted.idx_bytes((2, 2, 3), bytes(range(12)))))
    assert read_idx(path, 3).tolist() == np.arange(12).reshape(2, 2, 3).tolist()


def test_empty_split_is_refused(tmp_path, capsys):
    folder = crafted.empty_split(tmp_path / "mnist")
    with pytest.raises(DataError, match=r"mnist/train is empty \(0 examples\)"):
        data.load("mnist", "train", folder)
    assert main(["data", "check", "mnist", "--data-dir", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is empty" in err


@pytest.mark.parametrize(
    "writer, message",
    [
        (crafted.cifar_big_array, r"needs 1125899906842624 bytes, the pickle holds 1"),
        (crafted.cifar_big_shape, r"numpy array without data"),
        (crafted.cifar_evil_global, r"refusing to load global (posix|os)\.system"),
    ],
)
def test_cifar_pickle_sizes_and_globals_are_bounded(tmp_path, writer, message):
    folder = writer(tmp_path / "cifar10")
    with pytest.raises(DataError, match=message) as info:
        data.load("cifar10", "test", folder)
    assert "not a valid CIFAR-10 python batch" in str(info.value)


@pytest.mark.parametrize("dtype", ["O", "V8", [("a", "u1"), ("b", "O")]])
def test_safe_pickle_refuses_non_numeric_dtypes(dtype):
    class Crafted:
        def __reduce__(self):
            reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
            return (reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), np.dtype(dtype), False, b"\0" * 8))

    with pytest.raises(pickle.UnpicklingError, match="refusing numpy dtype|needs"):
        safe_loads(pickle.dumps(Crafted(), protocol=2))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_safe_pickle_still_reads_plain_arrays(protocol):
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    batch = {b"data": images, b"labels": [1, 2], b"extra": [fortran, {b"x": np.zeros(2, np.int64)}]}
    loaded = safe_loads(pickle.dumps(batch, protocol=protocol))
    assert loaded[b"data"].dtype == np.uint8 and (loaded[b"data"] == images).all()
    assert (loaded[b"extra"][0] == fortran).all()
    x, y = parse_python_batch(pickle.dumps(batch, protocol=protocol), "batch")
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [1, 2]


@pytest.mark.parametrize(
    "writer, name",
    [
        (crafted.mnist_fifo, "mnist"),
        (crafted.cifar_fifo_batch, "cifar10"),
        (crafted.cifar_fifo_archive, "cifar10"),
    ],
)
def test_fifo_data_file_is_refused_without_blocking(tmp_path, writer, name):
    folder = writer(tmp_path / name)
    with pytest.raises(DataError, match=r"not a regular file \(FIFO"):
        data.load(name, "train", folder)


def test_directory_in_place_of_a_data_file(tmp_path):
    folder = crafted.mnist_fifo(tmp_path / "mnist")
    (folder / crafted.IMAGES).unlink()
    (folder / crafted.IMAGES).mkdir()
    with pytest.raises(DataError, match="is a directory"):
        data.load("mnist", "train", folder)


@pytest.mark.parametrize("writer", [crafted.posterior_deep, crafted.posterior_deep_object])
def test_deeply_nested_posterior_metadata(tmp_path, writer):
    path = writer(tmp_path / "posterior.safetensors")
    with pytest.raises(PosteriorFileError, match="nested deeper than 64 levels"):
        load_posterior(path)


def test_brackets_inside_strings_do_not_count(tmp_path):
    path = crafted.posterior_with_metadata(tmp_path / "p.safetensors", '{"k": "' + "[" * 1000 + '"}')
    with pytest.raises(PosteriorFileError, match="invalid format_version"):  # parsed, then judged
        load_posterior(path)


def test_posterior_fifo_and_directory(tmp_path):
    with pytest.raises(PosteriorFileError, match="not a regular file"):
        load_posterior(crafted.fifo(tmp_path / "p.safetensors"))
    with pytest.raises(PosteriorFileError, match="is a directory"):
        load_posterior(tmp_path)


@pytest.mark.parametrize("mirror", ["file:///tmp", "ftp://example.org/x", "example.org/mnist", "http://"])
def test_mirror_must_be_http(tmp_path, mirror, capsys):
    assert main(["data", "download", "mnist", "--data-dir", str(tmp_path), "--mirror", mirror, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an http:// or https:// URL" in err and "HTTP None" not in err
    assert not any(tmp_path.iterdir())


def test_download_file_refuses_file_urls(tmp_path):
    with pytest.raises(DownloadError, match="not an http"):
        download_file("file:///etc/passwd", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("where", ["file", "proc", "readonly"])
def test_download_into_a_file_or_unwritable_path(tmp_path, where, capsys):
    target = {"file": tmp_path / "afile", "proc": "/proc/x", "readonly": tmp_path / "ro"}[where]
    if where == "file":
        target.write_text("mine")
    if where == "readonly":
        target.mkdir()
        target.chmod(0o500)
        if __import__("os").access(target, __import__("os").W_OK):
            pytest.skip("running as a user who can write anywhere")
    status = main(
        [
            "data",
            "download",
            "mnist",
            "--data-dir",
            str(target),
            "--mirror",
            "http://127.0.0.1:9",
            "--retries",
            "0",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "cannot create data folder" in err
    if where == "file":
        assert target.read_text() == "mine"


@pytest.mark.parametrize(
    "timeout, retries, message",
    [
        ("nan", "1", r"timeout must be a number of seconds in \(0, 86400\]"),
        ("inf", "1", "timeout must be"),
        ("0", "1", "timeout must be"),
        ("-1", "1", "timeout must be"),
        ("1e300", "1", "timeout must be"),
        ("1", "-1", "retries must be 0 or more"),
    ],
)
def test_download_numeric_options(tmp_path, timeout, retries, message):
    spec = data.get_spec("mnist")
    with pytest.raises(DownloadError, match=message):
        download_dataset(spec, tmp_path, timeout=float(timeout), retries=int(retries), progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz.part"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_download_never_opens_a_fifo_or_directory_in_the_way(tmp_path, name, kind, capsys):
    folder = tmp_path / "mnist"
    folder.mkdir()
    crafted.fifo(folder / name) if kind == "fifo" else (folder / name).mkdir()
    status = main(
        [
            "data",
            "download",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--mirror",
            "http://127.0.0.1:9",
            "--retries",
            "0",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "is not a regular file" in err, err
