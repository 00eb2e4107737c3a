"""The command-line entry point: version, help, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

import certbnn
from certbnn.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"certbnn {certbnn.__version__}"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "check", "mnist", "--bogus"])
    assert info.value.code == 2


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "certbnn", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "data" in out.stdout


def test_reproduce_help_names_every_shipped_preset(capsys):
    from certbnn.reproduce import list_presets

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in list_presets()) and "cifar" in list_presets()


def test_train_help_names_every_method_and_likelihood(capsys):
    from certbnn.inference.base import method_names
    from certbnn.likelihoods import likelihood_names

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    method_help = text[text.index("--method") :]
    assert "sghmc" in method_names() and "crown-ibp" in likelihood_names()
    assert all(f" {name}," in method_help or f" {name} " in method_help for name in method_names())
    assert all(name in text for name in likelihood_names())
