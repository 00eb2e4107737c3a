"""``certbnn evaluate`` end to end on tiny trained runs: files, keys, consistency, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tinydata import separable_images

from certbnn import data, training
from certbnn.cli import main
from certbnn.config import make_config
from certbnn.errors import ConfigError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A robust BBB run and a robust SGD run on two separable 1x6x6 classes (plus an OOD set)."""
    rng = np.random.default_rng(0)
    images, labels = separable_images()
    data.register_arrays("tiny-eval", {"train": (images, labels), "test": (images[:60], labels[:60])}, num_classes=2)
    noise = rng.integers(0, 256, (60, 1, 6, 6)).astype(np.uint8)
    data.register_arrays("tiny-noise", {"train": (noise, labels[:60]), "test": (noise, labels[:60])}, num_classes=2)
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method, extra in (("bbb", {"lr": 0.01, "kl_weight": 0.01}), ("sgd", {"lr": 0.2})):
        config = make_config(
            {},
            dict(
                dataset="tiny-eval",
                model="mlp:16",
                method=method,
                likelihood="ibp",
                eps=0.05,
                epochs=6,
                batch_size=32,
                val_size=40,
                seed=1,
                **extra,
            ),
        )
        training.train(config, root / method, progress=False, log=lambda s: None)
        out[method] = root / method
    yield out
    data.unregister("tiny-eval")
    data.unregister("tiny-noise")


def test_evaluate_writes_everything(runs, capsys):
    run = runs["bbb"]
    status = main(
        [
            "evaluate",
            str(run),
            "--eps",
            "0.02,0.05",
            "--certificates",
            "per-sample,paper,statistical,weight-box,decision",
            "--samples",
            "8",
            "--pgd-steps",
            "10",
            "--ood",
            "tiny-noise",
            "--ood-fgsm-eps",
            "0.3",
            "--radius",
            "--no-progress",
            "--json",
        ]
    )
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "evaluation.json").read_text())
    assert printed == saved
    assert saved["clean"]["accuracy"] > 0.9 and 0 <= saved["clean"]["ece"] <= 1
    for row in saved["per_eps"]:
        for key in (
            "fgsm_accuracy",
            "pgd_accuracy",
            "paper_certified_accuracy",
            "statistical_certified_accuracy",
            "weight_box_certified_accuracy",
            "decision_certified_accuracy",
            "per_sample_certified_rate",
        ):
            assert 0.0 <= row[key] <= 1.0, key
    for row in saved["per_eps"]:  # the JSON contract of the issue
        for key in (
            "clean_accuracy",
            "fgsm_accuracy",
            "pgd_accuracy",
            "ece",
            "nll",
            "brier",
            "n_points",
            "n_samples",
            "ood_auroc",
        ):
            assert key in row, key
        assert set(row["certified_accuracy"]) == {"per-sample", "paper", "statistical", "weight-box", "decision"}
    for key in ("dataset", "model", "method", "likelihood", "eps_train", "seed", "certbnn_version", "device"):
        assert key in saved, key
    assert {"clean", "fgsm", "pgd", "certificate:paper", "ood"} <= set(saved["seconds_per_part"])
    assert saved["radius"]["certificate"] == "decision" and saved["radius"]["mean"] >= 0
    for row in saved["per_eps"]:  # weight box: a point counts only when its lower bound on P_rob reaches 0.5
        per_point = row["weight_box_log10_lower_per_point"]
        assert len(per_point) == saved["num_points"] and set(row["weight_box_log10_lower"]) == {
            "min",
            "q10",
            "median",
            "q90",
            "max",
        }
        reaching = sum(v is not None and v >= math.log10(0.5) for v in per_point) / len(per_point)
        assert row["weight_box_certified_accuracy"] <= reaching
        assert row["weight_box_certified_accuracy"] <= row["weight_box_verified_rate"]
    small, large = saved["per_eps"]
    assert small["paper_certified_accuracy"] >= large["paper_certified_accuracy"]
    assert "tiny-noise" in saved["ood"] and "fgsm-0.3" in saved["ood"]
    for plot in ("reliability.png", "certified_vs_eps.png", "entropy_hist.png"):
        assert (run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "report.md").read_text()
    assert "paper certified accuracy" in report and "![reliability.png]" in report
    assert "Weight-box certificate, eps 0.02: a box verified for" in report and "lower bound on P_rob (log10)" in report


def test_point_estimate_has_no_weight_box(runs, tmp_path, capsys):
    assert (
        main(
            [
                "evaluate",
                str(runs["sgd"]),
                "--certificates",
                "weight-box,per-sample",
                "--attacks",
                "",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["per_eps"][0]["weight_box"].startswith("not applicable")


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 1
    assert "not a training run" in capsys.readouterr().err
    assert main(["evaluate", str(runs["sgd"]), "--certificates", "magic"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "certbnn: error: unknown certificate(s) magic (known: per-sample, paper, statistical, weight-box, decision)"
    )
    assert main(["evaluate", str(runs["sgd"]), "--eps", "-1"]) == 1
    capsys.readouterr()
    assert main(["evaluate", str(runs["sgd"]), "--weight-box-refine", "-1"]) == 1
    assert capsys.readouterr().err.strip() == "certbnn: error: weight_box_refine must be >= 0 (an integer), got -1"


def test_points_first_or_spread_over_a_class_sorted_test_set():
    from certbnn.evaluation.runner import EvalOptions, _test_set

    images = np.zeros((100, 1, 2, 2), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 10)  # sorted by class, like the CIFAR-10 JPEG copy
    data.register_arrays("sorted-toy", {"test": (images, labels)}, num_classes=10)
    try:
        first = _test_set("sorted-toy", EvalOptions(limit=20), None)
        spread = _test_set("sorted-toy", EvalOptions(limit=20, points="spread"), None)
        assert first.class_counts() == [10, 10] + [0] * 8
        assert spread.class_counts() == [2] * 10
        assert len(_test_set("sorted-toy", EvalOptions(limit=500, points="spread"), None)) == 100
    finally:
        data.unregister("sorted-toy")
    with pytest.raises(ConfigError, match="points must be first or spread"):
        EvalOptions(points="random").validate()
