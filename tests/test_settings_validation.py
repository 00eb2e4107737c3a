"""Every setting, from every source, is checked for type and range before any work.

Table-driven: each bad value, given through a TOML file, a CLI flag, ``--opt`` / ``--lik-opt``,
``reproduce --set`` / ``--eval-set``, ``evaluate`` flags or a saved ``config.json``, must give a
non-zero exit (or a ConfigError) with one line naming the key and the value given, and must
leave the work area exactly as it was (no run directory created).
"""

from __future__ import annotations

import json
import math

import pytest

from certbnn.cli import main
from certbnn.config import TrainConfig, load_toml, make_config, method_option_names, parse_option
from certbnn.errors import ConfigError
from certbnn.evaluation.runner import EvalOptions
from certbnn.models import build_model, check_size
from certbnn.reproduce import load_preset
from certbnn.settings import check_settings

TRAIN = ["train", "--dataset", "mnist", "--model", "mlp:16", "--epochs", "1", "--out", "run"]

# (extra train flags, words the one-line error must contain)
BAD_TRAIN_FLAGS = [
    (["--seed", "-1"], ["seed", "-1"]),
    (["--seed", str(2**64)], ["seed", str(2**64)]),
    (["--warmup-epochs", "nan"], ["warmup_epochs", "nan"]),
    (["--warmup-epochs", "-1"], ["warmup_epochs", ">= 0", "-1"]),
    (["--warmup-epochs", "inf"], ["warmup_epochs", "inf"]),
    (["--warmup-epochs", "3"], ["warmup_epochs 3", "1 training epochs"]),
    (["--ramp-fraction", "1.5"], ["ramp_fraction", "1.5"]),
    (["--eps", "inf"], ["eps", "[0, 1]", "inf"]),
    (["--eps", "1.5"], ["eps", "[0, 1]", "1.5"]),
    (["--eps", "-0.1"], ["eps", "-0.1"]),
    (["--eps", "nan"], ["eps", "nan"]),
    (["--lr", "inf"], ["lr", "> 0", "inf"]),
    (["--lr", "0"], ["lr", "> 0", "0.0"]),
    (["--kl-weight", "-1"], ["kl_weight", "-1"]),
    (["--prior-scale", "nan"], ["prior_scale", "nan"]),
    (["--lam", "3"], ["lam", "[0, 1]", "3.0"]),
    (["--epochs", "0"], ["epochs", ">= 1", "0"]),
    (["--batch-size", "0"], ["batch_size", "0"]),
    (["--val-size", "-5"], ["val_size", "-5"]),
    (["--val-samples", "0"], ["val_samples", "0"]),
    (["--test-size", "0"], ["test_size", "0"]),
    (["--limit-train", "0"], ["limit_train", "0"]),
    (["--augment", "-1"], ["augment", "-1"]),
    (["--mix", "avg"], ["mix", "prob or loss", "avg"]),
    (["--parallel", "pipes"], ["parallel", "pipes"]),
    (["--device", "cuda:x"], ["device", "cuda:x"]),
    (["--likelihood", "gaussian"], ["gaussian", "mnist", "10 classes"]),
    (["--likelihood", "cw"], ["likelihood", "cw"]),
    (["--method", "nuts"], ["method", "nuts"]),
    (["--model", "mlp:99999999999"], ["mlp:99999999999", "parameters", "GiB"]),
    (["--model", "mlp:100000000000000000000000000000"], ["mlp:100000000000000000000000000000"]),
    (["--model", "mlp:abc"], ["mlp:abc"]),
    (["--opt", "prior=1"], ["prior", "unknown option"]),
    (["--opt", "num_data=3"], ["num_data", "unknown option"]),
    (["--opt", "lr=inf"], ["lr", "finite", "inf"]),
    (["--opt", "lr=nan"], ["lr", "nan"]),
    (["--opt", "lr=abc"], ["lr", "abc"]),
    (["--opt", "num_samples=1.5"], ["num_samples", "integer", "1.5"]),
    (["--opt", "num_samples=true"], ["num_samples", "integer", "True"]),
    (["--opt", "betas=[0.9]"], ["betas", "[0.9]"]),
    (["--opt", "nope=1"], ["nope", "unknown option"]),
    (["--method", "hmc", "--opt", "adapt_step_size=no"], ["adapt_step_size", "true or false", "'no'"]),
    (["--method", "hmc", "--opt", "num_leapfrog=x"], ["num_leapfrog", "'x'"]),
    (["--lik-opt", "foo=1"], ["foo", "unknown option", "likelihood 'ibp'"]),
    (["--likelihood", "pgd", "--lik-opt", "steps=abc"], ["steps", "'abc'"]),
    (["--likelihood", "pgd", "--lik-opt", "steps=0"], ["steps", ">= 1", "0"]),
    (["--likelihood", "pgd", "--lik-opt", "step_size=-1"], ["step_size", "-1"]),
    (["--likelihood", "pgd", "--lik-opt", "random_start=1"], ["random_start", "true or false", "1"]),
    (["--lik-opt", "margins=no"], ["margins", "true or false", "'no'"]),
    (["--lik-opt", "lam=2"], ["lam", "[0, 1]", "2"]),
    (["--lik-opt", "bound=crown"], ["bound", "unknown option"]),
    (["--config", "."], [".", "not a regular file"]),
    (["--config", "missing.toml"], ["missing.toml", "not found"]),
]

# (TOML text, words the one-line error must contain)
BAD_TOML = [
    ('margins = "no"', ["margins", "true or false", "'no'"]),
    ("epochs = true", ["epochs", "integer", "True"]),
    ("test_size = 100.5", ["test_size", "integer", "100.5"]),
    ("eps = inf", ["eps", "[0, 1]", "inf"]),
    ("eps = 1.5", ["eps", "1.5"]),
    ("lr = nan", ["lr", "nan"]),
    ("seed = -1", ["seed", "-1"]),
    ('seed = "1"', ["seed", "'1'"]),
    ("warmup_epochs = -1", ["warmup_epochs", "-1"]),
    ("batch_size = 12.0", ["batch_size", "integer", "12.0"]),
    ("dataset = 3", ["dataset", "string", "3"]),
    ("method_options = 3", ["method_options", "table", "3"]),
    ("[method_options]\nprior = 1", ["prior", "unknown option"]),
    ('likelihood = "pgd"\n[likelihood_options]\nsteps = "abc"', ["steps", "'abc'"]),
    ("train = 3", ["train", "table"]),
    ("epochs = = 3", ["c.toml: not valid TOML"]),
]

# (evaluate flags, words)
BAD_EVALUATE = [
    (["--ood-fgsm-eps", "nan"], ["ood_fgsm_eps", "nan"]),
    (["--ood-fgsm-eps", "2"], ["ood_fgsm_eps", "2.0"]),
    (["--eps", "1.5"], ["eps", "[0, 1]", "1.5"]),
    (["--eps", "inf"], ["eps", "inf"]),
    (["--eps", "0.1,nan"], ["eps", "nan"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--limit", "0"], ["limit", "0"]),
    (["--samples", "0"], ["samples", "0"]),
    (["--pgd-steps", "0"], ["pgd_steps", "0"]),
    (["--pgd-restarts", "0"], ["pgd_restarts", "0"]),
    (["--chunk-size", "0"], ["chunk_size", "0"]),
    (["--confidence", "1"], ["confidence", "(0, 1)", "1.0"]),
    (["--threshold", "nan"], ["threshold", "nan"]),
    (["--weight-box-refine", "-1"], ["weight_box_refine", "-1"]),
    (["--attacks", "cw"], ["attack", "cw"]),
    (["--certificates", "magic"], ["certificate", "magic"]),
    (["--ood", "nope"], ["nope"]),
    (["--device", "tpu"], ["device", "tpu"]),
]

# (reproduce flags, words): all must fail in --dry-run already
BAD_REPRODUCE = [
    (["--set", "epochs=1.5"], ["--set", "epochs", "1.5"]),
    (["--set", "epochs=true"], ["epochs", "True"]),
    (["--set", "margins=no"], ["margins", "'no'"]),
    (["--set", "lr=inf"], ["lr", "'inf'"]),
    (["--set", "lr=1e999"], ["lr", "inf"]),
    (["--set", "eps=1.5"], ["eps", "1.5"]),
    (["--set", "seed=-1"], ["seed", "-1"]),
    (["--set", "warmup_epochs=nan"], ["warmup_epochs", "'nan'"]),
    (["--set", "method_options=3"], ["method_options", "table"]),
    (["--set", "epochz=1"], ["unknown key", "epochz"]),
    (["--set", 'method_options={"prior": 1}'], ["prior", "unknown option"]),
    (["--set", 'likelihood_options={"steps": "abc"}'], ["likelihood 'standard'", "unknown option(s) steps"]),
    (["--set", 'likelihood="pgd"', "--set", 'likelihood_options={"steps": "abc"}'], ["steps", "'abc'"]),
    (["--eval-set", "limit=abc"], ["--eval-set", "limit", "'abc'"]),
    (["--eval-set", "limit=1.5"], ["limit", "1.5"]),
    (["--eval-set", "ood_fgsm_eps=nan"], ["ood_fgsm_eps", "'nan'"]),
    (["--eval-set", "eps=2"], ["eps", "2"]),
    (["--eval-set", "attacks=cw"], ["attack", "cw"]),
    (["--eval-set", "attacks=fgsm,bogus"], ["attack", "bogus"]),
    (["--eval-set", "samples=0"], ["samples", "0"]),
    (["--eval-set", "float64=yes"], ["float64", "'yes'"]),
    (["--eval-set", "nope=1"], ["unknown key", "nope"]),
]


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fails_in_one_line(argv, words, tmp_path, capsys):
    before = _listing(tmp_path)
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("certbnn: error: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert _listing(tmp_path) == before, "the failed command changed the work area"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("flags, words", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_bad_train_flags_fail_before_any_work(flags, words, workdir, capsys):
    _fails_in_one_line([*TRAIN, *flags], words, workdir, capsys)


@pytest.mark.parametrize("text, words", BAD_TOML, ids=[t for t, _ in BAD_TOML])
def test_bad_config_file_values_fail_before_any_work(text, words, workdir, capsys):
    (workdir / "c.toml").write_text(text + "\n")
    # values are checked with the file named; option tables once the method / likelihood is known
    named = [] if text.startswith(("[", "likelihood =")) else ["c.toml: "]
    _fails_in_one_line([*TRAIN, "--config", "c.toml"], [*named, *words], workdir, capsys)


@pytest.mark.parametrize(
    "text",
    ['{"epochs": "x"', "[1]", '{"epochs": true}', '{"eps": NaN}', '{"margins": "no"}', '{"bogus": 1}', '"\\ud800"'],
)
def test_resume_with_an_invalid_saved_config_is_one_line(text, workdir, capsys):
    run = workdir / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    (run / "checkpoint.safetensors").write_bytes(b"x")
    _fails_in_one_line(["train", "--out", "run", "--resume"], ["run/config.json"], workdir, capsys)


@pytest.mark.parametrize("flags, words", BAD_EVALUATE, ids=[" ".join(f) for f, _ in BAD_EVALUATE])
def test_bad_evaluate_options_fail_before_reading_the_run(flags, words, workdir, capsys):
    # the run directory does not exist: the options are checked first
    _fails_in_one_line(["evaluate", "no-such-run", "--out", "eval", *flags], words, workdir, capsys)


@pytest.mark.parametrize("flags, words", BAD_REPRODUCE, ids=[" ".join(f) for f, _ in BAD_REPRODUCE])
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_reproduce_overrides_fail_at_load_even_in_dry_run(flags, words, dry_run, workdir, capsys):
    argv = ["reproduce", "--preset", "quick", "--out", "grid", *flags, *(["--dry-run"] if dry_run else [])]
    _fails_in_one_line(argv, words, workdir, capsys)


def test_a_string_where_a_list_is_expected_is_a_one_element_list(workdir, capsys):
    preset = load_preset("quick", {}, {"attacks": "fgsm", "eps": 0.05, "certificates": "per-sample,paper"})
    assert {tuple(c.evaluate.attacks) for c in preset.cells} == {("fgsm",)}
    assert {tuple(c.evaluate.eps) for c in preset.cells} == {(0.05,)}
    assert {tuple(c.evaluate.certificates) for c in preset.cells} == {("per-sample", "paper")}
    assert main(["reproduce", "--preset", "quick", "--out", "grid", "--eval-set", "attacks=fgsm", "--dry-run"]) == 0
    assert not (workdir / "grid").exists()


# --- the schema itself --------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("margins", "no", ["margins", "true or false", "'no'"]),
        ("margins", 1, ["margins", "1"]),
        ("epochs", True, ["epochs", "integer", "True"]),
        ("epochs", 100.5, ["epochs", "integer", "100.5"]),
        ("epochs", 2.0, ["epochs", "2.0"]),
        ("test_size", 100.5, ["test_size", "100.5"]),
        ("eps", math.inf, ["eps", "inf"]),
        ("eps", True, ["eps", "True"]),
        ("lr", "0.1", ["lr", "'0.1'"]),
        ("lr", 10**400, ["lr"]),
        ("seed", 2**63, ["seed"]),
        ("device", 0, ["device", "0"]),
        ("dataset", "", ["dataset", "''"]),
        ("method_options", [], ["method_options", "table"]),
    ],
)
def test_make_config_checks_type_and_range(key, value, words):
    with pytest.raises(ConfigError) as info:
        make_config({}, {key: value})
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_valid_values_are_normalised_and_written_as_strict_json(tmp_path):
    config = make_config({}, {"eps": 0, "lam": 1, "lr": 1, "warmup_epochs": 0, "epochs": 3, "seed": 2**40})
    assert isinstance(config.eps, float) and isinstance(config.lam, float) and isinstance(config.lr, float)
    json.dumps(config.to_json(), allow_nan=False)  # no NaN / Infinity can get into config.json
    path = tmp_path / "c.toml"
    path.write_text("eps = 0\nmargins = true\n[method_options]\nnum_samples = 2\n")
    assert load_toml(path) == {"eps": 0.0, "margins": True, "method_options": {"num_samples": 2}}
    options = EvalOptions(eps=0.1, attacks="fgsm,pgd", ood_fgsm_eps=0).validate()
    assert options.eps == [0.1] and options.attacks == ["fgsm", "pgd"] and options.ood_fgsm_eps == 0.0


def test_check_settings_distinguishes_bool_int_float():
    assert check_settings(TrainConfig, {"epochs": 3, "lam": 1, "margins": False}) == {
        "epochs": 3,
        "lam": 1.0,
        "margins": False,
    }
    for key, value in (("epochs", True), ("epochs", 3.0), ("margins", 0), ("margins", "false"), ("lam", False)):
        with pytest.raises(ConfigError, match=rf"^{key} .*must be .*, got {value!r}$"):
            check_settings(TrainConfig, {key: value})


def test_parse_option_keeps_nan_and_inf_as_text():
    assert parse_option("lr=nan") == ("lr", "nan")
    assert parse_option("lr=Infinity") == ("lr", "Infinity")
    assert parse_option("lr=0.1") == ("lr", 0.1)
    with pytest.raises(ConfigError, match="key=value"):
        parse_option("=3")


def test_only_user_options_are_listed():
    for method in ("sgd", "hmc", "bbb", "swag"):
        names = method_option_names(method)
        assert names and "prior" not in names and "num_data" not in names
    with pytest.raises(ConfigError) as info:
        make_config({}, {"method": "sgd", "method_options": {"prior": 1}})
    assert "(known: lr, momentum, prior_weight, weight_decay)" in str(info.value)


def test_model_size_is_estimated_before_allocating():
    model = build_model("mlp:16", (1, 28, 28), 10)
    assert check_size("mlp:16", model) == 784 * 16 + 16 + 16 * 10 + 10
    with pytest.raises(ConfigError, match=r"model spec 'mlp:16': 12,730 parameters need .* GiB"):
        check_size("mlp:16", model, limit_bytes=1000)
    with pytest.raises(ConfigError, match="mlp:99999999999"):
        build_model("mlp:99999999999", (1, 28, 28), 10)


def test_results_are_written_as_strict_json():
    from certbnn import strict_json

    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, "x"), "e": None, "f": True}
    text = strict_json.dumps(value)
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} token written")) == {
        "a": None,
        "b": [1.0, None, {"c": None}],
        "d": [2, "x"],
        "e": None,
        "f": True,
    }
    with pytest.raises(TypeError):  # anything it cannot convert still fails loudly
        strict_json.dumps({"x": object()})
