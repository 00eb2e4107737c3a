"""The Python API (certbnn.fit / certify / attack / save / load): round trips, determinism,
one-line errors, and the same numbers as the CLI's functions (train, evaluate_run, the certificates)."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from interrupt import killed_after_epoch
from tinydata import separable_images
from torch import nn

import certbnn
from certbnn import data
from certbnn.errors import CertbnnError, ConfigError
from certbnn.evaluation import certify as certificates
from certbnn.evaluation.runner import EvalOptions, evaluate_run
from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior, SamplePosterior

QUIET = {"progress": False}
FAST = {"eps": 0.05, "epochs": 3, "batch_size": 32, **QUIET}


@pytest.fixture(scope="module")
def arrays():
    x, y = separable_images(240)
    return x, y, x[:40], y[:40]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 2))


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_certify_attack_save_load_round_trip(tmp_path, arrays):
    x, y, xt, yt = arrays
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    post = certbnn.fit(model, (x, y), lr=0.01, test_data=(xt, yt), **FAST)
    assert isinstance(post.posterior, GaussianPosterior) and post.metadata["method"] == "bbb"
    assert post.metadata["temperature"]["temperature"] == 0.01  # the CLI's default tempered posterior
    assert post.metrics["test_accuracy"] >= 0.9 and post.run_dir is None
    assert tensors_equal(model.state_dict(), before)  # the module's own weights are never changed

    report = certbnn.certify(model, post, xt, yt, eps=0.05, **QUIET)
    assert report.certificate == "statistical" and report.certified.shape == (40,)
    assert report.certified_accuracy == pytest.approx(float((report.certified & report.correct).double().mean()))
    assert report.certified_fraction == pytest.approx(float(report.certified.double().mean()))
    assert report.certified_accuracy >= 0.5 and {"p_hat", "lower", "upper"} <= set(report.details)
    assert bool(((report.details["lower"] >= 0.5) == report.certified).all())
    report.write_json(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["certified"] == report.certified.tolist()

    adv = certbnn.attack(model, post, xt, yt, eps=0.05, method="pgd", steps=5, **QUIET)
    clean = torch.from_numpy(xt).float() / 255
    assert adv.x_adv.shape == clean.shape and float((adv.x_adv - clean).abs().max()) <= 0.05 + 1e-6
    assert 0 <= adv.adversarial_accuracy <= adv.clean_accuracy
    # the statistical certificate is sound: a certified, correct point resists the attack
    assert adv.adversarial_accuracy >= report.certified_accuracy - 0.05

    path = certbnn.save(post, tmp_path / "post.safetensors", model=model)
    back = certbnn.load(path, model=model)
    assert tensors_equal(back.posterior.mean(), post.posterior.mean())
    assert tensors_equal(back.posterior.std(), post.posterior.std())
    assert back.metadata["method"] == "bbb" and back.metrics == post.metrics
    with pytest.raises(ConfigError, match="does not match the model architecture"):
        certbnn.load(path, model=nn.Sequential(nn.Flatten(), nn.Linear(36, 2)))


def test_same_seed_same_posterior_and_other_seed_another(arrays):
    x, y, _, _ = arrays
    first = certbnn.fit(mlp(), (x, y), seed=5, **FAST).posterior
    again = certbnn.fit(mlp(), (x, y), seed=5, **FAST).posterior
    other = certbnn.fit(mlp(), (x, y), seed=6, **FAST).posterior
    assert tensors_equal(first.mean(), again.mean()) and tensors_equal(first.std(), again.std())
    assert not tensors_equal(first.mean(), other.mean())


def test_a_dataloader_or_dataset_trains_like_the_arrays_it_holds(arrays):
    x, y, _, _ = arrays
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=50
    )
    from_loader = certbnn.fit(mlp(), loader, method="sgd", **FAST).posterior
    from_arrays = certbnn.fit(mlp(), (x, y), method="sgd", **FAST).posterior
    from_dataset = certbnn.fit(mlp(), data.ArrayDataset(x, y, 2), method="sgd", **FAST).posterior
    assert isinstance(from_loader, SamplePosterior)
    assert tensors_equal(from_loader.sample(None), from_arrays.sample(None))
    assert tensors_equal(from_dataset.sample(None), from_arrays.sample(None))


def test_kill_and_resume_gives_the_uninterrupted_posterior(tmp_path, arrays, monkeypatch):
    x, y, _, _ = arrays
    whole = certbnn.fit(mlp(), (x, y), out=tmp_path / "whole", **FAST)
    assert whole.run_dir == tmp_path / "whole" and (tmp_path / "whole" / "checkpoint.safetensors").exists()
    with killed_after_epoch(monkeypatch, 2):
        certbnn.fit(mlp(), (x, y), out=tmp_path / "killed", **FAST)
    with pytest.raises(CertbnnError, match="already holds a run; use --resume"):
        certbnn.fit(mlp(), (x, y), out=tmp_path / "killed", **FAST)
    with pytest.raises(ConfigError, match="different configuration"):  # other data: refused
        certbnn.fit(mlp(), (x[::-1].copy(), y[::-1].copy()), out=tmp_path / "killed", resume=True, **FAST)
    with pytest.raises(ConfigError, match="resume=True continues the run in out="):
        certbnn.fit(mlp(), (x, y), resume=True, **FAST)
    resumed = certbnn.fit(mlp(), (x, y), out=tmp_path / "killed", resume=True, **FAST)
    assert tensors_equal(resumed.posterior.mean(), whole.posterior.mean())
    assert tensors_equal(resumed.posterior.std(), whole.posterior.std())
    assert not data.known_datasets() or all(not n.startswith("arrays-") for n in data.known_datasets())


def test_point_mass_certify_equals_the_certificate_function(arrays):
    _, _, xt, yt = arrays
    model = certbnn.fit(mlp(), (arrays[0], arrays[1]), method="sgd", lr=0.2, **FAST)
    trained = mlp()
    trained.load_state_dict({k: v[0] for k, v in model.posterior.sample(None).items()})
    report = certbnn.certify(trained, None, xt, yt, eps=0.05, **QUIET)
    assert report.certificate == "per-sample" and report.settings["samples"] == 1
    x = torch.from_numpy(xt).float() / 255
    params = certbnn.point_mass(trained).sample(None)
    expected = certificates.per_sample_certified(trained, params, x, torch.from_numpy(yt), 0.05, dtype=torch.float64)[0]
    assert torch.equal(report.certified, expected) and report.certified.any()
    # the same network as a one-sample posterior (what sgd returns) gives the same decisions
    same = certbnn.certify(mlp(), model, xt, yt, eps=0.05, **QUIET)
    assert torch.equal(same.certified, report.certified)
    decision = certbnn.certify(trained, None, xt, yt, eps=0.05, certificate="decision", **QUIET)
    assert bool((decision.certified >= report.certified).all())  # one network: per-sample implies decision


def test_certify_and_attack_equal_certbnn_evaluate(tmp_path, arrays):
    """A run fitted with a registry spec, evaluated by the CLI's evaluate_run and by the API: same numbers."""
    x, y, xt, yt = arrays
    post = certbnn.fit("mlp:16", (x, y), test_data=(xt, yt), out=tmp_path / "run", **FAST)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    data.register_arrays(config["dataset"], {"train": (x, y), "test": (xt, yt)}, num_classes=2)
    try:
        options = EvalOptions(
            eps=[0.05],
            attacks=["pgd"],
            certificates=["statistical", "decision", "per-sample"],
            limit=None,
            samples=8,
            pgd_steps=5,
            device="cpu",
            seed=3,
        )
        results = evaluate_run(tmp_path / "run", options, out_dir=tmp_path / "eval", progress=False)
    finally:
        data.unregister(config["dataset"])
    row = results["per_eps"][0]
    model = build_model("mlp:16", (1, 6, 6), 2)
    common = {"samples": 8, "seed": 3, "device": "cpu", **QUIET}
    for name in ("statistical", "decision", "per-sample"):
        report = certbnn.certify(model, post, xt, yt, eps=0.05, certificate=name, **common)
        key = name.replace("-", "_")
        assert report.certified_accuracy == row[f"{key}_certified_accuracy"], name
        assert report.summary == {k: v for k, v in row.items() if k.startswith(key)}, name
    adv = certbnn.attack(model, post, xt, yt, eps=0.05, steps=5, **common)
    assert adv.adversarial_accuracy == row["pgd_accuracy"] and adv.adversarial_nll == row["pgd_nll"]
    assert adv.clean_accuracy == results["clean"]["accuracy"]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


BAD_FIT = [
    (lambda x, y: ((x.astype(np.float32) / 255 * np.nan, y), {}), "contains NaN"),
    (lambda x, y: ((x.astype(np.float32), y), {}), r"must lie in \[0, 1\]"),
    (lambda x, y: ((x[:, 0], y), {}), r"must have shape \(N, C, H, W\) or \(N, D\)"),
    (lambda x, y: ((x, y[:-1]), {}), r"train_data y must have shape \(240,\)"),
    (lambda x, y: ((x, y + 5), {}), r"labels 5\.\.6, but the model has 2 outputs"),
    (lambda x, y: ((x, y.astype(np.float32)), {}), "must be integer class labels"),
    (lambda x, y: ((x.astype(np.int32), y), {}), "floats in"),
    (lambda x, y: ((x, y), {"method": "nope"}), "unknown inference method 'nope'"),
    (lambda x, y: ((x, y), {"likelihood": "nope"}), "unknown likelihood 'nope'"),
    (lambda x, y: ((x, y), {"eps": float("nan")}), "eps must be"),
    (lambda x, y: ((x, y), {"epochs": 0}), "epochs must be"),
    (lambda x, y: ((x, y), {"colour": "red"}), "unknown setting"),
    (lambda x, y: ((x, y), {"dataset": "mnist"}), "not the setting.* dataset"),
    (lambda x, y: ((x, y), {"method_options": {"bogus": 1}}), r"method .bbb.: unknown option\(s\) bogus"),
    (lambda x, y: ((x,), {}), "train_data: batch 0 is not an"),
    (lambda x, y: ("mnist", {}), "train_data must be"),
    (lambda x, y: (iter([]), {}), "holds no batches"),
]


@pytest.mark.parametrize("case, phrase", BAD_FIT)
def test_bad_fit_input_is_one_line_before_any_work(tmp_path, arrays, case, phrase):
    x, y, _, _ = arrays
    train_data, settings = case(x, y)
    with pytest.raises(ConfigError) as excinfo:
        certbnn.fit(mlp(), train_data, out=tmp_path / "run", **{**FAST, **settings})
    assert re.search(phrase, one_line(excinfo)), str(excinfo.value)
    assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_run_on_the_data_is_one_line(arrays):
    x, y, _, _ = arrays
    with pytest.raises(ConfigError) as excinfo:
        certbnn.fit(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), (x, y), **FAST)
    assert "cannot run on train_data's images of shape (1, 6, 6)" in one_line(excinfo)


def test_bad_certify_and_attack_input_is_one_line(arrays):
    _, _, xt, yt = arrays
    model = mlp()
    cases = [
        (lambda: certbnn.certify(model, None, xt, yt, certificate="nope"), "unknown certificate(s) nope"),
        (lambda: certbnn.certify(model, None, xt, yt, certificate="weight-box"), "needs a Gaussian posterior"),
        (lambda: certbnn.certify(model, None, xt, yt + 2), "labels 2..3, but the model has 2 outputs"),
        (lambda: certbnn.certify(model, None, xt, yt[:5]), "y must have shape (40,)"),
        (lambda: certbnn.certify(model, None, xt * 1.0, yt), "x must lie in [0, 1]"),
        (lambda: certbnn.certify(model, None, xt, yt, eps=-0.1), "eps"),
        (lambda: certbnn.certify(model, None, xt, yt, eps=[0.1, 0.2]), "eps must be one radius"),
        (lambda: certbnn.certify(model, None, xt, yt, confidence=1.5), "confidence"),
        (lambda: certbnn.certify(model, certbnn.point_mass(nn.Linear(36, 2)), xt, yt), "does not match the model"),
        (lambda: certbnn.certify(model, "post.safetensors", xt, yt), "expected a posterior or a FitResult"),
        (lambda: certbnn.attack(model, None, xt, yt, method="cw"), "unknown attack(s) cw"),
        (lambda: certbnn.attack(model, None, xt, yt, steps=0), "pgd_steps"),
    ]
    for call, phrase in cases:
        with pytest.raises(ConfigError) as excinfo:
            call()
        assert phrase in one_line(excinfo), phrase


def readme_api_block() -> str:
    """The first ```python block of the README's "Python API" section, verbatim."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


def test_the_readme_api_block_runs_as_written(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 134)
    x = rng.integers(0, 40, (134, 1, 10, 10)).astype(np.uint8)
    for label in range(10):  # a learnable pattern: a bright row per class
        x[y == label, :, label, 1:9] = 230
    namespace = {"x_train": x[:128], "y_train": y[:128], "x_test": x[128:], "y_test": y[128:]}
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_api_block(), "README.md", "exec"), namespace)  # noqa: S102 -- the README, as written
    printed = capsys.readouterr().out
    assert "certified accuracy" in printed and "PGD accuracy" in printed
    assert isinstance(namespace["post"], certbnn.FitResult) and (tmp_path / "post.safetensors").is_file()
    assert namespace["report"].certified.shape == (6,) and namespace["adv"].x_adv.shape == (6, 1, 10, 10)


def test_fit_and_certify_feature_vectors():
    """(N, D) feature arrays train and certify like images (an MLP without Flatten)."""
    rng = np.random.default_rng(0)
    x = rng.random((128, 12)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    post = certbnn.fit(model, (x, y), method="sgd", likelihood="ibp", eps=0.01, epochs=2, progress=False)
    report = certbnn.certify(model, post, x[:16], y[:16], eps=0.01, certificate="paper")
    assert 0.0 <= report.certified_fraction <= 1.0 and len(report.certified) == 16
