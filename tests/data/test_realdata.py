"""The real data sets, when present (CI points CERTBNN_DATA at ../shared/data and
installs Debian's dataset-fashion-mnist). Skipped where a data set is absent."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from certbnn import data

pytestmark = pytest.mark.realdata


def _load_or_skip(name, split):
    if data.find_dataset(data.get_spec(name)) is None:
        pytest.skip(f"{name} not available here")
    return data.load(name, split)


def test_mnist_counts():
    train, test = _load_or_skip("mnist", "train"), _load_or_skip("mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.class_counts() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test.class_counts() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train.images.min() == 0 and train.images.max() == 255


def test_fashion_mnist_counts_and_canonical_bytes():
    train, test = _load_or_skip("fashion-mnist", "train"), _load_or_skip("fashion-mnist", "test")
    assert train.class_counts() == [6000] * 10 and test.class_counts() == [1000] * 10
    folder = data.locate(data.get_spec("fashion-mnist"))
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "8181f5470baa50b63fa0f6fddb340f0a"


def test_cifar10_counts():
    train, test = _load_or_skip("cifar10", "train"), _load_or_skip("cifar10", "test")
    assert train.class_counts() == [5000] * 10 and test.class_counts() == [1000] * 10
    assert train.image_shape == (3, 32, 32) and train.images.dtype == np.uint8
    x, y = next(train.batches(4))
    assert x.shape == (4, 3, 32, 32) and 0 <= float(x.min()) <= float(x.max()) <= 1
