"""Results name the code that made them."""

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from certbnn import __version__, provenance


def test_code_version_names_this_checkout():
    code = provenance.code_version()
    assert code["version"] == __version__
    root = Path(provenance.__file__).resolve().parent
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse"], cwd=root).returncode != 0:
        assert code["commit"] is None and code["dirty"] is None
        return
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert code["commit"] == head and isinstance(code["dirty"], bool)


def test_outside_a_checkout_the_commit_is_none(monkeypatch, tmp_path):
    fake = tmp_path / "certbnn" / "provenance.py"
    fake.parent.mkdir()
    fake.write_text("")
    monkeypatch.setattr(provenance, "__file__", str(fake))
    provenance.code_version.cache_clear()
    try:
        assert provenance.code_version() == {"version": __version__, "commit": None, "dirty": None}
    finally:
        provenance.code_version.cache_clear()


@pytest.mark.parametrize("where", ["metrics", "evaluation"])
def test_training_and_evaluation_record_the_code_and_machine(tmp_path, where):
    from tinydata import separable_images

    from certbnn import data, training
    from certbnn.config import make_config
    from certbnn.evaluation.runner import EvalOptions, evaluate_run

    images, labels = separable_images()
    data.register_arrays("tiny-code", {"train": (images, labels), "test": (images[:20], labels[:20])}, num_classes=2)
    try:
        config = make_config(
            {}, dict(dataset="tiny-code", model="mlp:8", method="sgd", likelihood="standard", epochs=1, val_size=20)
        )
        metrics = training.train(config, tmp_path / "run", progress=False, log=lambda s: None)
        if where == "metrics":
            recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())
            assert recorded["code"] == metrics["code"] == provenance.code_version()
        else:
            evaluate_run(tmp_path / "run", EvalOptions(eps=[0.05], limit=20, attacks=[]), progress=False)
            recorded = json.loads((tmp_path / "run" / "evaluation.json").read_text())
            assert recorded["code"] == provenance.code_version()
        # and the machine: a grid resumed elsewhere holds cells from two machines
        assert recorded["machine"] == provenance.machine_info("cpu")
        assert recorded["machine"]["cpu_count"] == os.cpu_count() and recorded["machine"]["torch_threads"] >= 1
    finally:
        data.unregister("tiny-code")


def test_the_commit_is_read_when_certbnn_is_imported_not_when_a_run_ends():
    """A run records its code at the end (metrics.json): the commit must be the one checked out when
    the code was imported, so the cache is filled by ``import certbnn`` itself."""
    import subprocess
    import sys

    probe = "import certbnn.provenance as p; import certbnn; print(p.code_version.cache_info().currsize)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"


def test_machine_info_names_no_host_and_no_path(monkeypatch):
    monkeypatch.setattr(platform, "node", lambda: "host-7f3a9c")  # results.json is published
    monkeypatch.setattr(platform, "uname", lambda: platform.uname_result("Linux", "host-7f3a9c", "6.1", "#1", "x86_64"))
    info = provenance.machine_info("cpu")
    assert set(info) == {"platform", "cpu", "cpu_count", "torch", "torch_threads", "device"}
    assert "host-7f3a9c" not in json.dumps(info) and "/" not in info["cpu"]


def _done_cell(cid: str, trained: dict | None, evaluated: dict | None) -> dict:
    row = {"eps": 0.1, "clean_accuracy": 0.9, "certified_accuracy": {"paper": 0.5}, "n_points": 10}
    evaluation = {"per_eps": [row], **({"machine": evaluated} if evaluated else {})}
    cell = {"id": cid, "experiment": "e", "method": cid, "mode": "ibp", "sweep": {}, "status": "done"}
    return {**cell, "evaluation": evaluation, **({"train_machine": trained} if trained else {})}


def test_report_names_the_machine_of_each_cell(tmp_path):
    """A grid resumed on another machine: the report must not credit every cell to the last one."""
    from certbnn.reproduce.report import _machine_lines

    old = {"cpu": "Old CPU", "cpu_count": 2, "torch": "2.13.0", "torch_threads": 1, "device": "cpu"}
    new = {**old, "cpu": "New CPU", "torch_threads": 2}
    cells = [_done_cell("a", None, None), _done_cell("b", new, new), _done_cell("c", new, old)]
    assert _machine_lines(new, cells) == [
        "- machine of the last run: New CPU (2 cores, torch 2.13.0, 2 threads), device cpu",
        "- cells trained on: New CPU (2 cores, torch 2.13.0, 2 threads), device cpu: 2 cells; unrecorded: 1 cell",
        "- cells evaluated on: New CPU (2 cores, torch 2.13.0, 2 threads), device cpu: 1 cell; "
        "Old CPU (2 cores, torch 2.13.0, 1 threads), device cpu: 1 cell; unrecorded: 1 cell",
    ]
    # results from before cells recorded their machine keep the one line they always had
    assert _machine_lines(old, cells[:1]) == ["- machine: Old CPU (2 cores, torch 2.13.0, 1 threads), device cpu"]
