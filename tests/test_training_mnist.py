"""Every method on real MNIST (a 10k-image subset, a few epochs): the issue's acceptance checks.

Skipped where MNIST is absent; CI points CERTBNN_DATA at the shared copy. The
hyper-parameters are the ones documented in docs/training.md.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from certbnn import data, training
from certbnn.config import make_config

pytestmark = pytest.mark.realdata

QUIET = dict(progress=False, log=lambda s: None)
BASE = dict(
    dataset="mnist",
    model="mlp:512",
    limit_train=10000,
    epochs=3,
    batch_size=128,
    val_size=1000,
    val_samples=8,
    eps=0.1,
    seed=0,
    # the learning rates below were tuned for a constant rate over these few steps (VOGN: 93); the default
    # cosine decay (auto) starts at step 0 under the standard likelihood and cost VOGN 90.3 -> 88.7 % here
    lr_schedule="constant",
)
STANDARD = {
    "sgd": dict(lr=0.05, method_options={"prior_weight": 0.0}),
    "adam": dict(lr=1e-3, method_options={"prior_weight": 0.0}),
    "bbb": dict(lr=1e-3, kl_weight=0.01),
    "noisyadam": dict(lr=1e-3, kl_weight=0.01, method_options={"init_precision": 1e4}),
    "vogn": dict(lr=0.05, kl_weight=0.01, limit_train=4000, method_options={"init_precision": 1e4}),
    "swag": dict(lr=0.05, method_options={"prior_weight": 0.0, "burnin_epochs": 2, "snapshot_every": 20}),
    "sghmc": dict(
        epochs=4, prior_scale=10.0, method_options={"lr": 1e-5, "num_burnin": 200, "thin": 20, "temperature": 0.01}
    ),
}


@pytest.fixture(scope="module")
def mnist_available():
    if data.find_dataset(data.get_spec("mnist")) is None:
        pytest.skip("MNIST not available here")


@pytest.fixture(scope="module")
def sgd_run(mnist_available, tmp_path_factory):
    run = tmp_path_factory.mktemp("mnist") / "sgd"
    return run, training.train(
        make_config({}, {**BASE, "method": "sgd", "likelihood": "standard", **STANDARD["sgd"]}), run, **QUIET
    )


def test_sgd_standard(sgd_run):
    assert sgd_run[1]["test_accuracy"] > 0.90


@pytest.mark.parametrize("method", [m for m in STANDARD if m != "sgd"])
def test_every_method_learns_mnist(mnist_available, tmp_path, method):
    config = make_config({}, {**BASE, "method": method, "likelihood": "standard", **STANDARD[method]})
    metrics = training.train(config, tmp_path / method, **QUIET)
    assert metrics["test_accuracy"] > 0.90, metrics["final"]


def test_hmc_warm_started_from_sgd(sgd_run, tmp_path):
    config = make_config(
        {},
        {
            **BASE,
            "method": "hmc",
            "likelihood": "standard",
            "epochs": 6,
            "init_from": str(sgd_run[0]),
            "method_options": {"num_burnin": 2, "num_leapfrog": 10, "step_size": 5e-4},
        },
    )
    metrics = training.train(config, tmp_path / "hmc", **QUIET)
    assert metrics["test_accuracy"] > 0.90


@pytest.mark.parametrize("method", ["sgd", "bbb"])
def test_robust_likelihood_raises_certified_accuracy(mnist_available, tmp_path, method):
    results = {}
    for likelihood in ("standard", "ibp"):
        config = make_config({}, {**BASE, "method": method, "likelihood": likelihood, **STANDARD[method]})
        results[likelihood] = training.train(config, tmp_path / likelihood, **QUIET)["certified_accuracy_ibp"]
    assert results["ibp"] >= results["standard"] + 0.3, results


def test_same_seed_same_posterior_bit_for_bit(mnist_available, tmp_path):
    config = make_config(
        {}, {**BASE, "method": "bbb", "likelihood": "ibp", "epochs": 1, "limit_train": 2000, **STANDARD["bbb"]}
    )
    for name in ("a", "b"):
        training.train(config, tmp_path / name, **QUIET)
    a, b = (load_file(tmp_path / n / training.POSTERIOR) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
