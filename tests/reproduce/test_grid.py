"""Preset parsing and expansion: merge order, dependencies, selection, errors, the shipped presets."""

from __future__ import annotations

import pytest

from certbnn.errors import ConfigError
from certbnn.reproduce import list_presets, load_preset, select
from certbnn.reproduce.grid import expand

BASE = {
    "train": {"epochs": 2, "lr": 0.1, "method_options": {}},
    "evaluate": {"limit": 50},
    "methods": {
        "sgd": {"lr": 0.2, "method_options": {"momentum": 0.5, "weight_decay": 0.1}},
        "hmc": {"init_from": "cell:sgd", "epochs": 7},
    },
    "modes": {"standard": {"likelihood": "standard"}, "ibp": {"likelihood": "ibp", "lam": 0.5}},
    "experiment": [
        {
            "dataset": "mnist",
            "methods": ["sgd", "hmc"],
            "modes": ["standard", "ibp"],
            "train": {"eps": 0.2, "lr": 0.3},
            "method_settings": {"sgd": {"method_options": {"weight_decay": 0.2, "prior_weight": 0.3}}},
            "evaluate": {"eps": [0.1, 0.2]},
        }
    ],
}


def _expand(raw, overrides=None, eval_overrides=None):
    return expand(raw, "test.toml", overrides or {}, eval_overrides or {})


def _with(**changes):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw["experiment"] = [dict(BASE["experiment"][0])]
    for key, value in changes.items():
        if key.startswith("exp_"):
            raw["experiment"][0][key[4:]] = value
        else:
            raw[key] = value
    return raw


def test_cells_merge_layers_in_order_and_option_tables_by_key():
    preset = _expand(BASE)
    ids = [c.id for c in preset.cells]
    assert ids == ["mnist/sgd/standard", "mnist/hmc/standard", "mnist/sgd/ibp", "mnist/hmc/ibp"]
    sgd_ibp = preset.cells[2].config
    # method table (lr 0.2) beats experiment train (0.3) beats defaults (0.1); mode sets likelihood and lam
    assert sgd_ibp.lr == 0.2 and sgd_ibp.eps == 0.2 and sgd_ibp.epochs == 2
    assert sgd_ibp.likelihood == "ibp" and sgd_ibp.lam == 0.5 and sgd_ibp.method == "sgd"
    assert sgd_ibp.method_options == {"momentum": 0.5, "weight_decay": 0.2, "prior_weight": 0.3}
    hmc = preset.cells[1]
    assert hmc.config.lr == 0.3 and hmc.config.epochs == 7 and hmc.depends_on == "mnist/sgd/standard"
    assert preset.cells[0].evaluate.eps == [0.1, 0.2] and preset.cells[0].evaluate.limit == 50


def test_overrides_win_over_the_file():
    preset = _expand(BASE, {"epochs": 1, "device": "cpu"}, {"limit": 5})
    assert all(c.config.epochs == 1 and c.config.device == "cpu" and c.evaluate.limit == 5 for c in preset.cells)


def test_sweep_makes_one_cell_per_point_with_ids_naming_the_point():
    preset = _expand(_with(exp_methods=["sgd"], exp_modes=["ibp"], exp_sweep={"lam": [0.0, 1.0], "eps": [0.1]}))
    assert [c.id for c in preset.cells] == ["mnist/sgd/ibp/lam=0.0/eps=0.1", "mnist/sgd/ibp/lam=1.0/eps=0.1"]
    assert [c.config.lam for c in preset.cells] == [0.0, 1.0]
    assert len({c.dirname for c in preset.cells}) == 2 and all("/" not in c.dirname for c in preset.cells)


def test_select_adds_the_cells_a_selection_starts_from():
    cells = _expand(BASE).cells
    assert [c.id for c in select(cells, ["hmc/ibp"])] == ["mnist/sgd/ibp", "mnist/hmc/ibp"]
    assert select(cells, []) == cells
    with pytest.raises(ConfigError, match="matches no cell"):
        select(cells, ["cifar"])


def test_a_caret_anchors_a_selection_at_the_start_of_the_id():
    cells = load_preset("paper-cpu").cells
    unanchored = {c.id.split("/")[0] for c in select(cells, ["mnist/hmc"])}
    assert unanchored == {"mnist", "fashion-mnist"}  # a plain substring matches both data sets
    anchored = select(cells, ["^mnist/hmc"])
    assert [c.id for c in anchored] == [
        "mnist/sgd/standard",
        "mnist/hmc/standard",
        "mnist/sgd/pgd",
        "mnist/hmc/pgd",
        "mnist/sgd/ibp",
        "mnist/hmc/ibp",
    ]
    with pytest.raises(ConfigError, match="matches no cell"):
        select(cells, ["^hmc"])


@pytest.mark.parametrize(
    "raw, message",
    [
        (_with(bogus=1), "unknown key\\(s\\) bogus"),
        (_with(train={"epoch": 3}), "\\[train\\]: unknown key\\(s\\) epoch"),
        (_with(evaluate={"limt": 3}), "\\[evaluate\\]: unknown key\\(s\\) limt"),
        (_with(exp_modes=["standard", "pgd"]), "mode\\(s\\) pgd have no \\[modes.NAME\\] table"),
        (_with(exp_methods=["hmc", "sgd"]), "must be a method listed before it"),
        (_with(exp_sweep={"method": ["sgd"]}), "cannot sweep 'method'"),
        (_with(exp_sweep={"lam": []}), "non-empty list"),
        (_with(exp_methods=[]), "non-empty methods"),
        (_with(exp_methods={"sgd": {}}), "lists of names"),
        (_with(experiment=[]), "at least one \\[\\[experiment\\]\\]"),
        (_with(train={"epochs": 0}), "\\[train\\]: epochs must be >= 1 \\(an integer\\), got 0"),
        (
            _with(exp_evaluate={"eps": [-1.0]}),
            "eps must be a list of finite numbers \\(each in \\[0, 1\\]\\), got \\[-1.0\\]",
        ),
        (_with(exp_evaluate={"eps": "abc"}), "eps must be a list of finite numbers .*, got 'abc'"),
    ],
)
def test_bad_presets_fail_with_a_message_naming_the_problem(raw, message):
    with pytest.raises(ConfigError, match=message):
        _expand(raw)


def test_duplicate_experiment_names_are_refused():
    raw = _with()
    raw["experiment"] = [dict(BASE["experiment"][0]), dict(BASE["experiment"][0])]
    with pytest.raises(ConfigError, match="used twice"):
        _expand(raw)


def test_load_preset_reads_user_files_and_reports_bad_ones(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[modes.s]\nlikelihood = "standard"\n[[experiment]]\ndataset = "mnist"\nmethods = ["sgd"]\n')
    preset = load_preset(str(path))
    assert preset.name == "mine" and [c.id for c in preset.cells] == ["mnist/sgd/s"]
    (tmp_path / "bad.toml").write_text("[preset\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_preset(str(tmp_path / "bad.toml"))
    with pytest.raises(ConfigError, match="preset file not found"):
        load_preset(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")


def test_shipped_presets_load_and_paper_matches_the_papers_settings():
    assert {"paper", "quick", "eps-sweep", "lambda-ablation", "demo"} <= set(list_presets())
    for name in list_presets():
        assert load_preset(name).cells
    paper = load_preset("paper")
    six = ["sgd", "bbb", "noisy-adam", "vogn", "swag", "hmc"]
    for dataset in ("mnist", "fashion-mnist"):
        cells = [c for c in paper.cells if c.experiment == dataset]
        assert sorted({c.method for c in cells}) == sorted(six) and {c.mode for c in cells} == {
            "standard",
            "pgd",
            "ibp",
        }
        assert all(c.config.model == "mlp:512" and c.config.eps == 0.11 and c.config.lam == 0.25 for c in cells)
        assert all(c.config.epochs == 20 for c in cells if c.method != "hmc")
        assert all(c.evaluate.eps[-1] == 0.1 for c in cells)
    assert {c.evaluate.ood for c in paper.cells if c.experiment == "mnist"} == {"fashion-mnist"}
    assert {c.evaluate.ood_fgsm_eps for c in paper.cells if c.experiment == "mnist"} == {0.3}
    cifar = [c for c in paper.cells if c.experiment == "cifar10"]
    assert {"sgd", "noisy-adam", "vogn", "swag"} <= {c.method for c in cifar}
    assert all(c.config.eps == 0.004 and c.config.epochs == 25 and c.config.augment == 40000 for c in cifar)
    assert all(c.evaluate.eps[-1] == 0.0035 for c in cifar)
    quick = load_preset("quick")
    assert {(c.experiment, c.method, c.mode) for c in quick.cells} == {
        (c.experiment, c.method, c.mode) for c in paper.cells
    }
