"""IDX and CIFAR-10 readers: round trips and every kind of broken file."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
from make_datafiles import write_cifar, write_mnist_dir

from certbnn.data import cifar
from certbnn.data.idx import read_idx, write_idx
from certbnn.data.registry import read_idx_split
from certbnn.data.safe_pickle import safe_loads
from certbnn.errors import DataError


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    written = write_mnist_dir(tmp_path, gz=gz)
    for split, (images, labels) in written.items():
        x, y = read_idx_split(tmp_path, split)
        assert x.shape == (len(labels), 1, 28, 28) and x.dtype == np.uint8
        np.testing.assert_array_equal(x[:, 0], images)
        np.testing.assert_array_equal(y, labels)
        assert x.flags.writeable


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)
    with pytest.raises(DataError, match=r"f: not an unsigned-byte IDX file \(magic 00000d03"):
        read_idx(path, ndim=3)


def test_idx_wrong_ndim(tmp_path):
    write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="has 1 dimensions, expected 3"):
        read_idx(tmp_path / "labels", ndim=3)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated_body(tmp_path, gz):
    path = tmp_path / ("x.gz" if gz else "x")
    write_idx(tmp_path / "full", np.ones((4, 28, 28), np.uint8))
    body = (tmp_path / "full").read_bytes()[:-100]
    path.write_bytes(gzip.compress(body) if gz else body)
    with pytest.raises(DataError, match=r"truncated: header announces \(4, 28, 28\)"):
        read_idx(path, ndim=3)


def test_idx_trailing_bytes(tmp_path):
    write_idx(tmp_path / "x", np.ones((2, 3, 3), np.uint8))
    with open(tmp_path / "x", "ab") as f:
        f.write(b"junk")
    with pytest.raises(DataError, match="unexpected bytes after"):
        read_idx(tmp_path / "x", ndim=3)


def test_idx_truncated_gzip_stream(tmp_path):
    write_idx(tmp_path / "x.gz", np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8))
    data = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"x\.gz: (corrupt or truncated|truncated)"):
        read_idx(tmp_path / "x.gz", ndim=3)


def test_idx_corrupt_gzip(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((50, 28, 28), np.uint8))
    data = bytearray((tmp_path / "x.gz").read_bytes())
    data[20:40] = os.urandom(20)
    (tmp_path / "x.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"x\.gz: "):
        read_idx(tmp_path / "x.gz", ndim=3)


def test_idx_label_image_count_mismatch(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match="29 labels for 30 images"):
        read_idx_split(tmp_path, "train")


def test_idx_missing_file(tmp_path):
    write_mnist_dir(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*missing file of the test split"):
        read_idx_split(tmp_path, "test")


@pytest.mark.parametrize("layout", ["bin", "py"])
@pytest.mark.parametrize("archive", [False, True])
def test_cifar_round_trip(tmp_path, layout, archive):
    written = write_cifar(tmp_path, layout, archive)
    for split, (images, labels) in written.items():
        x, y = cifar.read_cifar10(tmp_path, split)
        assert x.shape == (len(labels), 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, labels)


def test_cifar_binary_planes_are_rgb_channels(tmp_path):
    record = np.zeros(3073, np.uint8)
    record[0] = 7
    record[1:1025], record[1025:2049], record[2049:] = 10, 20, 30
    x, y = cifar.parse_binary_batch(record.tobytes(), "mem")
    assert y.tolist() == [7]
    assert x[0, :, 5, 5].tolist() == [10, 20, 30]


def test_cifar_truncated_batch(tmp_path):
    write_cifar(tmp_path, "bin")
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"data_batch_3\.bin: size .* not a positive multiple of the 3073"):
        cifar.read_cifar10(tmp_path, "train")


def test_cifar_missing_batch(tmp_path):
    write_cifar(tmp_path, "bin")
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="test_batch.bin: missing batch of the test split"):
        cifar.read_cifar10(tmp_path, "test")


def test_cifar_truncated_archive(tmp_path):
    write_cifar(tmp_path, "bin", archive=True)
    archive = next(tmp_path.glob("*.tar.gz"))
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(DataError, match="corrupt or truncated archive|archive lacks"):
        cifar.read_cifar10(tmp_path, "train")


def test_cifar_wrong_folder(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 found"):
        cifar.read_cifar10(tmp_path, "train")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/certbnn-pwned",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    payload = pickle.dumps({b"data": _Evil(), b"labels": [0]})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global (posix|os).system"):
        safe_loads(payload)
    batch_dir = tmp_path / "cifar-10-batches-py"
    batch_dir.mkdir()
    (batch_dir / "test_batch").write_bytes(payload)
    with pytest.raises(DataError, match="not a valid CIFAR-10 python batch.*refusing"):
        cifar.read_cifar10(tmp_path, "test")


def test_restricted_unpickler_refuses_arbitrary_classes():
    import collections

    payload = pickle.dumps(collections.OrderedDict(a=1))
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        safe_loads(payload)


def test_restricted_unpickler_admits_plain_data():
    obj = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2], "s": ("a", 1.5)}
    back = safe_loads(pickle.dumps(obj, protocol=2))
    np.testing.assert_array_equal(back[b"data"], obj[b"data"])
    assert back[b"labels"] == [1, 2] and back["s"] == ("a", 1.5)


def test_python_batch_rejects_wrong_dtype():
    payload = pickle.dumps({b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]}, protocol=2)
    with pytest.raises(DataError, match="uint8 array of shape"):
        cifar.parse_python_batch(payload, "batch")
