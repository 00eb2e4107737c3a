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


def _section_rows(heading_start: str) -> list[list[str]]:
    """The Markdown table rows (cells, without the header and rule) of the first table under the
    ``## `` heading that starts with ``heading_start``."""
    text = SUMMARY.read_text()
    start = text.index("\n## " + heading_start)
    body = text[start + 1 :]
    end = body.find("\n## ")
    lines = body[: end if end > 0 else None].splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    table = list(itertools.takewhile(lambda ln: ln.startswith("|"), lines[first:]))
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]]


def _at_eps(cell: dict, eps: float) -> dict:
    (row,) = [p for p in cell["evaluation"]["per_eps"] if abs(p["eps"] - eps) < 1e-9]
    return row


def _figures(row: dict) -> list[float]:
    return [100 * row["clean_accuracy"], 100 * row["pgd_accuracy"], 100 * row["certified_accuracy"]["paper"]]


def _assert_quoted(quoted: list[str], row: dict, where: str) -> None:
    shown = [float(NUMBER.search(q).group(0)) for q in quoted]
    for name, got, want in zip(("clean", "PGD", "certified"), shown, _figures(row)):
        assert abs(got - want) <= 0.05 + 1e-6, f"{where}: {name} {got} quoted, results.json has {want:.3f}"


def _cells(study: str) -> dict:
    return json.loads((DOCS_RESULTS / study / "results.json").read_text())["cells"]


def test_summary_paper_table_quotes_results_json():
    cells, checked = _cells("paper"), 0
    for row in _section_rows("`paper`:"):
        method = METHOD_LABELS[row[0]]
        for mode, triple in zip(("standard", "pgd", "ibp"), row[1:4]):
            if "to run" in triple:
                continue
            _assert_quoted(triple.split("/"), _at_eps(cells[f"mnist/{method}/{mode}"], 0.1), f"paper {method}/{mode}")
            checked += 1
    assert checked >= 17


@pytest.mark.parametrize(
    ("heading", "study", "experiment", "eps"),
    [
        ("`fashion`:", "fashion", "grid", 0.1),
        ("CIFAR-10 (JPEG q75 copy), trained", "cifar", "cifar10", 0.0035),
    ],
)
def test_summary_cell_tables_quote_results_json(heading, study, experiment, eps):
    cells, checked = _cells(study), 0
    for row in _section_rows(heading):
        label, mode = (part.strip() for part in row[0].split(",")[:2])
        mode = mode.split()[0].lower()
        cell = cells[f"{experiment}/{METHOD_LABELS[label]}/{mode}"]
        _assert_quoted(row[1:4], _at_eps(cell, eps), f"{study} {label}/{mode}")
        checked += 1
    assert checked >= 6


def test_summary_recipe_search_table_quotes_results_json():
    cells, checked = _cells("tune"), 0
    for row in _section_rows("Recipe search"):
        cell = cells[row[0].strip("`")]
        at = _at_eps(cell, 0.1)
        want = [100 * at["clean_accuracy"], 100 * at["certified_accuracy"]["paper"]]
        want.append(100 * at["certified_accuracy"]["per-sample"])
        shown = [float(NUMBER.search(q).group(0)) for q in row[3:6]]
        for got, expected in zip(shown, want):
            assert abs(got - expected) <= 0.05 + 1e-6, f"tune {row[0]}: {got} quoted, results.json has {expected:.3f}"
        checked += 1
    assert checked == len(cells)
