"""CLI plug-ins: ``--model package.module:factory`` and ``--dataset PATH.npz`` / ``<root>/<name>/data.npz``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from certbnn import data
from certbnn.cli import main
from certbnn.config import load_saved_config, load_toml, make_config
from certbnn.data.npz import read_npz
from certbnn.errors import ConfigError, DataError
from certbnn.plugins import build_plugin, is_plugin_spec, parse_plugin_spec

NETS = """
import math
import torch
from torch import nn

LOADED = True

def mlp(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.ReLU(), nn.Linear(16, num_classes))

def fixed():                      # no arguments: the data set's shape is baked in
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

def by_keyword(num_classes, input_shape):
    return mlp(input_shape, num_classes)

class Sine(nn.Module):            # a custom forward with an operation no bound rule covers
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
    def forward(self, x):
        return self.b(torch.sin(self.a(x)))

def sine():
    return Sine()

class Residual(nn.Module):        # a custom forward the graph engine follows: functional relu, a skip connection
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
    def forward(self, x):
        return self.out(torch.relu(x + self.b(torch.relu(self.a(x)))))

def residual():
    return Residual()

def wrong_width():
    return nn.Sequential(nn.Linear(6, 5))

def not_a_module():
    return "a string"

def raises():
    raise RuntimeError("no GPU here\\nsecond line")

def two_required(a, b, c):
    return mlp((6,), 3)

def no_params():
    return nn.Sequential(nn.Flatten())

class Scaled(nn.Module):          # a bare parameter: no fan-in for the prior
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(6, 3))
    def forward(self, x):
        return x @ self.w

def scaled():
    return Scaled()

def bad_forward():
    return nn.Sequential(nn.Linear(7, 3))

NOT_CALLABLE = 3
"""


def _features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 6) features in [0, 1], three classes decided by the first feature."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 6)).astype(np.float32)
    return x, np.minimum((x[:, 0] * 3).astype(np.int64), 2)


def _write_npz(path, **overrides):
    x, y = _features(240, 0)
    xt, yt = _features(60, 1)
    arrays = {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, **overrides}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding the user's module ``tinynets.py`` and ``toy.npz``, as the current directory."""
    (tmp_path / "tinynets.py").write_text(NETS)
    _write_npz(tmp_path / "toy.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    import sys

    sys.modules.pop("tinynets", None)


TRAIN = ["--epochs", "1", "--val-size", "40", "--batch-size", "64", "--no-progress", "--device", "cpu"]


def _train(out, *extra):
    return main(["train", "--dataset", "toy.npz", "--out", str(out), *TRAIN, *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("certbnn: error: ") and "\n" not in err, err
    return err


def test_factory_trains_on_npz_and_evaluates(workdir, capsys):
    assert _train(workdir / "run", "--model", "tinynets:mlp", "--eps", "0.05") == 0
    config = json.loads((workdir / "run" / "config.json").read_text())
    assert config["model"] == "tinynets:mlp" and config["dataset"] == "toy.npz"
    assert config["dataset_file"] == str((workdir / "toy.npz").resolve())
    assert config["dataset_sha256"] == read_npz(workdir / "toy.npz").sha256
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(workdir / "run"),
                "--limit",
                "30",
                "--samples",
                "4",
                "--attacks",
                "fgsm",
                "--certificates",
                "per-sample",
                "--eps",
                "0.02,0.05",
                "--radius",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    evaluation = json.loads((workdir / "run" / "evaluation.json").read_text())
    assert evaluation["num_points"] == 30 and evaluation["model"] == "tinynets:mlp"
    radii = evaluation["radius"]["per_point"]
    assert len(radii) == 30 and all(0 <= r <= evaluation["radius"]["eps_max"] for r in radii)
    assert (workdir / "run" / "certified_vs_eps.png").read_bytes().startswith(b"\x89PNG")


def test_factory_without_arguments_and_by_keyword(workdir):
    assert next(p.shape for p in build_plugin("tinynets:fixed", (6,), 3).parameters()) == (8, 6)
    assert build_plugin("tinynets:by_keyword", (1, 2, 3), 4)(torch.rand(5, 1, 2, 3)).shape == (5, 4)


def test_config_round_trip_and_toml(workdir):
    toml = workdir / "run.toml"
    toml.write_text(
        'dataset = "toy.npz"\nmodel = "tinynets:fixed"\nlikelihood = "standard"\nepochs = 1\nval_size = 40\n'
    )
    config = make_config(load_toml(toml), {})
    assert config.dataset_file == str((workdir / "toy.npz").resolve()) and len(config.dataset_sha256) == 64
    saved = workdir / "config.json"
    saved.write_text(json.dumps(config.to_json()))
    assert make_config(load_saved_config(saved), {}).to_json() == config.to_json()
    toml.write_text(toml.read_text() + f'dataset_sha256 = "{"0" * 64}"\n')  # a pinned, wrong digest
    with pytest.raises(ConfigError, match="has sha256 .* but the run was made with 0000"):
        make_config(load_toml(toml), {})


def test_evaluate_refuses_a_changed_or_missing_npz_and_a_vanished_module(workdir, capsys):
    assert _train(workdir / "run", "--model", "tinynets:fixed", "--likelihood", "standard") == 0
    evaluate = [
        "evaluate",
        str(workdir / "run"),
        "--limit",
        "10",
        "--attacks",
        "",
        "--certificates",
        "",
        "--no-progress",
        "--device",
        "cpu",
    ]
    _write_npz(workdir / "toy.npz", y_test=np.zeros(60, np.int64) + 1)
    capsys.readouterr()
    assert main(evaluate) == 1
    assert "has sha256" in _one_line_error(capsys)
    (workdir / "toy.npz").unlink()
    assert main(evaluate) == 1
    assert "not found" in _one_line_error(capsys)
    _write_npz(workdir / "toy.npz")
    assert main(evaluate) == 0
    import sys

    (workdir / "tinynets.py").unlink()
    sys.modules.pop("tinynets", None)
    capsys.readouterr()
    assert main(evaluate) == 1
    assert "cannot import module 'tinynets'" in _one_line_error(capsys)


def test_custom_forward_trains_without_bounds_and_is_refused_with_them(workdir, capsys):
    assert _train(workdir / "std", "--model", "tinynets:sine", "--likelihood", "standard") == 0
    metrics = json.loads((workdir / "std" / "metrics.json").read_text())
    assert "certified_accuracy_ibp" not in metrics["final"]
    capsys.readouterr()
    assert _train(workdir / "ibp", "--model", "tinynets:sine", "--likelihood", "ibp") == 1
    err = _one_line_error(capsys)
    assert "bound engine cannot bound it" in err and "tinynets:sine" in err
    assert not (workdir / "ibp").exists()  # refused before any work


def test_custom_forward_the_engine_follows_trains_robustly_and_certifies(workdir, capsys):
    assert _train(workdir / "run", "--model", "tinynets:residual", "--likelihood", "ibp", "--eps", "0.05") == 0
    assert "certified_accuracy_ibp" in json.loads((workdir / "run" / "metrics.json").read_text())["final"]
    assert (
        main(
            [
                "evaluate",
                str(workdir / "run"),
                "--limit",
                "20",
                "--samples",
                "4",
                "--attacks",
                "",
                "--certificates",
                "per-sample",
                "--eps",
                "0.05",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    row = json.loads((workdir / "run" / "evaluation.json").read_text())["per_eps"][0]
    assert 0 <= row["per_sample_certified_accuracy"] <= row["clean_accuracy"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tinynets:", "nor a plug-in package.module:factory"),
        ("tiny-nets:mlp", "nor a plug-in package.module:factory"),
        ("nosuchmodule_xyz:make", "cannot import module 'nosuchmodule_xyz'"),
        ("tinynets:nothing", "module 'tinynets' has no attribute 'nothing'"),
        ("tinynets:NOT_CALLABLE", "not callable"),
        ("tinynets:raises", "the factory raised RuntimeError: no GPU here second line"),
        ("tinynets:wrong_width", "maps a (2, 6) batch to (2, 5), expected (2, 3) logits"),
        ("tinynets:not_a_module", "returned a str, not an nn.Module"),
        ("tinynets:two_required", "must take no arguments or (input_shape, num_classes)"),
        ("tinynets:no_params", "has no parameters"),
        ("tinynets:scaled", "cannot infer fan_in"),
        ("tinynets:bad_forward", "forward of a (2, 6) batch raised RuntimeError"),
    ],
)
def test_plugin_errors_are_one_line(workdir, capsys, spec, message):
    assert _train(workdir / "run", "--model", spec) == 1
    assert message in _one_line_error(capsys)
    assert not (workdir / "run").exists()


def test_import_error_inside_the_module_is_one_line(workdir, capsys):
    (workdir / "broken.py").write_text("import torch\nraise ValueError('bad config')\n")
    (workdir / "needs.py").write_text("import not_installed_pkg_xyz\n")
    assert _train(workdir / "run", "--model", "broken:f") == 1
    assert "importing 'broken' raised ValueError: bad config" in _one_line_error(capsys)
    assert _train(workdir / "run", "--model", "needs:f") == 1
    assert "importing 'needs' failed: ModuleNotFoundError" in _one_line_error(capsys)


def test_registry_specs_are_not_plugins():
    assert not is_plugin_spec("mlp:512") and not is_plugin_spec("cnn:16c4,p2") and not is_plugin_spec("linear")
    assert is_plugin_spec("pkg.nets:make") and parse_plugin_spec("pkg.nets:Factory.build") == (
        "pkg.nets",
        "Factory.build",
    )


def test_help_says_plugins_run_user_code(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "RUNS YOUR PYTHON CODE" in " ".join(capsys.readouterr().out.split())


# --- npz data sets -----------------------------------------------------------------------

X, Y = _features(20, 2)
BAD_NPZ = [
    ({"x_test": None}, "missing array(s) x_test"),
    ({"extra": X}, "unknown array(s) extra"),
    ({"x_train": X.astype(np.int16)}, "x_train must be uint8 or float in [0, 1], got dtype int16"),
    ({"x_train": np.where(X > 0.5, np.nan, X)}, "x_train contains NaN"),
    ({"x_train": X * 255}, "x_train must lie in [0, 1]"),
    ({"y_train": Y[:10]}, "x_train has 20 examples but y_train has 10 labels"),
    ({"y_train": Y - 1}, "y_train has negative labels"),
    ({"y_train": Y.astype(np.float32)}, "y_train must hold integer labels"),
    ({"x_train": X.reshape(20, 2, 3)}, "x_train must have shape (N, C, H, W) or (N, D)"),
    ({"x_train": np.array([object()] * 20)}, "pickled Python objects"),
    ({"x_test": X[:, :5]}, "x_train examples have shape (6,) but x_test examples (5,)"),
    ({"y_train": np.zeros(20, np.int64), "y_test": np.zeros(20, np.int64)}, "needs at least 2 classes"),
    ({"x_train": X[:0], "y_train": Y[:0]}, "x_train is empty"),
    ({"class_names": np.array(["a", "b"])}, "labels go up to 2 but class_names names only 2 classes"),
]


@pytest.mark.parametrize("overrides, message", BAD_NPZ)
def test_bad_npz_is_refused_in_one_line(tmp_path, capsys, overrides, message):
    path = tmp_path / "bad.npz"
    base = {"x_train": X, "y_train": Y, "x_test": X, "y_test": Y}
    np.savez(path, **{k: v for k, v in {**base, **overrides}.items() if v is not None})
    with pytest.raises(DataError) as info:
        read_npz(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert main(["data", "check", str(path)]) == 1
    assert message in _one_line_error(capsys)
    assert main(["train", "--dataset", str(path), "--out", str(tmp_path / "run"), "--model", "mlp:8"]) == 1
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_not_an_archive_and_not_a_file(tmp_path, capsys):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["data", "check", str(tmp_path / "junk.npz")]) == 1
    assert "not an .npz archive" in _one_line_error(capsys)
    (tmp_path / "dir.npz").mkdir()
    assert main(["data", "check", str(tmp_path / "dir.npz")]) == 1
    assert "is a directory" in _one_line_error(capsys)
    assert main(["data", "check", str(tmp_path / "absent.npz")]) == 1
    assert "not found" in _one_line_error(capsys)


def test_uint8_images_and_class_names(tmp_path):
    images = np.arange(30 * 1 * 4 * 4, dtype=np.int64).reshape(30, 1, 4, 4) % 256
    labels = np.arange(30) % 3
    np.savez_compressed(
        tmp_path / "img.npz",
        x_train=images.astype(np.uint8),
        y_train=labels,
        x_test=images[:9].astype(np.uint8),
        y_test=labels[:9],
        class_names=np.array(["a", "b", "c"]),
    )
    ds = data.load(str(tmp_path / "img.npz"), "test")
    assert ds.image_shape == (1, 4, 4) and ds.class_names == ("a", "b", "c") and ds.images.dtype == np.uint8
    x, _ = ds.tensors()
    assert float(x.max()) <= 1.0 and x.shape == (9, 1, 4, 4)


def test_registered_folder_found_by_name(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    (root / "toyset").mkdir(parents=True)
    _write_npz(root / "toyset" / "data.npz")
    monkeypatch.setenv(data.ENV_VAR, str(root))
    try:
        assert main(["data", "check", "toyset"]) == 0
        out = capsys.readouterr().out
        assert "train    240" in out and "sha256" in out and "OK" in out
        assert main(["data", "list", "--json"]) == 0
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["toyset"]["path"] == str(root / "toyset" / "data.npz")
        assert main(["data", "check", "toyset", "--data-dir", str(root / "toyset")]) == 0  # the folder itself
        capsys.readouterr()
        run = tmp_path / "run"
        assert (
            main(
                [
                    "train",
                    "--dataset",
                    "toyset",
                    "--model",
                    "mlp:8",
                    "--likelihood",
                    "standard",
                    "--out",
                    str(run),
                    *TRAIN,
                ]
            )
            == 0
        )
        assert json.loads((run / "config.json").read_text())["dataset_file"] == str(root / "toyset" / "data.npz")
        monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "elsewhere"))
        assert main(["data", "check", "toyset"]) == 1
        assert "unknown data set 'toyset'" in _one_line_error(capsys)
    finally:
        data.unregister("toyset")


def test_feature_vectors_refuse_augment_and_cnn(workdir, capsys):
    assert _train(workdir / "run", "--augment", "10") == 1
    assert "augment transforms images" in _one_line_error(capsys)
    assert _train(workdir / "run", "--model", "cnn:4c3,10") == 1
    assert "cnn needs input_shape (channels, height, width)" in _one_line_error(capsys)
    assert _train(workdir / "run", "--dataset-sha256", "abc") == 1
    assert "dataset_sha256 must be 64 lowercase hex digits" in _one_line_error(capsys)
