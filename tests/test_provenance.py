"""Results name the code that made them."""

import json
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
def test_training_and_evaluation_record_the_code(tmp_path, where):
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
            recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["code"]
            assert recorded == metrics["code"] == provenance.code_version()
        else:
            evaluate_run(tmp_path / "run", EvalOptions(eps=[0.05], limit=20, attacks=[]), progress=False)
            recorded = json.loads((tmp_path / "run" / "evaluation.json").read_text())["code"]
            assert recorded == provenance.code_version()
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
