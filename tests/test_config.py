"""Config files and flags: precedence, validation, clear errors."""

import pytest

from certbnn.config import TrainConfig, load_toml, make_config, parse_option
from certbnn.errors import ConfigError


def test_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('method = "vogn"\neps = 0.2\n[method_options]\ndamping = 0.2\nnum_samples = 2\n')
    config = make_config(load_toml(path), {"eps": 0.05, "method_options": {"num_samples": 3}})
    assert config.method == "vogn" and config.eps == 0.05 and config.epochs == TrainConfig().epochs
    assert config.method_options == {"damping": 0.2, "num_samples": 3}


def test_train_table_is_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepochs = 3\n")
    assert make_config(load_toml(path), {}).epochs == 3


def test_bad_files_and_values(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) epoch"):
        load_toml(path)
    path.write_text("epochs = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(
        ConfigError,
        match=r"lam \(lambda, the weight of the clean term\) must be in \[0, 1\] \(a finite number\), got 2.0",
    ):
        make_config({}, {"lam": 2.0})
    with pytest.raises(ConfigError, match=r"epochs must be >= 1 \(an integer\), got 0"):
        make_config({}, {"epochs": 0})
    with pytest.raises(ConfigError, match="device"):
        make_config({}, {"device": "tpu"})


def test_parse_option():
    assert parse_option("steps=20") == ("steps", 20)
    assert parse_option("flag=true") == ("flag", True)
    assert parse_option("name=sgd") == ("name", "sgd")
    with pytest.raises(ConfigError, match="key=value"):
        parse_option("steps")
