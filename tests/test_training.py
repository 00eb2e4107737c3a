"""End-to-end training: every method with the robust likelihood, checkpoints, resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from interrupt import killed_after_epoch
from safetensors.torch import load_file
from tinydata import separable_images

from certbnn import data, training
from certbnn.cli import main
from certbnn.config import make_config
from certbnn.errors import CertbnnError, ConfigError
from certbnn.inference import method_names
from certbnn.posterior import load_posterior


@pytest.fixture(scope="module", autouse=True)
def tiny_dataset():
    """Two separable classes of 1x6x6 images (bright left half vs bright right half)."""
    images, labels = separable_images()
    data.register_arrays("tiny", {"train": (images, labels), "test": (images[:40], labels[:40])}, num_classes=2)
    yield
    data.unregister("tiny")


def _config(**overrides):
    base = dict(
        dataset="tiny",
        model="mlp:16",
        method="sgd",
        likelihood="ibp",
        eps=0.05,
        epochs=3,
        batch_size=32,
        val_size=40,
        val_samples=4,
        seed=3,
    )
    base.update(overrides)
    return make_config({}, base)


METHOD_OPTIONS = {"hmc": {"num_burnin": 1, "num_leapfrog": 5}, "sghmc": {"thin": 2}, "swag": {"burnin_epochs": 1}}


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_with_the_robust_likelihood(tmp_path, method):
    config = _config(method=method, method_options=METHOD_OPTIONS.get(method, {}))
    metrics = training.train(config, tmp_path / method, progress=False, log=lambda s: None)
    assert len(metrics["epochs"]) == 3 and metrics["final"]["eps"] == pytest.approx(0.05)
    assert all(np.isfinite(r["train_nll"]) for r in metrics["epochs"])
    posterior, meta = load_posterior(tmp_path / method / training.POSTERIOR)
    assert meta["method"] == method and meta["likelihood"] == "ibp"
    if method in ("hmc", "sghmc"):  # every sample drawn at the target eps, recorded and loaded back
        assert meta["sample_eps"] == [0.05] * posterior.num_samples
    if method == "swag":
        assert meta["snapshot_eps"] and set(meta["snapshot_eps"]) == {0.05}
    on_disk = json.loads((tmp_path / method / training.METRICS).read_text())
    assert on_disk["final"] == metrics["final"]


def test_robust_sgd_learns_and_certifies(tmp_path):
    metrics = training.train(_config(epochs=6, lr=0.2), tmp_path / "run", progress=False, log=lambda s: None)
    assert metrics["final"]["val_accuracy"] >= 0.95
    assert metrics["final"]["val_certified"] >= 0.5


def _assert_kill_and_resume_reproduce_the_whole_run(config, tmp_path, monkeypatch):
    training.train(config, tmp_path / "whole", progress=False, log=lambda s: None)
    with killed_after_epoch(monkeypatch, 2):
        training.train(config, tmp_path / "killed", progress=False, log=lambda s: None)
    assert not (tmp_path / "killed" / training.POSTERIOR).exists()
    training.train(config, tmp_path / "killed", resume=True, progress=False, log=lambda s: None)
    whole = load_file(tmp_path / "whole" / training.POSTERIOR)
    resumed = load_file(tmp_path / "killed" / training.POSTERIOR)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


@pytest.mark.parametrize("method", ["bbb", "sgd", "swag"])
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, method):
    config = _config(method=method, method_options=METHOD_OPTIONS.get(method, {}))
    _assert_kill_and_resume_reproduce_the_whole_run(config, tmp_path, monkeypatch)


def test_existing_run_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    training.train(_config(epochs=1), run, progress=False, log=lambda s: None)
    before = (run / training.POSTERIOR).read_bytes()
    with pytest.raises(CertbnnError, match="already holds a run; use --resume"):
        training.train(_config(epochs=1), run, progress=False, log=lambda s: None)
    assert (run / training.POSTERIOR).read_bytes() == before


def test_resume_with_changed_settings_is_refused(tmp_path):
    run = tmp_path / "run"
    training.train(_config(epochs=1), run, progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="different configuration"):
        training.train(_config(epochs=1, eps=0.2), run, resume=True, progress=False, log=lambda s: None)


def test_divergence_is_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(CertbnnError, match="training diverged"):
        training.train(
            _config(epochs=2, lr=1e30, likelihood="categorical"), tmp_path / "run", progress=False, log=lambda s: None
        )


def test_cli_train_and_resume(tmp_path, capsys):
    run = tmp_path / "cli"
    toml = tmp_path / "c.toml"
    toml.write_text('dataset = "tiny"\nmodel = "mlp:16"\nmethod = "sgd"\nepochs = 2\nbatch_size = 32\nval_size = 40\n')
    assert main(["train", "--config", str(toml), "--eps", "0.02", "--out", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / training.METRICS).read_text())
    assert metrics["config"]["eps"] == 0.02 and metrics["config"]["method"] == "sgd"
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--eps", "0.3", "--seed", "0"]) == 1
    err = capsys.readouterr().err
    assert "--resume continues a run with its saved settings; these differ: eps (saved 0.02, given 0.3)" in err
    assert len(err.strip().splitlines()) == 1 and "seed" not in err  # seed 0 is the saved value
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    # the launch command repeated with --resume added: every setting equals the saved one
    relaunch = ["train", "--config", str(toml), "--eps", "0.02", "--out", str(run), "--no-progress", "--resume"]
    assert main(relaunch) == 0
    toml.write_text(toml.read_text().replace("epochs = 2", "epochs = 3"))
    assert main(relaunch) == 1
    assert "these differ: epochs (saved 2, given 3)" in capsys.readouterr().err


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--dataset",
                "tiny",
                "--model",
                "mlp:16",
                "--method",
                "nuts",
                "--val-size",
                "40",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("certbnn: error: unknown inference method 'nuts'") and "\n" not in err
    assert (
        main(
            [
                "train",
                "--dataset",
                "tiny",
                "--model",
                "mlp:16",
                "--lam",
                "3",
                "--val-size",
                "40",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 1
    )
    assert "lambda" in capsys.readouterr().err


def test_augment_appends_copies_and_test_size_limits_the_final_score(tmp_path):
    metrics = training.train(
        _config(epochs=1, augment=100, test_size=10), tmp_path / "run", progress=False, log=lambda s: None
    )
    assert metrics["num_train"] == 200 + 100  # 240 images, 40 held out, 100 transformed copies appended
    plain = training.train(_config(epochs=1), tmp_path / "plain", progress=False, log=lambda s: None)
    assert plain["num_train"] == 200
    with pytest.raises(ConfigError, match=r"augment must be in \[0, 100000000\] \(an integer\), got -1"):
        _config(augment=-1)
    with pytest.raises(ConfigError, match="test_size must be >= 1"):
        _config(test_size=0)
    with pytest.raises(ConfigError, match="parallel must be data or chains"):
        _config(parallel="model")


def test_full_batch_hmc_gets_a_deterministic_pgd_potential():
    assert training._likelihood_options(_config(likelihood="pgd"), full_batch=True)["random_start"] is False
    assert "random_start" not in training._likelihood_options(_config(likelihood="pgd"), full_batch=False)
    explicit = _config(likelihood="pgd", likelihood_options={"random_start": True})
    assert training._likelihood_options(explicit, full_batch=True)["random_start"] is True


@pytest.mark.parametrize(
    "method,options,message",
    [
        (
            "sghmc",
            {"num_burnin": 2, "thin": 1},
            "sghmc: num_burnin=2, thin=1 would store samples from step 3 of 18, "
            "before eps reaches its target at step 9",
        ),
        ("sghmc", {"num_burnin": 2, "thin": 100}, "sghmc: num_burnin=2, thin=100 stores no sample in 18 steps"),
        ("sghmc", {"num_burnin": 9, "thin": 2}, None),
        ("hmc", {"num_burnin": 100}, "hmc: warm_start_epochs=1, num_burnin=100, thin=1 stores no sample in 20 steps"),
        (
            "hmc",
            {"num_burnin": 0, "warm_start_epochs": 0},
            "hmc: warm_start_epochs=0, num_burnin=0, thin=1 would store "
            "samples from step 1 of 20, before eps reaches its target at step 10",
        ),
        (
            "swag",
            {"burnin_steps": 0},
            "swag: burnin_epochs=0, burnin_steps=0, snapshot_every='epoch' would store samples "
            "from step 6 of 18, before eps reaches its target at step 9",
        ),
    ],
)
def test_sampler_settings_against_the_eps_ramp_are_checked_before_training(
    tmp_path, monkeypatch, method, options, message
):
    epochs = 20 if method == "hmc" else 3
    config = _config(method=method, epochs=epochs, method_options=options)
    if message is None:  # burn-in ends where the ramp does: accepted (training itself not run here)
        monkeypatch.setattr(training, "split_train_val", lambda c: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(ConfigError if message else KeyboardInterrupt) as err:
        training.train(config, tmp_path / "run", progress=False, log=lambda s: None)
    if message:
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
        assert "ramp_fraction=0.5" in str(err.value) and not (tmp_path / "run").exists()


def test_automatic_burnin_is_logged_and_init_from_skips_the_hmc_warm_start(tmp_path):
    lines = []
    training.train(_config(epochs=1), tmp_path / "sgd", progress=False, log=lambda s: None)
    config = _config(method="hmc", epochs=6, init_from=str(tmp_path / "sgd"), method_options={"num_leapfrog": 3})
    training.train(config, tmp_path / "hmc", progress=False, log=lines.append)
    assert any(
        line.startswith(
            "note: hmc samples only once eps reaches its target 0.05 (step 3); set num_burnin=2, warm_start_epochs=0"
        )
        for line in lines
    ), lines
    _, meta = load_posterior(tmp_path / "hmc" / training.POSTERIOR)
    assert meta["sample_eps"] == [0.05] * 4


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_steps_flush_subnormals_and_the_callers_setting_is_restored(tmp_path, monkeypatch, caller_flushes):
    """Each step runs with flush-to-zero on every thread (certbnn.denormals); afterwards the
    caller's setting is back, whichever it was."""
    from certbnn.denormals import flush_denormals, flushes_anywhere
    from certbnn.inference.sgd import SGD

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    seen, step = [], SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(flushes_anywhere())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SGD, "step", recording_step)
    with flush_denormals(caller_flushes):
        training.train(_config(epochs=1), tmp_path / "run", progress=False, log=lambda s: None)
        assert flushes_anywhere() == caller_flushes
    assert seen and all(seen)
    assert not flushes_anywhere()


@pytest.mark.parametrize("method", ["sgd", "adam", "bbb", "noisy-adam", "vogn"])
def test_lambda_and_cosine_lr_schedules_are_what_each_step_uses(tmp_path, monkeypatch, method):
    """Every step gets the scheduled lambda and learning rate; resume replays them exactly."""
    seen = []
    real_replace = training.StepSettings.method

    def spy(self, m, step):
        stepped = real_replace(self, m, step)
        seen.append((step, stepped.lr / m.lr))
        return stepped

    monkeypatch.setattr(training.StepSettings, "method", spy)
    config = _config(method=method, lam_start=1.0, lam=0.5, mix="loss", lr_schedule="cosine", ramp_fraction=0.5)
    metrics = training.train(config, tmp_path / "run", progress=False, log=lambda s: None)
    history = metrics["epochs"]
    assert history[0]["lam"] > history[-1]["lam"] == 0.5
    assert history[-1]["lr_factor"] < history[0]["lr_factor"] == 1.0
    factors = [f for _, f in seen]
    total = len(factors)  # one entry per step of the 3 epochs
    assert total % 3 == 0 and factors[0] == 1.0 and 0 < factors[-1] < 0.1
    assert sorted(factors, reverse=True) == factors
    ramp = training.epoch_ramp(0.05, 3, total // 3, ramp_fraction=0.5)
    assert factors.count(1.0) == ramp.first_target_step + 1  # the lr holds until eps has reached its target
    settings = training.StepSettings.of(config, ramp, total)
    robust = training.make_likelihood("ibp", lam=0.5, mix="loss")
    lams = [settings.likelihood(robust, s).lam for s in range(total)]
    assert lams == pytest.approx([1.0 - 0.5 * ramp.value(s) / 0.05 for s in range(total)])


@pytest.mark.parametrize(
    "method,schedule",
    [("sgd", "cosine"), ("adam", "cosine"), ("bbb", "cosine"), ("noisy-adam", "cosine"), ("vogn", "cosine")]
    + [("hmc", "constant"), ("sghmc", "constant"), ("swag", "constant")],
)
def test_the_default_lr_schedule_decays_for_optimisers_only(method, schedule):
    """No flag: the optimisers decay their lr after the eps ramp (the tune search's best recipe);
    a sampler's step size stays what it samples with."""
    config = _config(method=method)
    assert config.lr_schedule == "auto" and config.resolved_lr_schedule == schedule
    assert _config(method=method, lr_schedule="constant").resolved_lr_schedule == "constant"
    ramp = training.epoch_ramp(0.05, 3, 10, ramp_fraction=0.5)
    factors = [training.StepSettings.of(config, ramp, 30).lr.value(s) for s in range(30)]
    assert (factors[-1] < 0.1) == (schedule == "cosine") and factors[0] == 1.0


def test_runs_saved_before_the_auto_default_keep_their_constant_lr(tmp_path):
    """A config.json without lr_schedule ran with a constant lr: loading it, resuming it or
    matching it against a preset must not turn it into a cosine run; a sampler's ``constant``
    and ``auto`` are the same run, an optimiser's are not."""
    from certbnn.config import load_saved_config

    saved = {k: v for k, v in _config(method="sgd").to_json().items() if k != "lr_schedule"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    assert load_saved_config(path)["lr_schedule"] == "constant"
    assert training.normalised_config(saved)["lr_schedule"] == "constant"
    same = training.normalised_config

    def as_json(**kw):
        return _config(**kw).to_json()

    assert same(as_json(method="swag", lr_schedule="constant")) == same(as_json(method="swag"))
    assert same(as_json(method="hmc", lr_schedule="constant")) == same(as_json(method="hmc"))
    assert same(as_json(method="sgd", lr_schedule="constant")) != same(as_json(method="sgd"))
    assert same(as_json(method="sgd", lr_schedule="cosine")) == same(as_json(method="sgd"))


def test_a_sampler_run_saved_with_constant_resumes_under_auto(tmp_path):
    run = tmp_path / "run"
    training.train(_config(method="swag", epochs=1, lr_schedule="constant"), run, progress=False, log=lambda s: None)
    training.train(_config(method="swag", epochs=1), run, resume=True, progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="different configuration"):
        training.train(_config(method="swag", epochs=1, lr=0.5), run, resume=True, progress=False, log=lambda s: None)


def test_a_default_sgd_run_records_the_decaying_lr(tmp_path):
    metrics = training.train(_config(), tmp_path / "run", progress=False, log=lambda s: None)
    factors = [e["lr_factor"] for e in metrics["epochs"]]
    assert factors[0] == 1.0 > factors[1] > factors[2]


def test_a_scheduled_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    config = _config(method="bbb", lam_start=1.0, lr_schedule="cosine")
    _assert_kill_and_resume_reproduce_the_whole_run(config, tmp_path, monkeypatch)


def test_crown_ibp_beta_schedule_trains_and_records_beta(tmp_path):
    config = _config(method="sgd", likelihood="crown-ibp", beta_start=1.0, beta=0.0, epochs=4, ramp_fraction=1.0)
    metrics = training.train(config, tmp_path / "run", progress=False, log=lambda s: None)
    assert metrics["epochs"][0]["beta"] > 0.0 and metrics["epochs"][-1]["beta"] == 0.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(likelihood="standard", lam_start=1.0), "lam_start schedules the clean weight"),
        (dict(likelihood="ibp", beta=0.5), "need likelihood crown-ibp, not 'ibp'"),
        (dict(likelihood="ibp", beta_start=1.0), "need likelihood crown-ibp"),
        (dict(method="hmc", lr_schedule="cosine"), "is a sampler"),
        (dict(method="swag", lr_schedule="cosine"), "is a sampler"),
        (dict(lr_schedule="linear"), "lr_schedule must be"),
        (dict(lam_start=1.5), "lam_start"),
        (dict(likelihood="crown-ibp", beta=-0.1), "beta"),
    ],
)
def test_impossible_schedules_are_refused_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)


def _short_hmc(tmp_path, name, step_size, lines):
    config = _config(
        method="hmc",
        epochs=8,
        method_options={"num_burnin": 4, "num_leapfrog": 3, "step_size": step_size, "warm_start_epochs": 1},
    )
    return training.train(config, tmp_path / name, progress=False, log=lines.append)


def test_a_moving_chain_reports_acceptance_and_distinct_samples(tmp_path):
    lines = []
    metrics = _short_hmc(tmp_path, "moving", 1e-4, lines)
    chain = metrics["chain"]
    assert chain["stored_samples"] == 3 and chain["distinct_samples"] == 3
    assert chain["distance_from_start"] > 0 and chain["spread"] > 0
    assert 0 < chain["accept_rate_after_burnin"] <= 1
    proposals = [e for e in metrics["epochs"] if "accept_rate" in e]
    assert len(proposals) == 7 and all(e["step_size"] == 1e-4 for e in proposals)  # epoch 1 is the warm start
    assert not any("warning" in line for line in lines)


def test_a_frozen_chain_is_flagged(tmp_path):
    lines = []
    metrics = _short_hmc(tmp_path, "frozen", 50.0, lines)
    chain = metrics["chain"]
    assert chain["distinct_samples"] == 1 and chain["accept_rate_after_burnin"] == 0.0
    assert all(e["accept_rate"] == 0.0 for e in metrics["epochs"] if "accept_rate" in e)
    assert any("rejected every proposal after burn-in" in line for line in lines)


def test_augment_each_epoch_draws_new_copies_every_epoch():
    fixed = _config(augment=60)
    fresh = _config(augment=60, augment_each_epoch=True)
    base, _ = training.split_train_val(fixed)
    first, _ = training.split_train_val(fresh, 0)
    second, _ = training.split_train_val(fresh, 1)
    again, _ = training.split_train_val(fresh, 1)
    n = len(base) - 60
    assert np.array_equal(first.images, base.images)  # epoch 0: the fixed copies
    assert np.array_equal(second.images[:n], base.images[:n]) and np.array_equal(second.labels[:n], base.labels[:n])
    assert not np.array_equal(second.images[n:], base.images[n:])  # new copies
    assert np.array_equal(second.images, again.images) and np.array_equal(second.labels, again.labels)
    assert np.array_equal(training.split_train_val(fixed, 3)[0].images, base.images)  # without the flag: fixed


def test_augment_each_epoch_trains_on_each_epochs_copies_and_resumes_exactly(tmp_path, monkeypatch):
    drawn = []
    real = training.split_train_val

    def spy(config, epoch=0):
        drawn.append(epoch)
        return real(config, epoch)

    monkeypatch.setattr(training, "split_train_val", spy)
    config = _config(augment=60, augment_each_epoch=True)
    training.train(config, tmp_path / "run", progress=False, log=lambda s: None)
    assert drawn == [0, 1, 2]
    monkeypatch.setattr(training, "split_train_val", real)
    _assert_kill_and_resume_reproduce_the_whole_run(config, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(augment_each_epoch=True), "set augment > 0"),
        (dict(augment=50, augment_each_epoch=True, method="hmc"), "hmc's potential must be one function"),
    ],
)
def test_impossible_augmentation_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)
