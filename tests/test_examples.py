"""Every script in examples/ runs in its tiny mode (``--tiny``: generated data, seconds) and prints its results."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

EXPECTED = {
    "own_mlp.py": ["test accuracy", "statistical certified accuracy", "PGD accuracy", "saved and loaded"],
    "certify_pretrained_cnn.py": ["PGD accuracy", "ibp-certified accuracy", "crown-certified accuracy"],
    "resnet_cifar10.py": ["decision-certified accuracy", "PGD accuracy"],
}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_in_tiny_mode(name, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), "--tiny"])
    monkeypatch.chdir(tmp_path)  # an example writes nothing outside its temporary folders
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    printed = capsys.readouterr().out
    for phrase in EXPECTED[name]:
        assert phrase in printed, (phrase, printed)
    assert not any(tmp_path.iterdir())
    source = (EXAMPLES / name).read_text()
    assert len(source.splitlines()) <= 80 and "--tiny" in source
