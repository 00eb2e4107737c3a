"""Config files and flags: precedence, validation, clear errors."""

import pytest

from certbnn.config import TrainConfig, load_toml, make_config, parse_option
from certbnn.errors import ConfigError


def test_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('method = "vogn"\neps = 0.2\n[method_options]\nbeta1 = 0.8\nbeta2 = 0.99\n')
    config = make_config(load_toml(path), {"eps": 0.05, "method_options": {"beta2": 0.9}})
    assert config.method == "vogn" and config.eps == 0.05 and config.epochs == TrainConfig().epochs
    assert config.method_options == {"beta1": 0.8, "beta2": 0.9}


def test_train_table_is_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nepochs = 3\n')
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
    with pytest.raises(ConfigError, match="lambda must be in"):
        make_config({}, {"lam": 2.0})
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        make_config({}, {"epochs": 0})
    with pytest.raises(ConfigError, match="device"):
        make_config({}, {"device": "tpu"})


def test_parse_option():
    assert parse_option("steps=20") == ("steps", 20)
    assert parse_option("flag=true") == ("flag", True)
    assert parse_option("name=sgd") == ("name", "sgd")
    with pytest.raises(ConfigError, match="key=value"):
        parse_option("steps")
