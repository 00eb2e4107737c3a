"""Plots: full certified-accuracy curves from radii, distinct curve styles, reliability bin counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba

from certbnn.evaluation import plots
from certbnn.evaluation.metrics import expected_calibration_error, reliability_diagram
from certbnn.reproduce.report import cell_curves, write_report


def test_certified_curve_is_the_survival_function_of_the_radii():
    rng = np.random.default_rng(0)
    radii = np.where(rng.random(500) < 0.2, 0.0, rng.random(500) * 0.3)
    grid = np.linspace(0, 0.4, 200)
    curve = plots.certified_curve(radii, grid)
    assert np.all(np.diff(curve) <= 0)  # non-increasing in eps
    assert curve[0] == pytest.approx(np.mean(radii > 0))  # radius 0 never counts, even at eps 0
    assert curve[-1] == 0.0
    e = grid[57]
    assert curve[57] == pytest.approx(np.mean((radii >= e) & (radii > 0)))
    assert plots.certified_curve([0.1, 0.2], [0.1, 0.15, 0.2, 0.21]).tolist() == [1.0, 0.5, 0.5, 0.0]


def _curves(n: int) -> list[plots.Curve]:
    rng = np.random.default_rng(1)
    return [
        plots.Curve(
            f"run {i}",
            radii=rng.random(50) * 0.2,
            eps_max=0.2,
            points=[(0.05, 0.6 - 0.1 * i), (0.1, 0.4 - 0.1 * i)],
            points_label="paper certificate",
        )
        for i in range(n)
    ]


def test_every_curve_has_its_own_colour_and_marker(tmp_path):
    _, axes = plots.figure()
    plots.draw_certified_curves(axes[0][0], _curves(4))
    lines = axes[0][0].get_lines()
    assert len(lines) == 8  # radii curve + evaluated points per run
    for i in range(4):
        full, pts = lines[2 * i], lines[2 * i + 1]
        assert to_rgba(full.get_color()) == to_rgba(pts.get_color())  # one run, one colour
        assert full.get_marker() == pts.get_marker()
        ys = full.get_ydata()
        assert np.all(np.diff(ys) <= 0) and full.get_xdata()[-1] == pytest.approx(0.2)
    colours = {to_rgba(line.get_color()) for line in lines[::2]}
    markers = {line.get_marker() for line in lines[::2]}
    assert len(colours) == 4 and len(markers) == 4
    assert len({to_rgba(plots.curve_style(i)["color"]) for i in range(len(plots.COLOURS))}) == len(plots.COLOURS)
    path = plots.certified_plot(_curves(2), tmp_path / "sub" / "cert.png", title="t")
    assert path.read_bytes().startswith(b"\x89PNG")


def _bins(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, 10, generator=g), -1)
    y = torch.randint(0, 10, (n,), generator=g)
    return expected_calibration_error(probs, y)[1]


def test_reliability_bin_counts_sum_to_the_number_of_points(tmp_path):
    series = [
        ("a", {k: v.numpy() for k, v in _bins(300, 0).items()}),
        ("b", {k: v.numpy() for k, v in _bins(120, 1).items()}),
    ]
    _, axes = plots.figure((4, 5), 2, 1)
    plots.draw_reliability(axes[0][0], axes[1][0], series)
    bars = axes[1][0].patches
    assert len(bars) == 2 * 15
    assert sum(b.get_height() for b in bars[:15]) == 300 and sum(b.get_height() for b in bars[15:]) == 120
    assert {to_rgba(b.get_facecolor()) for b in bars[:15]} != {to_rgba(b.get_facecolor()) for b in bars[15:]}
    labels = [t.get_text() for t in axes[1][0].texts]
    assert sum(int(t) for t in labels) == 420  # each non-empty bar annotated with its count
    assert reliability_diagram(_bins(50, 2), tmp_path / "rel.png").read_bytes().startswith(b"\x89PNG")


def _cell(method: str, mode: str, radii: list[float] | None, paper: float) -> dict:
    bins = _bins(40, 3)
    evaluation = {
        "per_eps": [
            {"eps": e, "clean_accuracy": 0.9, "pgd_accuracy": 0.5, "certified_accuracy": {"paper": paper - e}}
            for e in (0.05, 0.1)
        ],
        "clean": {
            "ece": 0.05,
            "nll": 0.3,
            "entropy": 0.4,
            "reliability": {k: bins[k].tolist() for k in ("confidence", "accuracy", "count")},
        },
        "num_points": 40,
        "num_samples": 4,
    }
    if radii is not None:
        evaluation["radius"] = {"certificate": "decision", "per_point": radii, "eps_max": 0.2}
    return {
        "id": f"e/{method}/{mode}",
        "experiment": "e",
        "dataset": "toy",
        "model": "mlp:8",
        "method": method,
        "mode": mode,
        "sweep": {},
        "status": "done",
        "evaluation": evaluation,
        "config": {"eps": 0.1, "epochs": 1, "likelihood": "standard" if mode == "standard" else "ibp"},
        "evaluate_options": {"pgd_steps": 5, "bound": "ibp", "points": "first", "eps": [0.05, 0.1]},
        "train_seconds": 1.0,
        "eval_seconds": 1.0,
        "seconds_per_epoch": 1.0,
        "num_train": 10,
    }


def test_report_draws_radius_curves_and_count_histograms(tmp_path):
    cells = {
        c["id"]: c
        for c in (
            _cell("bbb", "standard", [0.0, 0.01, 0.02] * 10 + [0.0] * 10, 0.3),
            _cell("bbb", "ibp", [0.1, 0.15, 0.12, 0.0] * 10, 0.8),
        )
    }
    curves = cell_curves([("bbb/standard", cells["e/bbb/standard"]), ("bbb/ibp", cells["e/bbb/ibp"])], "paper")
    assert [c.label for c in curves] == ["bbb/standard", "bbb/ibp"]
    assert len(curves[1].radii) == 40 and np.allclose(curves[1].points, [(0.05, 0.75), (0.1, 0.7)])
    results = {"preset": "p", "cells": cells, "experiments": [{"name": "e", "dataset": "toy"}], "machine": {}}
    report = write_report(results, tmp_path).read_text()
    for plot in ("certified_vs_eps_e.png", "reliability_e.png"):
        assert f"]({plot})" in report and (tmp_path / plot).read_bytes().startswith(b"\x89PNG")
