"""The report's clean vs certified front: Pareto set, table order, target line, plots, preset keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from certbnn.errors import ConfigError
from certbnn.evaluation import plots
from certbnn.reproduce import load_preset
from certbnn.reproduce.grid import _check_front_files
from certbnn.reproduce.report import pareto_front, report_files, target_sentence, write_report
from certbnn.reproduce.runner import run_grid

# (experiment, sweep point, clean, certified): B and C tie, D is dominated by B, E by A (same clean)
CELLS = [
    ("eps", {"eps": 0.05}, 0.98, 0.80),  # A
    ("eps", {"eps": 0.11}, 0.97, 0.90),  # B
    ("lam", {"lam": 0.5}, 0.97, 0.90),  # C
    ("lam", {"lam": 0.25}, 0.96, 0.85),  # D
    ("lr", {"lr": 0.01}, 0.98, 0.75),  # E
    ("lr", {"lr": 0.001}, 0.95, 0.92),  # F
    ("lr", {"lr": 0.1}, 0.99, 0.50),  # H
]
IDS = [f"{exp}/bbb/ibp/" + "/".join(f"{k}={v}" for k, v in point.items()) for exp, point, _, _ in CELLS]
A, B, C, D, E, F, H = IDS
FRONT_ORDER = [F, B, C, A, H]  # by certified accuracy, descending (B before C: a tie keeps run order)


def _cell(experiment: str, point: dict, clean: float, certified: float, dataset: str = "mnist") -> dict:
    cell_id = f"{experiment}/bbb/ibp/" + "/".join(f"{k}={v}" for k, v in point.items())
    rows = [
        {
            "eps": eps,
            "clean_accuracy": clean,
            "pgd_accuracy": certified + 0.02,
            "certified_accuracy": {"per-sample": certified - 0.01, "paper": certified - (0.1 - eps)},
        }
        for eps in (0.05, 0.1)
    ]
    return {
        "id": cell_id,
        "experiment": experiment,
        "dataset": dataset,
        "model": "mlp:512",
        "method": "bbb",
        "mode": "ibp",
        "sweep": point,
        "status": "done",
        "evaluation": {
            "per_eps": rows,
            "clean": {"ece": 0.01, "nll": 0.1, "entropy": 0.2},
            "num_points": 1000,
            "num_samples": 8,
        },
        "config": {"eps": 0.11, "epochs": 5, "likelihood": "ibp"},
        "evaluate_options": {"pgd_steps": 20, "bound": "ibp", "points": "first", "eps": [0.05, 0.1]},
        "train_seconds": 40.0 + 10 * len(cell_id),
        "eval_seconds": 5.0,
        "seconds_per_epoch": 8.0,
        "num_train": 59000,
    }


def _results(front=True, target=None, cells=CELLS, experiments=("eps", "lam", "lr"), dataset="mnist") -> dict:
    made = [_cell(exp, point, clean, cert, dataset) for exp, point, clean, cert in cells]
    results = {
        "preset": "tune",
        "cells": {c["id"]: c for c in made},
        "experiments": [{"name": name, "dataset": dataset} for name in experiments],
        "machine": {},
    }
    if front is not None:
        results["front"] = front
    if target is not None:
        results["target"] = target
    return results


def _front_table(report: str) -> list[list[str]]:
    section = report[report.index("## Clean vs certified front") :]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[field.strip() for field in row.strip("|").split("|")] for row in rows]


def test_pareto_front_keeps_ties_and_drops_dominated_points():
    points = [(clean, cert) for _, _, clean, cert in CELLS]
    assert [IDS[i] for i in pareto_front(points)] == [A, B, C, F, H]
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 0.5)]) == [0]
    assert pareto_front([(0.9, 0.5), (0.9, 0.6), (0.8, 0.6)]) == [1]  # one better coordinate is enough
    assert pareto_front([(0.9, 0.5), (0.9, 0.5)]) == [0, 1]  # equal points dominate neither


def test_front_section_follows_the_experiments_and_lists_the_pareto_cells_by_certified_accuracy(tmp_path):
    report = write_report(_results(), tmp_path).read_text()
    front_at = report.index("## Clean vs certified front")
    assert all(report.index(f"## {exp}:") < front_at for exp in ("eps", "lam", "lr"))
    header, *rows = _front_table(report)
    assert header == ["#", "cell", "clean %", "PGD %", "per-sample certified %", "paper certified %", "train s"]
    assert [row[1].strip("`") for row in rows] == FRONT_ORDER  # D and E are dominated
    assert [row[0] for row in rows] == ["1", "2", "3", "4", "5"]  # the plot's tags
    f_row = rows[0]
    assert f_row[2:6] == ["95.0", "94.0", "91.0", "92.0"]  # the headline (last) eps; paper is the headline
    assert f_row[6] == f"{40 + 10 * len(F)}"
    assert "paper-certificate certified accuracy at eps 0.1" in report
    assert "Target" not in report  # no target given
    assert "![front.png](front.png)" in report
    png = (tmp_path / "front.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    image = imread(tmp_path / "front.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
    assert "front.png" in report_files(["eps", "lam", "lr"], ["mnist"])


def test_front_plot_joins_the_front_in_order_of_clean_accuracy_and_numbers_it_in_the_legend():
    _, axes = plots.figure()
    ax = axes[0][0]
    series = [("eps", [(98.0, 80.0), (97.0, 90.0)]), ("lr", [(95.0, 92.0), (96.0, 85.0)])]
    front = [("f", 95.0, 92.0), ("b", 97.0, 90.0), ("c", 97.0, 90.0), ("a", 98.0, 80.0)]
    plots.draw_front(ax, series, front, target=(97.0, None))
    line = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
    assert list(line.get_xdata()) == [95.0, 97.0, 98.0] and list(line.get_ydata()) == [92.0, 90.0, 80.0]
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2,3", "4"]  # a tie shares one tag
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["eps (2)", "lr (2)", "Pareto front", "1: f", "2: b", "3: c", "4: a", "target"]
    markers = [c.get_paths()[0].vertices.shape for c in ax.collections]
    assert len(ax.collections) == 2 and markers[0] != markers[1]  # one marker per experiment


def test_target_met_names_the_best_cell_meeting_it(tmp_path):
    report = write_report(_results(target={"clean": 0.97, "certified": 0.90}), tmp_path).read_text()
    assert f"Target (clean >= 97.0 %, certified >= 90.0 %): met by `{B}` (clean 97.0 %, certified 90.0 %; " in report
    assert "2 of 7 cells meet it" in report
    only_certified = {"certified": 0.91}
    scored = [(cell_id, clean, cert) for cell_id, (_, _, clean, cert) in zip(IDS, CELLS)]
    assert target_sentence(only_certified, scored).startswith(f"Target (certified >= 91.0 %): met by `{F}`")


def test_target_not_met_names_the_cell_with_the_smallest_largest_shortfall(tmp_path):
    report = write_report(_results(target={"clean": 0.99, "certified": 0.90}), tmp_path).read_text()
    # shortfalls (largest of the two): A 0.10, B and C 0.02, D 0.05, E 0.15, F 0.04, H 0.40
    assert (
        f"Target (clean >= 99.0 %, certified >= 90.0 %): not met; closest: `{B}` "
        "(clean 97.0 %, certified 90.0 %; 2.0 points short)." in report
    )
    scored = [("x", 0.97, 0.80), ("y", 0.90, 0.88)]
    assert "closest: `y`" in target_sentence({"clean": 0.95, "certified": 0.90}, scored)  # 0.05 < 0.10


def test_a_float32_accuracy_meets_a_target_equal_to_it():
    clean, certified = float(np.float32(0.9)), float(np.float32(0.7))  # each just below 0.9 / 0.7
    assert clean < 0.9 and certified < 0.7
    assert "met by `a`" in target_sentence({"clean": 0.9, "certified": 0.7}, [("a", clean, certified)])


def test_one_front_plot_per_data_set_when_the_preset_has_several(tmp_path):
    results = _results(cells=CELLS[:4], experiments=("eps", "lam"))
    other = _cell("fashion", {"lam": 0.5}, 0.85, 0.6, dataset="fashion-mnist")
    results["cells"][other["id"]] = other
    results["experiments"].append({"name": "fashion", "dataset": "fashion-mnist"})
    report = write_report(results, tmp_path).read_text()
    assert report.count("## Clean vs certified front") == 1
    assert "### mnist" in report and "### fashion-mnist" in report
    for name in ("front_mnist.png", "front_fashion-mnist.png"):
        assert f"]({name})" in report and (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "front.png").exists()
    assert {"front_mnist.png", "front_fashion-mnist.png"} <= set(report_files([], ["mnist", "fashion-mnist"]))


def test_without_front_the_report_has_no_front_section(tmp_path):
    for front in (None, False):
        report = write_report(_results(front=front, target={"clean": 0.9}), tmp_path).read_text()
        assert "Clean vs certified front" not in report and "Target" not in report
        assert not list(tmp_path.glob("front*.png"))


PRESET = """
[preset]
name = "tune"
{header}
[modes.ibp]
likelihood = "ibp"
[[experiment]]
name = "eps"
dataset = "mnist"
methods = ["bbb"]
sweep = {{ eps = [0.05, 0.11] }}
"""


def _preset(tmp_path, header: str):
    path = tmp_path / "tune.toml"
    path.write_text(PRESET.format(header=header))
    return load_preset(str(path))


def test_front_and_target_parse_and_reach_results_json(tmp_path):
    preset = _preset(tmp_path, "front = true\ntarget = { clean = 0.97, certified = 0.9 }")
    assert preset.front is True and preset.target == {"clean": 0.97, "certified": 0.9}
    plain = _preset(tmp_path, 'description = "no front"')
    assert plain.front is False and plain.target is None
    results = run_grid(preset, tmp_path / "out", cells=[], progress=False, log=lambda line: None)  # trains nothing
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["front"] is True and saved["target"] == {"clean": 0.97, "certified": 0.9} == results["target"]


def test_target_survives_warm_started_cells(tmp_path):
    """A preset with a target and cells started from another cell (``init_from = "cell:sgd"``):
    the cell reference once overwrote the preset's target with "sgd", and the report then
    crashed after the first finished cell, stopping the grid."""
    path = tmp_path / "warm.toml"
    path.write_text(
        PRESET.format(header="front = true\ntarget = { clean = 0.55, certified = 0.4 }").replace(
            'methods = ["bbb"]', 'methods = ["sgd", "bbb"]\nmethod_settings.bbb = { init_from = "cell:sgd" }'
        )
    )
    preset = load_preset(str(path))
    assert preset.target == {"clean": 0.55, "certified": 0.4}
    assert [c.depends_on for c in preset.cells if c.method == "bbb"] == [
        c.id for c in preset.cells if c.method == "sgd"
    ]
    assert load_preset("cifar").target == {"clean": 0.55, "certified": 0.4}


@pytest.mark.parametrize(
    "header, message",
    [
        ('front = "yes"', "\\[preset\\]: front must be true or false, got 'yes'"),
        ("front = true\ntarget = { clean = 2 }", "target.clean must be a number in \\[0, 1\\] .*got 2$"),
        ("front = true\ntarget = { certified = -0.1 }", "target.certified must be a number in \\[0, 1\\]"),
        ("front = true\ntarget = { clean = true }", "target.clean must be a number in \\[0, 1\\] .*got True"),
        ("front = true\ntarget = { clean = nan }", "target.clean must be a number in \\[0, 1\\]"),
        ("front = true\ntarget = { clean = 0.9, robust = 0.5 }", "target: unknown key\\(s\\) robust"),
        ("front = true\ntarget = 0.9", "target must be a table such as"),
        ("front = true\ntarget = {}", "target must be a table such as"),
        ("target = { clean = 0.9 }", "target needs front = true"),
        ("fronts = true", "\\[preset\\]: unknown key\\(s\\) fronts \\(known: description, front, name, target\\)"),
    ],
)
def test_bad_front_keys_are_one_line_config_errors(tmp_path, header, message):
    with pytest.raises(ConfigError, match=message) as info:
        _preset(tmp_path, header)
    assert "\n" not in str(info.value)


def test_data_sets_sharing_a_front_plot_name_are_refused():
    _check_front_files(["mnist", "fashion-mnist", "mnist"], "p.toml")  # one data set in two experiments
    with pytest.raises(ConfigError, match="'d/a b.npz' and 'd/A_b.npz' would share the front plot front_d_A_b.npz.png"):
        _check_front_files(["d/a b.npz", "d/A_b.npz"], "p.toml")
