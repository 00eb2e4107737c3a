"""Which code computed each committed result, checked against git and against the summary page.

A cell's numbers depend on the code that trains, bounds, samples and evaluates; output checks,
provenance records, locks and help text do not change them. ``NUMERICS_SINCE`` names, per method,
the oldest commit whose numerics are the current source's: every commit that changed
``src/certbnn`` after the general boundary is listed in ``REVIEWED`` with what it changed, and
only HMC's numerics moved since (HMC's own boundary is the last such change). So a cell trained
and evaluated by a descendant of its method's boundary is a result of the final code; any other
cell is "older". The section "Code versions" of ``docs/RESULTS.md`` counts, per study, the cells of
each kind and each machine; these tests recompute the counts from the committed ``results.json``
files and git, and fail when a new source commit is not reviewed (a change of numerics must move
the boundary, and the cells it makes older must be counted or rerun).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from test_committed_results import DOCS_RESULTS, STUDIES, SUMMARY, _cells, _section_tables

REPO = DOCS_RESULTS.parents[1]
GENERAL = "61c49f2"  # the oldest commit whose non-HMC numerics are the current source's
NUMERICS_SINCE = {"hmc": "6705220"}  # per method, where it differs from GENERAL
# Every commit after GENERAL that touched src/certbnn: "hmc" changed HMC's numerics (so it must not
# come after NUMERICS_SINCE["hmc"]), "neutral" changed no cell's numbers.
REVIEWED = {
    "29e379b": "neutral: HMC chain diagnostics of the predictions (reported, not used by the chain)",
    "48484ed": "neutral: provenance reads the commit at import",
    "1710411": "neutral: output folders on pseudo or read-only file systems refused",
    "2dd886e": "neutral: tune preset gains an experiment (long-kl); the other cells are unchanged",
    "2b8ec38": "neutral: grid and cell locks, merged results.json",
    "78b686e": "neutral: tune preset gains a cell (long/adam)",
    "834b2d0": "neutral: train --resume accepts the saved settings repeated",
    "de0b95b": "neutral: reproduce --help lists the presets",
    "7f717d8": "neutral: train --help lists the likelihoods",
    "0ac4bb6": "neutral: trainings and evaluations record their machine",
    "3a15bff": "hmc: the potential's randomness (PGD starts) from a fixed seed",
    "cb55ec2": "neutral: hmc docstring",
    "942f9d9": "neutral: hmc docstring",
    "7dd0400": "neutral: hmc docstring",
    "6705220": "hmc: U and K summed in float64",
    "88d6cec": "neutral: hmc docstring",
    "32afbf8": "neutral: reproduce --keep-from (which cells a results file lists, not how they are computed)",
    "76c0c39": "neutral: reproduce records each cell's invocation (provenance)",
    "2154e1c": "neutral: checkpoints write each stored sample once; validation draws the same samples unstacked",
    "58d79a7": "neutral: validation reads the posterior's device without stacking (same draws)",
}


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def git_history():
    """Skip where the checkout has no git history (an sdist, a shallow clone)."""
    if shutil.which("git") is None or _git("cat-file", "-e", f"{GENERAL}^{{commit}}").returncode != 0:
        pytest.skip("needs the git history of the certbnn repository")


def _descends(ancestor: str, commit: str) -> bool:
    found = _git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0
    return found and _git("merge-base", "--is-ancestor", ancestor, commit).returncode == 0


def test_every_source_change_after_the_boundary_is_reviewed(git_history):
    changed = _git("log", "--format=%h", "--abbrev=7", f"{GENERAL}..HEAD", "--", "src/certbnn").stdout.split()
    unreviewed = [c for c in changed if not any(c.startswith(r) or r.startswith(c) for r in REVIEWED)]
    assert not unreviewed, (
        f"source commits after {GENERAL} not reviewed for their effect on results: {unreviewed}; if one "
        "changes numbers, move NUMERICS_SINCE (its cells become older: count them in docs/RESULTS.md "
        "'Code versions' or rerun them), else add it to REVIEWED"
    )
    for commit, what in REVIEWED.items():
        if what.startswith("hmc"):
            assert _descends(commit, NUMERICS_SINCE["hmc"]), f"{commit} changed HMC after its boundary"
        else:
            assert what.startswith("neutral: "), commit


def _final(cell: dict) -> bool:
    """Trained and evaluated by clean checkouts (no local source changes) of descendants of the
    method's boundary."""
    boundary = NUMERICS_SINCE.get(cell["method"], GENERAL)
    codes = [cell.get("train_code") or {}, (cell.get("evaluation") or {}).get("code") or {}]
    return all(c.get("commit") and c.get("dirty") is False and _descends(boundary, c["commit"]) for c in codes)


def _machine(cell: dict) -> str:
    return (cell.get("train_machine") or {}).get("cpu") or "unrecorded"


def _counts(text: str) -> dict[str, int]:
    """'AMD EPYC 10, unrecorded 20 (Intel Xeon)' -> {'AMD EPYC': 10, 'unrecorded': 20}."""
    text = re.sub(r"\([^)]*\)", "", text)
    return {m.group(1).strip(): int(m.group(2)) for m in re.finditer(r"([^,\d][^,]*?)\s+(\d+)\s*(?:,|$)", text)}


def test_counts_parse():
    assert _counts("AMD EPYC 10, unrecorded 20 (Intel Xeon, 2026-11-30)") == {"AMD EPYC": 10, "unrecorded": 20}
    assert _counts("AMD EPYC 3") == {"AMD EPYC": 3}


def test_summary_code_versions_table_counts_the_committed_cells(git_history):
    (_, header, rows), *_ = _section_tables("Code versions")
    assert header[:4] == ["study", "cells", "final code", "older code"], header
    shown = {row[0].strip("`"): row for row in rows}
    assert sorted(shown) == STUDIES
    for study, row in shown.items():
        cells = [c for c in _cells(study).values() if c["status"] == "done"]
        final = sum(_final(c) for c in cells)
        machines: dict[str, int] = {}
        for c in cells:
            machines[_machine(c)] = machines.get(_machine(c), 0) + 1
        assert [int(row[1]), int(row[2]), int(re.match(r"\d+", row[3]).group(0))] == [
            len(cells),
            final,
            len(cells) - final,
        ], f"{study}: cells / final / older"
        assert _counts(row[4]) == machines, f"{study}: machines"


def test_summary_names_the_boundary():
    text = SUMMARY.read_text()
    body = text[text.index("\n## Code versions") :]
    for commit in (GENERAL, NUMERICS_SINCE["hmc"]):
        assert f"`{commit}`" in body[: body.find("\n## ", 1)]
