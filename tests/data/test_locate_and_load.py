"""Finding data sets along the search roots, loading them, and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from make_datafiles import write_cifar, write_mnist_dir

from certbnn import data
from certbnn.data import roots
from certbnn.errors import DataError


def test_search_order_explicit_env_cache_system(isolated_roots, monkeypatch):
    tmp = isolated_roots
    roots = data.search_roots()
    assert [r.origin for r in roots] == ["CERTBNN_DATA", "cache", "system"]
    assert roots[0].path == tmp / "env-root"
    assert roots[1].path == tmp / "cache" / "certbnn" / "data"
    assert [r.origin for r in data.search_roots(tmp / "x")] == ["explicit"]


def test_env_var_may_hold_several_roots(isolated_roots, monkeypatch):
    tmp = isolated_roots
    write_mnist_dir(tmp / "b" / "mnist")
    monkeypatch.setenv("CERTBNN_DATA", f"{tmp / 'a'}:{tmp / 'b'}")
    assert data.locate(data.get_spec("mnist")) == tmp / "b" / "mnist"


def test_earlier_root_wins_and_falls_through(isolated_roots, monkeypatch):
    tmp = isolated_roots
    write_mnist_dir(tmp / "cache" / "certbnn" / "data" / "mnist")
    system = tmp / "system"
    write_mnist_dir(system / "fashion-mnist")
    write_mnist_dir(system / "mnist")
    monkeypatch.setattr(roots, "SYSTEM_ROOTS", (system,))
    assert data.find_dataset(data.get_spec("mnist")).origin == "cache"
    found = data.find_dataset(data.get_spec("fashion-mnist"))
    assert found.origin == "system" and found.path == system / "fashion-mnist"


def test_variant_folder_accepted_and_exact_name_preferred(isolated_roots):
    root = isolated_roots / "env-root"
    write_cifar(root / "cifar10-jpeg-q75", archive=True)
    spec = data.get_spec("cifar10")
    assert data.locate(spec) == root / "cifar10-jpeg-q75"
    write_cifar(root / "cifar10", layout="py")
    assert data.locate(spec) == root / "cifar10"


def test_explicit_dir_is_authoritative(isolated_roots):
    write_mnist_dir(isolated_roots / "env-root" / "mnist")
    with pytest.raises(DataError, match=r"mnist not found: looked for mnist/ or mnist-<variant>/ under .*elsewhere"):
        data.load("mnist", "train", data_dir=isolated_roots / "elsewhere")


def test_explicit_dir_may_be_the_dataset_folder(isolated_roots):
    written = write_mnist_dir(isolated_roots / "mine")
    ds = data.load("mnist", "test", data_dir=isolated_roots / "mine")
    assert len(ds) == len(written["test"][1])


def test_not_found_message_is_one_line_and_actionable(isolated_roots):
    with pytest.raises(DataError) as info:
        data.load("fashion-mnist", "train")
    message = str(info.value)
    assert "\n" not in message and "certbnn data download fashion-mnist" in message


def test_wrong_shape_for_dataset_is_an_error(isolated_roots):
    write_cifar(isolated_roots / "env-root" / "mnist")  # CIFAR files in the MNIST folder
    with pytest.raises(DataError, match="mnist not found"):
        data.load("mnist")


def test_unknown_name_and_split(isolated_roots):
    with pytest.raises(DataError, match=r"unknown data set 'svhn' \(known: .*mnist"):
        data.load("svhn")
    with pytest.raises(DataError, match="has no split 'valid'"):
        data.load("mnist", "valid")


def test_register_arrays_and_custom_spec(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (12, 3, 8, 8), dtype=np.uint8)
    y = np.arange(12) % 4
    try:
        data.register_arrays("toy", {"train": (x, y), "test": (x[:4], y[:4])}, num_classes=4)
        ds = data.load("toy", "test")
        assert len(ds) == 4 and ds.image_shape == (3, 8, 8)
    finally:
        data.unregister("toy")


def test_registered_arrays_need_no_data_folder(isolated_roots):
    """In-memory arrays load on a machine with no data root at all (none of the roots exists)."""
    x = np.zeros((6, 1, 4, 4), dtype=np.uint8)
    try:
        data.register_arrays("toy-nowhere", {"train": (x, np.arange(6) % 2)}, num_classes=2)
        assert len(data.load("toy-nowhere", "train")) == 6
        assert len(data.load("toy-nowhere", "train", data_dir=isolated_roots / "missing")) == 6
    finally:
        data.unregister("toy-nowhere")


def test_dataset_validation():
    x = np.zeros((3, 1, 2, 2), np.uint8)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        data.ArrayDataset(x, np.array([0, 1, 2]), num_classes=2)
    with pytest.raises(DataError, match="3 images but labels of shape"):
        data.ArrayDataset(x, np.array([0, 1]), num_classes=2)
    with pytest.raises(DataError, match="NaN"):
        data.ArrayDataset(np.full((3, 1, 2, 2), np.nan, np.float32), np.zeros(3, int), 2)
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\]"):
        data.ArrayDataset(np.full((3, 1, 2, 2), 2.0, np.float32), np.zeros(3, int), 2)
    with pytest.raises(DataError, match="shape \\(N, C, H, W\\)"):
        data.ArrayDataset(np.zeros((3, 4, 4), np.uint8), np.zeros(3, int), 2)  # (N, D) features are accepted


def _dataset(n=103):
    rng = np.random.default_rng(1)
    return data.ArrayDataset(rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8), np.arange(n) % 10, 10)


def test_batches_cover_every_example_once_in_range():
    ds = _dataset()
    seen = []
    for x, y in ds.batches(10, shuffle=True, seed=3):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 4, 4)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == sorted(ds.labels.tolist())
    assert [len(y) for y in seen] == [10] * 10 + [3]


def test_batches_values_match_storage_and_flatten():
    ds = _dataset()
    x, y = next(ds.batches(5, flatten=True))
    assert x.shape == (5, 16)
    np.testing.assert_allclose(x.numpy(), ds.images[:5].reshape(5, -1) / 255.0, rtol=1e-6)
    assert y.tolist() == ds.labels[:5].tolist()


def test_batches_seeded_shuffle_is_reproducible_and_drop_last():
    ds = _dataset()

    def order(seed):
        return torch.cat([x.flatten(1)[:, 0] for x, _ in ds.batches(7, shuffle=True, seed=seed)])

    assert torch.equal(order(5), order(5))
    assert not torch.equal(order(5), order(6))
    sizes = [len(y) for _, y in ds.batches(10, drop_last=True)]
    assert sizes == [10] * 10 and ds.num_batches(10, drop_last=True) == 10
    with pytest.raises(DataError, match="batch size must be positive"):
        next(ds.batches(0))


def test_batches_from_read_only_arrays_do_not_warn():
    images = np.zeros((4, 1, 2, 2), np.uint8)
    images.flags.writeable = False
    ds = data.ArrayDataset(images, np.zeros(4, int), 2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = next(ds.batches(4))
    assert x.shape == (4, 1, 2, 2)
