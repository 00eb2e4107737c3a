"""The studies committed under ``docs/results/<preset>/`` are what the program wrote.

Each folder holds a ``results.json`` (machine-readable, the source of every number) and the
``RESULTS.md`` report that ``certbnn reproduce`` rendered from it. These tests re-render each
report from its ``results.json`` and require the committed text unchanged, so a hand-edited
number, a stale report or a results file that no longer parses fails here; and they check that
no absolute path of the machine that ran the study leaked into the files.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from certbnn.evaluation import plots
from certbnn.fileio import atomic_write_bytes
from certbnn.reproduce import report

DOCS_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
STUDIES = sorted(p.parent.name for p in DOCS_RESULTS.glob("*/results.json"))
# A string that starts like an absolute POSIX path (or a home-relative one) of a machine.
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/(?:home|work|tmp|root|Users|mnt|data|scratch)/|~/)")


def test_every_study_folder_has_results_and_report():
    folders = sorted(p.name for p in DOCS_RESULTS.iterdir() if p.is_dir())
    assert folders == STUDIES and len(STUDIES) >= 8
    for name in STUDIES:
        assert (DOCS_RESULTS / name / "RESULTS.md").is_file(), name


def _skip_drawing(monkeypatch, written: list[str]) -> None:
    """Replace the PNG writers by a stub that records the file name: the report's text depends
    only on which plots exist, and drawing them costs seconds per study."""

    def fake_save(fig, path, *args, **kwargs):
        import matplotlib.pyplot as plt

        plt.close(fig)
        path = Path(path)
        atomic_write_bytes(path, b"", "plot")
        written.append(path.name)
        return path

    monkeypatch.setattr(report, "save_figure", fake_save)
    monkeypatch.setattr(plots, "save_figure", fake_save)


@pytest.mark.parametrize("study", STUDIES)
def test_report_is_rendered_from_its_results(study, tmp_path, monkeypatch):
    folder = DOCS_RESULTS / study
    results = json.loads((folder / "results.json").read_text())
    written: list[str] = []
    _skip_drawing(monkeypatch, written)
    rendered = report.write_report(results, tmp_path).read_text()
    committed = (folder / "RESULTS.md").read_text()
    assert rendered == committed, f"docs/results/{study}/RESULTS.md differs from what its results.json renders"
    # Every plot the report links to is committed beside it.
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", committed)
    for name in linked:
        assert (folder / name).is_file(), f"docs/results/{study}: {name} is linked but not committed"
    assert set(linked) <= set(written)


@pytest.mark.parametrize("study", STUDIES)
def test_no_machine_paths_in_committed_results(study):
    for name in ("results.json", "RESULTS.md"):
        text = (DOCS_RESULTS / study / name).read_text()
        hits = sorted(set(m.group(0) for m in ABSOLUTE_PATH.finditer(text)))
        assert not hits, f"docs/results/{study}/{name} names machine paths: {hits}"


def test_path_pattern_catches_machine_paths():
    assert ABSOLUTE_PATH.search('"out": "/work/main/runs/paper"')
    assert ABSOLUTE_PATH.search("data at ~/datasets")
    assert not ABSOLUTE_PATH.search("runs/paper/cells/mnist__sgd__ibp and 0.5/1.0")


# The summary page quotes the studies' cells in hand-laid tables; every clean / PGD / certified
# figure there must be the committed results.json's, rounded to one decimal.
SUMMARY = DOCS_RESULTS.parent / "RESULTS.md"
METHOD_LABELS = {"SGD": "sgd", "BBB": "bbb", "NoisyAdam": "noisy-adam", "VOGN": "vogn", "SWAG": "swag", "HMC": "hmc"}
NUMBER = re.compile(r"\d+\.\d")
BOLD_LABEL = re.compile(r"^\*\*([^*]+)\*\*")


def _section_tables(heading_start: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(label, header, rows)`` of each Markdown table in the ``## `` section whose heading starts
    with ``heading_start``; ``label`` is the bold text opening the last paragraph before the table
    ("" if none)."""
    text = SUMMARY.read_text()
    body = text[text.index("\n## " + heading_start) + 1 :]
    end = body.find("\n## ")
    lines = body[: end if end > 0 else None].splitlines()
    tables, label, i = [], "", 0
    while i < len(lines):
        if (m := BOLD_LABEL.match(lines[i])) is not None:
            label = m.group(1)
        if lines[i].startswith("|"):
            block = list(itertools.takewhile(lambda ln: ln.startswith("|"), lines[i:]))
            cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in block]
            tables.append((label, cells[0], cells[2:]))
            i += len(block)
            continue
        i += 1
    return tables


def _at_eps(cell: dict, eps: float) -> dict:
    (row,) = [p for p in cell["evaluation"]["per_eps"] if abs(p["eps"] - eps) < 1e-9]
    return row


def _figures(row: dict) -> list[float]:
    return [100 * row["clean_accuracy"], 100 * row["pgd_accuracy"], 100 * row["certified_accuracy"]["paper"]]


def _assert_close(got: float, want: float, where: str) -> None:
    assert abs(got - want) <= 0.05 + 1e-6, f"{where}: {got} quoted, results.json has {want:.3f}"


def _assert_quoted(quoted: list[str], row: dict, where: str) -> None:
    shown = [float(NUMBER.search(q).group(0)) for q in quoted]
    for name, got, want in zip(("clean", "PGD", "certified"), shown, _figures(row)):
        _assert_close(got, want, f"{where} {name}")


def _cells(study: str) -> dict:
    return json.loads((DOCS_RESULTS / study / "results.json").read_text())["cells"]


# Sections with method x {standard, PGD, IBP} grids of "clean / PGD / certified" triples:
# (heading, study, {bold label before the table: (experiment, test eps)}). Every finished cell of
# those experiments in results.json must be in its table.
METHOD_GRIDS = [
    ("`paper`:", "paper", {"MNIST": ("mnist", 0.1), "Fashion-MNIST": ("fashion-mnist", 0.1)}),
    ("`paper-cpu`:", "paper-cpu", {"MNIST": ("mnist", 0.1), "Fashion-MNIST": ("fashion-mnist", 0.1)}),
    (
        "`quick`:",
        "quick",
        {
            "MNIST": ("mnist", 0.1),
            "Fashion-MNIST": ("fashion-mnist", 0.1),
            "CIFAR-10 (JPEG q75 copy)": ("cifar10", 0.0035),
        },
    ),
]


@pytest.mark.parametrize(("heading", "study", "experiments"), METHOD_GRIDS)
def test_summary_method_grids_quote_results_json(heading, study, experiments):
    cells, checked = _cells(study), set()
    for label, header, rows in _section_tables(heading):
        if header[:4] != ["method", *header[1:2], "PGD-adversarial", "IBP-robust"] or label not in experiments:
            continue
        experiment, eps = experiments[label]
        for row in rows:
            method = METHOD_LABELS[row[0]]
            for mode, triple in zip(("standard", "pgd", "ibp"), row[1:4]):
                if "to run" in triple:
                    continue
                cell = cells[f"{experiment}/{method}/{mode}"]
                _assert_quoted(triple.split("/"), _at_eps(cell, eps), f"{study} {experiment}/{method}/{mode}")
                checked.add(cell["id"])
    wanted = {
        cid
        for cid, c in cells.items()
        if c["status"] == "done" and c["experiment"] in {e for e, _ in experiments.values()}
    }
    assert checked == wanted, f"finished cells missing from the {study} tables: {sorted(wanted - checked)}"


@pytest.mark.parametrize(
    ("heading", "study", "experiment", "eps"),
    [
        ("`fashion`:", "fashion", "grid", 0.1),
        ("CIFAR-10 (JPEG q75 copy), trained", "cifar", "cifar10", 0.0035),
    ],
)
def test_summary_cell_tables_quote_results_json(heading, study, experiment, eps):
    cells, checked = _cells(study), set()
    (_, _, rows), *_ = _section_tables(heading)
    for row in rows:
        label, mode = (part.strip() for part in row[0].split(",")[:2])
        mode = re.match(r"[a-z]+", mode.lower()).group(0)  # "IBP (30 epochs ...)", "PGD-5"
        cell = cells[f"{experiment}/{METHOD_LABELS[label]}/{mode}"]
        _assert_quoted(row[1:4], _at_eps(cell, eps), f"{study} {label}/{mode}")
        checked.add(cell["id"])
    wanted = {cid for cid, c in cells.items() if c["status"] == "done" and c["experiment"] == experiment}
    assert checked == wanted, f"finished cells missing from the {study} table: {sorted(wanted - checked)}"


def test_summary_recipe_search_table_quotes_results_json():
    cells, checked = _cells("tune"), 0
    (_, _, rows), *_ = _section_tables("Recipe search")
    for row in rows:
        at = _at_eps(cells[row[0].strip("`")], 0.1)
        want = [100 * at["clean_accuracy"], 100 * at["certified_accuracy"]["paper"]]
        want.append(100 * at["certified_accuracy"]["per-sample"])
        for got, expected in zip(row[3:6], want):
            _assert_close(float(NUMBER.search(got).group(0)), expected, f"tune {row[0]}")
        checked += 1
    assert checked == len(cells)


def test_summary_eps_sweep_table_quotes_results_json():
    cells, checked = _cells("eps-sweep"), 0
    (_, header, rows), *_ = _section_tables("`eps-sweep`")
    test_eps = [float(e) for e in header[2:]]
    for row in rows:
        cell = cells[f"mnist-eps/{row[1]}/eps={row[0]}"]
        for eps, got in zip(test_eps, row[2:]):
            want = 100 * _at_eps(cell, eps)["certified_accuracy"]["paper"]
            _assert_close(float(got), want, f"eps-sweep {row[1]} trained at {row[0]}, tested at {eps}")
            checked += 1
    assert checked == 40


def test_summary_fashion_search_table_quotes_results_json():
    """The search around the recipe (robust SGD at other training eps and lambda): the second table
    of the `fashion` section, one row per training eps and lambda; the grid's own cell (eps 0.11,
    lambda 0.25) may stand beside them for comparison."""
    cells = _cells("fashion")
    wanted = {cid for cid, c in cells.items() if c["status"] == "done" and c["experiment"] == "search"}
    if not wanted:
        return
    tables = _section_tables("`fashion`:")
    assert len(tables) >= 2, "finished search cells but no search table in the `fashion` section"
    checked = set()
    for row in tables[1][2]:
        eps, lam = (re.match(r"\d+(\.\d+)?", row[k]).group(0) for k in (0, 1))  # "0.15", "0.11 (the grid's)"
        cid = "grid/sgd/ibp" if "grid" in row[0] else f"search/sgd/ibp/eps={eps}/lam={lam}"
        _assert_quoted(row[2:5], _at_eps(cells[cid], 0.1), f"fashion {cid}")
        checked.add(cid)
    assert wanted <= checked, f"finished search cells missing from the table: {sorted(wanted - checked)}"
