"""``certbnn reproduce`` and ``certbnn demo`` end to end on tiny data: report, resume, refusals, failures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinydata import separable_images

from certbnn import data
from certbnn.cli import main
from certbnn.reproduce.demo import run_demo, summary

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from make_datafiles import write_mnist_dir  # noqa: E402

PRESET = """
[preset]
name = "tiny"
description = "a tiny grid"
[train]
epochs = 2
batch_size = 32
val_size = 40
val_samples = 2
eps = 0.1
[evaluate]
limit = 40
samples = 4
eps = [0.05, 0.1]
pgd_steps = 3
certificates = ["per-sample", "paper"]
ood_fgsm_eps = 0.3
[methods.sgd]
lr = 0.05
method_options = { prior_weight = 0.0 }
[methods.hmc]
init_from = "cell:sgd"
epochs = 3
method_options = { num_burnin = 1, num_leapfrog = 3, step_size = 0.0005 }
[modes.standard]
likelihood = "standard"
[modes.ibp]
likelihood = "ibp"
[[experiment]]
dataset = "tiny-grid"
model = "mlp:16"
methods = ["sgd", "hmc"]
modes = ["standard", "ibp"]
[[experiment]]
name = "lam"
dataset = "tiny-grid"
model = "mlp:16"
methods = ["sgd"]
modes = ["ibp"]
sweep = { lam = [0.0, 1.0] }
"""

CELLS = [
    "tiny-grid/sgd/standard",
    "tiny-grid/hmc/standard",
    "tiny-grid/sgd/ibp",
    "tiny-grid/hmc/ibp",
    "lam/sgd/ibp/lam=0.0",
    "lam/sgd/ibp/lam=1.0",
]


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory):
    images, labels = separable_images()
    data.register_arrays("tiny-grid", {"train": (images, labels), "test": (images[:60], labels[:60])}, num_classes=2)
    path = tmp_path_factory.mktemp("preset") / "tiny.toml"
    path.write_text(PRESET)
    yield path
    data.unregister("tiny-grid")


def _reproduce(preset_file, out, *extra):
    return main(
        ["reproduce", "--preset", str(preset_file), "--out", str(out), "--device", "cpu", "--no-progress", *extra]
    )


def _posteriors(out: Path) -> dict[str, int]:
    return {p.parent.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/run/posterior.safetensors")}


@pytest.fixture(scope="module")
def finished_grid(preset_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "out"
    assert _reproduce(preset_file, out) == 0
    return out


def test_grid_writes_results_report_and_plots(finished_grid):
    results = json.loads((finished_grid / "results.json").read_text())
    assert list(results["cells"]) == CELLS
    assert all(c["status"] == "done" for c in results["cells"].values())
    # machine-readable and portable: no path of this machine (output folder, data root) inside,
    # besides the command line and preset file exactly as the user typed them
    typed = {k: v for k, v in results.items() if k not in ("command", "source")}
    for entry in typed["cells"].values():
        assert entry.pop("invocation") == results["command"]  # one invocation, without --only, trained all
    assert str(finished_grid) not in json.dumps(typed)
    assert all(not Path(c["dir"]).is_absolute() and "/" not in c["data_source"] for c in results["cells"].values())
    assert results["machine"]["device"] == "cpu" and results["preset"] == "tiny"
    cell = results["cells"]["tiny-grid/hmc/ibp"]
    assert cell["config"]["likelihood"] == "ibp" and cell["config"]["init_from"] == "cell:sgd"
    assert [row["eps"] for row in cell["evaluation"]["per_eps"]] == [0.05, 0.1]
    assert cell["evaluation"]["clean"]["reliability"]["count"]
    report = (finished_grid / "RESULTS.md").read_text()
    assert "| method | standard | ibp |" in report and "| sgd |" in report and "| hmc |" in report
    # each method's own epochs and its warm start are named, not only the first cell's
    assert "Training eps 0.1; 2 epochs on 200 training images (hmc: 3 on 200); hmc starts from the sgd cell" in report
    assert "Certified-accuracy lift" in report and "| lam | sgd/ibp |" in report
    # the code that trained and evaluated each cell, and the code that wrote the report, are named
    assert results["code"]["version"] == cell["train_code"]["version"] == cell["evaluation"]["code"]["version"]
    assert "- code: report written by " in report
    assert f"- cells trained by: `{results['command']}` (6 cells)" in report
    # and the machine that trained and evaluated each cell
    assert cell["train_machine"]["device"] == "cpu" and cell["evaluation"]["machine"]["cpu_count"] >= 1
    assert f"- cells trained on: {cell['train_machine']['cpu']} (" in report and "- cells evaluated on: " in report
    # the HMC cells say whether their chain moved (acceptance, distinct samples, distance from the start)
    chain = cell["chain"]
    assert chain["stored_samples"] >= 2 and 1 <= chain["distinct_samples"] <= chain["stored_samples"]
    assert "Markov chains: acceptance after burn-in" in report and "- hmc / ibp: acceptance" in report
    assert ("(frozen" in report) == any(
        c["chain"]["distinct_samples"] == 1 for c in results["cells"].values() if "chain" in c
    )
    for plot in (
        "certified_vs_eps_tiny-grid.png",
        "reliability_tiny-grid.png",
        "ood_entropy_tiny-grid.png",
        "sweep_lam.png",
    ):
        assert (finished_grid / plot).stat().st_size > 1000 and f"]({plot})" in report


def test_hmc_cell_starts_from_its_sgd_cell(finished_grid):
    config = json.loads((finished_grid / "cells/tiny-grid__hmc__ibp/run/config.json").read_text())
    assert config["init_from"].endswith("tiny-grid__sgd__ibp/run/posterior.safetensors")


def test_rerun_skips_finished_cells(preset_file, finished_grid, capsys):
    before = _posteriors(finished_grid)
    assert _reproduce(preset_file, finished_grid) == 0
    assert "6 already finished, 0 to run" in capsys.readouterr().out
    assert _posteriors(finished_grid) == before


def test_killed_grid_continues_and_resumed_training_matches(preset_file, finished_grid, tmp_path, capsys):
    out = tmp_path / "out"
    assert _reproduce(preset_file, out, "--only", "/standard") == 0
    first = _posteriors(out)
    assert sorted(first) == ["tiny-grid__hmc__standard", "tiny-grid__sgd__standard"]
    # a cell killed after its last checkpoint but before writing the posterior and evaluation
    assert _reproduce(preset_file, out, "--only", "lam=0.0") == 0
    killed = out / "cells" / "lam__sgd__ibp__lam=0.0"
    (killed / "run" / "posterior.safetensors").unlink()
    (killed / "eval" / "evaluation.json").unlink()
    assert _reproduce(preset_file, out, "--dry-run") == 0
    states = capsys.readouterr().out
    assert "resume    lam/sgd/ibp/lam=0.0" in states and "done      tiny-grid/sgd/standard" in states
    assert "train     tiny-grid/sgd/ibp" in states
    assert _reproduce(preset_file, out) == 0
    after = _posteriors(out)
    assert {k: after[k] for k in first} == first  # finished cells untouched
    results = json.loads((out / "results.json").read_text())
    assert list(results["cells"]) == CELLS or set(results["cells"]) == set(CELLS)
    # the same seed and settings give the same posterior, interrupted or not
    for name in ("lam__sgd__ibp__lam=0.0", "tiny-grid__hmc__ibp"):
        resumed, reference = (
            load_file(root / "cells" / name / "run/posterior.safetensors") for root in (out, finished_grid)
        )
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in resumed)


def test_cells_saved_before_a_setting_existed_still_count_as_finished(preset_file, finished_grid, capsys):
    path = finished_grid / "cells" / "tiny-grid__sgd__standard" / "run" / "config.json"
    original = path.read_text()
    saved = json.loads(original)
    del saved["parallel"]  # as written by a version without that setting (default "data")
    path.write_text(json.dumps(saved))
    try:
        assert _reproduce(preset_file, finished_grid, "--dry-run") == 0
        assert "done      tiny-grid/sgd/standard" in capsys.readouterr().out
    finally:
        path.write_text(original)


def test_changed_training_settings_are_refused_and_nothing_is_overwritten(preset_file, finished_grid, capsys):
    before = _posteriors(finished_grid)
    assert _reproduce(preset_file, finished_grid, "--set", "epochs=3") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "was trained with other settings (epochs: 2 -> 3)" in err
    assert _posteriors(finished_grid) == before


def test_changed_evaluation_settings_reevaluate_without_retraining(preset_file, finished_grid, tmp_path):
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(finished_grid, out)
    before = _posteriors(out)
    assert _reproduce(preset_file, out, "--only", "tiny-grid/sgd/standard", "--eval-set", "limit=20") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["cells"]["tiny-grid/sgd/standard"]["evaluation"]["num_points"] == 20
    assert _posteriors(out) == before


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(preset_file, tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    # valid settings that fail only once the cell runs: more held-out points than the data set has
    broken.write_text(PRESET.replace("epochs = 3\n", "epochs = 3\nval_size = 100000\n"))
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(broken), "--out", str(out), "--no-progress", "--only", "standard"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 cell(s) failed (tiny-grid/hmc/standard)" in err[0]
    results = json.loads((out / "results.json").read_text())
    assert results["cells"]["tiny-grid/sgd/standard"]["status"] == "done"
    failed = results["cells"]["tiny-grid/hmc/standard"]
    assert failed["status"] == "failed" and "val_size 100000" in failed["error"]
    assert "Failed cells" in (out / "RESULTS.md").read_text()


def test_a_report_that_fails_between_cells_does_not_stop_the_grid(preset_file, tmp_path, capsys, monkeypatch):
    """results.json holds every finished cell; a report that cannot be written after one cell
    (a report bug) is logged and the grid goes on; the final report is written (or raises)."""
    from certbnn.reproduce import report

    real, calls = report.write_report, []

    def flaky(results, out_dir):
        calls.append(len(results["cells"]))
        if len(calls) == 1:
            raise ValueError("a report bug")
        return real(results, out_dir)

    monkeypatch.setattr(report, "write_report", flaky)
    out = tmp_path / "out"
    assert _reproduce(preset_file, out, "--only", "lam/") == 0
    log = capsys.readouterr().out  # the grid's progress log
    assert "report not written after lam/sgd/ibp/lam=0.0 (ValueError: a report bug); the grid goes on" in log
    results = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in results["cells"].values()] == ["done", "done"] and calls == [1, 2, 2]
    assert "| 1.0 | sgd/ibp |" in (out / "RESULTS.md").read_text()


def test_two_processes_on_one_folder_keep_each_others_cells(preset_file, tmp_path, capsys, monkeypatch):
    """One driver per core, each with its own --only, on one folder: a driver's write used to
    replace results.json with the cells it had loaded at its start, dropping the cells the
    other driver finished meanwhile. Here the second driver runs to completion while the
    first trains its cell."""
    from certbnn.reproduce import runner

    real, nested = runner._run_cell, []

    def first_driver_cell(cell, *args, **kwargs):
        if not nested:  # while this cell trains, another process runs the other cell
            nested.append(cell.id)
            assert _reproduce(preset_file, out, "--only", "lam=1.0") == 0
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(runner, "_run_cell", first_driver_cell)
    out = tmp_path / "out"
    assert _reproduce(preset_file, out, "--only", "lam=0.0") == 0
    assert nested == ["lam/sgd/ibp/lam=0.0"]
    results = json.loads((out / "results.json").read_text())
    assert list(results["cells"]) == ["lam/sgd/ibp/lam=0.0", "lam/sgd/ibp/lam=1.0"]  # the preset's order
    assert all(c["status"] == "done" for c in results["cells"].values())
    report = (out / "RESULTS.md").read_text()
    assert "| 0.0 | sgd/ibp |" in report and "| 1.0 | sgd/ibp |" in report


def test_a_cell_another_process_is_running_is_skipped_not_trained_twice(preset_file, tmp_path, capsys):
    from certbnn.fileio import file_lock
    from certbnn.reproduce import load_preset
    from certbnn.reproduce.runner import CELL_LOCK

    cells = {c.id: c for c in load_preset(str(preset_file)).cells}
    out = tmp_path / "out"
    assert _reproduce(preset_file, out, "--only", "lam=0.0") == 0
    held = out / "cells" / cells["lam/sgd/ibp/lam=1.0"].dirname
    held.mkdir()
    with file_lock(held / CELL_LOCK) as mine:  # "another process" holds the cell
        assert mine
        with file_lock(held / CELL_LOCK, blocking=False) as second:
            assert second is False  # a second open of the lock conflicts, even in one process
        assert _reproduce(preset_file, out, "--only", "lam/") == 0
        log = capsys.readouterr().out
        assert "lam/sgd/ibp/lam=1.0: another process is running this cell; skipped (rerun to collect it)" in log
        assert not (held / "run").exists()
        assert list(json.loads((out / "results.json").read_text())["cells"]) == ["lam/sgd/ibp/lam=0.0"]
    assert _reproduce(preset_file, out, "--only", "lam/") == 0  # released: the rerun collects it
    assert "1 already finished, 1 to run" in capsys.readouterr().out
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 2


def test_each_cell_records_the_invocation_that_trained_it(preset_file, finished_grid, tmp_path):
    out = tmp_path / "out"
    assert _reproduce(preset_file, out, "--only", "lam=0.0") == 0
    (out / "results.json").unlink()  # the cell is collected from its folder below, not retrained
    assert _reproduce(preset_file, out, "--only", "lam/") == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    grid = f"certbnn reproduce --preset {preset_file} --out {out} --device cpu"
    assert "invocation" not in cells["lam/sgd/ibp/lam=0.0"]  # its record was lost with results.json
    assert cells["lam/sgd/ibp/lam=1.0"]["invocation"] == f"{grid} --only lam/"
    # a cell only re-evaluated keeps the invocation that trained it
    assert _reproduce(preset_file, out, "--only", "lam=1.0", "--eval-set", "pgd_steps=2") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["cells"]["lam/sgd/ibp/lam=1.0"]["evaluate_options"]["pgd_steps"] == 2
    assert results["cells"]["lam/sgd/ibp/lam=1.0"]["invocation"] == f"{grid} --only lam/"
    assert results["command"] == f"{grid} --eval-set pgd_steps=2"  # the grid's line has no --only
    report = (out / "RESULTS.md").read_text()
    assert f"- cells trained by: `{grid} --only lam/` (1 cell); unrecorded (1 cell)" in report
    # kept cells keep theirs; the cells run here name the file they were kept with
    other = tmp_path / "other"
    source = finished_grid / "results.json"
    assert _reproduce(preset_file, other, "--only", "lam=0.0", "--keep-from", str(source)) == 0
    cells = json.loads((other / "results.json").read_text())["cells"]
    assert cells["lam/sgd/ibp/lam=0.0"]["invocation"].endswith(f"--only lam=0.0 --keep-from {source}")
    kept = json.loads(source.read_text())["cells"]
    assert cells["tiny-grid/sgd/ibp"]["invocation"] == kept["tiny-grid/sgd/ibp"]["invocation"]


def _kept_source(finished_grid, tmp_path, edit=None) -> Path:
    """A copy of the finished grid's results.json, every cell's test accuracy marked, then ``edit``-ed."""
    results = json.loads((finished_grid / "results.json").read_text())
    for entry in results["cells"].values():
        entry["test_accuracy"] = -1.0  # a mark that no run made here can carry
    if edit is not None:
        edit(results)
    path = tmp_path / "kept" / "results.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results))
    return path


def test_keep_from_reports_the_whole_study_while_rerunning_a_few_cells(preset_file, finished_grid, tmp_path, capsys):
    source = _kept_source(finished_grid, tmp_path)
    out = tmp_path / "out"
    assert _reproduce(preset_file, out, "--only", "lam=0.0") == 0  # this folder holds one cell already
    capsys.readouterr()
    assert _reproduce(preset_file, out, "--only", "lam=1.0", "--keep-from", str(source)) == 0
    assert "kept 4 finished cell(s) of another results file (2 held or run here)" in capsys.readouterr().out
    assert sorted(_posteriors(out)) == ["lam__sgd__ibp__lam=0.0", "lam__sgd__ibp__lam=1.0"]  # nothing else ran
    results = json.loads((out / "results.json").read_text())
    assert list(results["cells"]) == CELLS  # the whole study, in the preset's order
    kept = json.loads(source.read_text())["cells"]
    for cell_id, entry in results["cells"].items():
        if cell_id.startswith("lam/"):  # run here: the folder's own cells win over the kept ones
            assert entry["test_accuracy"] != -1.0
        else:
            assert entry == kept[cell_id]  # kept unchanged
    assert "tiny-grid" in (out / "RESULTS.md").read_text()
    assert _reproduce(preset_file, out, "--only", "lam/") == 0  # a later run without the option keeps them
    assert list(json.loads((out / "results.json").read_text())["cells"]) == CELLS


def test_keep_from_never_stands_in_for_a_cell_folder_this_grid_holds(preset_file, finished_grid, tmp_path):
    source = _kept_source(finished_grid, tmp_path)
    out = tmp_path / "out"
    assert _reproduce(preset_file, out, "--only", "lam=0.0") == 0
    (out / "results.json").unlink()  # lost; the cell folder is the source of truth
    assert _reproduce(preset_file, out, "--only", "lam=1.0", "--keep-from", str(source)) == 0
    assert "lam/sgd/ibp/lam=0.0" not in json.loads((out / "results.json").read_text())["cells"]
    assert _reproduce(preset_file, out, "--only", "lam/") == 0  # collected from its folder, not the kept copy
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert list(cells) == CELLS and cells["lam/sgd/ibp/lam=0.0"]["test_accuracy"] != -1.0


def _set_epochs(results):
    results["cells"]["tiny-grid/sgd/ibp"]["config"]["epochs"] = 3


def _set_limit(results):
    results["cells"]["tiny-grid/sgd/ibp"]["evaluate_options"]["limit"] = 7


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(preset="quick"), "holds preset 'quick', not 'tiny'"),
        (lambda r: r.update(format_version=99), "results format 99, this certbnn reads 1"),
        (lambda r: r.pop("cells"), "not a certbnn reproduce results.json (no cells)"),
        (lambda r: r["cells"].update(zzz={"status": "done"}), "cell zzz is not a cell of preset 'tiny'"),
        (_set_epochs, "cell tiny-grid/sgd/ibp was made with other settings (epochs: 3 -> 2)"),
        (_set_limit, "cell tiny-grid/sgd/ibp was made with other settings (evaluation settings)"),
        ("missing", "no such file"),
        ("corrupt", "not a readable results.json (JSONDecodeError)"),
    ],
)
def test_keep_from_refuses_what_cannot_stand_for_this_grid(preset_file, finished_grid, tmp_path, capsys, edit, message):
    source = _kept_source(finished_grid, tmp_path, edit if callable(edit) else None)
    if edit == "missing":
        source.unlink()
    elif edit == "corrupt":
        source.write_text('{"cells": ')
    out = tmp_path / "out"
    assert _reproduce(preset_file, out, "--keep-from", str(source)) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not out.exists()  # refused before any work


def test_cli_errors_are_one_line(preset_file, tmp_path, capsys):
    for argv, message in (
        [["--preset", "nope", "--out", str(tmp_path)], "unknown preset 'nope'"],
        [["--preset", str(preset_file)], "--out DIR is required"],
        [["--preset", str(preset_file), "--out", str(tmp_path), "--only", "zzz"], "matches no cell"],
        [
            ["--preset", str(preset_file), "--out", str(tmp_path), "--set", "epochz=1"],
            "overrides: unknown key(s) epochz",
        ],
    ):
        assert main(["reproduce", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err


def test_list_names_every_shipped_preset(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("paper", "quick", "eps-sweep", "lambda-ablation", "demo"))


def test_demo_trains_certifies_and_summarises(tmp_path, monkeypatch):
    from certbnn.data import roots

    monkeypatch.setattr(roots, "SYSTEM_ROOTS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_mnist_dir(tmp_path / "data" / "mnist", counts={"train": 300, "test": 60})
    results = run_demo(
        tmp_path / "demo",
        device="cpu",
        data_dir=str(tmp_path / "data"),
        progress=False,
        fetch=False,
        overrides={"epochs": 1, "val_size": 50},
        eval_overrides={"pgd_steps": 2, "samples": 4},
        log=lambda line: None,
    )
    assert [c["mode"] for c in results["cells"].values()] == ["standard", "ibp"]
    text = summary(results)
    assert "standard BNN" in text and "IBP-robust BNN" in text and "mnist" in text
    assert (tmp_path / "demo" / "RESULTS.md").exists()


def test_demo_without_data_fails_with_one_line(tmp_path, monkeypatch, capsys):
    from certbnn.data import roots

    monkeypatch.setattr(roots, "SYSTEM_ROOTS", ())
    monkeypatch.setenv("CERTBNN_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["demo", "--no-download", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs MNIST or Fashion-MNIST and found neither" in err
    assert not (tmp_path / "demo").exists()
