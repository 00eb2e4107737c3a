"""EOT attacks on the posterior predictive: ball and box, eps = 0, loss increase,
targeted attacks, one batched forward per step whatever the number of samples."""

import pytest
import torch

from certbnn.errors import ConfigError
from certbnn.evaluation.metrics import evaluate_predictive, predictive_probs
from certbnn.evaluation.robustness import adversarial_accuracy, attack, predictive_loss_fn
from certbnn.functional import detached_params
from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior

SHAPE, K, S = (1, 6, 6), 3, 16


def _data(n, gen):
    """Label = which horizontal band (rows 0-1, 2-3, 4-5) is brightest: learnable by an MLP."""
    x = torch.rand(n, *SHAPE, generator=gen)
    return x, x.reshape(n, 3, 12).mean(-1).argmax(-1)


def _train():
    """A tiny MLP trained for 300 Adam steps, and an S-sample Gaussian 'posterior' around it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model("mlp:16", SHAPE, K)
    x, y = _data(512, gen)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    mean = detached_params(model)
    posterior = GaussianPosterior(mean, {k: torch.full_like(v, 0.05) for k, v in mean.items()})
    params = posterior.sample(S, torch.Generator().manual_seed(1))
    x_test, y_test = _data(200, gen)
    return model, params, x_test, y_test


@pytest.fixture(scope="module")
def trained():
    return _train()


def test_model_is_trained_and_samples_disagree(trained):
    model, params, x, y = trained
    report = evaluate_predictive(model, params, x, y)
    assert report["accuracy"] > 0.8
    _, sample_probs = predictive_probs(model, params, x)
    assert sample_probs.shape == (S, 200, K) and sample_probs.std(0).mean() > 1e-3


def test_predictive_loss_is_nll_of_monte_carlo_mean(trained):
    model, params, x, y = trained
    loss = predictive_loss_fn(model, params, y)(x)
    per_sample = torch.stack(
        [
            torch.softmax(
                torch.func.functional_call(  # reference: loop over samples
                    model, {k: v[s] for k, v in params.items()}, (x,)
                ),
                -1,
            )
            for s in range(S)
        ]
    )
    expected = -per_sample.mean(0).gather(-1, y[:, None]).squeeze(-1).log()
    assert loss.shape == (200,) and torch.allclose(loss, expected, atol=1e-5)
    target = (y + 1) % K
    targeted = predictive_loss_fn(model, params, y, target=target)(x)
    assert torch.allclose(targeted, per_sample.mean(0).gather(-1, target[:, None]).squeeze(-1).log(), atol=1e-5)


@pytest.mark.parametrize("kind", ["pgd", "fgsm"])
def test_attack_stays_in_ball_and_box_and_raises_predictive_loss(trained, kind):
    model, params, x, y = trained
    eps = 0.1
    x_adv = attack(model, params, x, y, eps, kind=kind, steps=10, generator=torch.Generator().manual_seed(2))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert ((x_adv - x).abs() <= eps + 1e-6).all() and (x_adv >= 0).all() and (x_adv <= 1).all()
    loss = predictive_loss_fn(model, params, y)
    with torch.no_grad():
        assert loss(x_adv).mean() > loss(x).mean() + 0.1


def test_zero_eps_returns_input_exactly(trained):
    model, params, x, y = trained
    for kind in ("pgd", "fgsm"):
        assert torch.equal(attack(model, params, x, y, 0.0, kind=kind), x)
    acc_adv, x_adv = adversarial_accuracy(model, params, x, y, 0.0)
    assert torch.equal(x_adv, x) and acc_adv == evaluate_predictive(model, params, x, y)["accuracy"]


def test_more_pgd_steps_and_restarts_do_not_lower_the_loss_on_average(trained):
    model, params, x, y = trained
    loss = predictive_loss_fn(model, params, y)

    def mean_loss(**kwargs):
        x_adv = attack(model, params, x, y, 0.05, generator=torch.Generator().manual_seed(3), **kwargs)
        with torch.no_grad():
            return loss(x_adv).mean().item()

    one, many, restarts = mean_loss(steps=1), mean_loss(steps=20), mean_loss(steps=20, restarts=3)
    assert one <= many + 1e-6 and many <= restarts + 1e-6


def test_targeted_attack_raises_target_probability(trained):
    model, params, x, y = trained
    target = (y + 1) % K
    x_adv = attack(model, params, x, y, 0.15, target=target, steps=20, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        clean, _ = predictive_probs(model, params, x)
        adv, _ = predictive_probs(model, params, x_adv)
    p_clean, p_adv = (p.gather(-1, target[:, None]).squeeze(-1) for p in (clean, adv))
    assert p_adv.mean() > p_clean.mean() + 0.1
    assert (adv.argmax(-1) == target).double().mean() > (clean.argmax(-1) == target).double().mean()


def test_adversarial_accuracy_not_above_clean(trained):
    model, params, x, y = trained
    clean = evaluate_predictive(model, params, x, y)
    acc_fgsm, _ = adversarial_accuracy(model, params, x, y, 0.05, kind="fgsm")
    acc_pgd, x_adv = adversarial_accuracy(
        model, params, x, y, 0.05, steps=20, generator=torch.Generator().manual_seed(5)
    )
    assert acc_pgd <= acc_fgsm <= clean["accuracy"] and acc_pgd < clean["accuracy"]
    under_attack = evaluate_predictive(model, params, x_adv, y)  # calibration under attack
    assert under_attack["accuracy"] == acc_pgd and under_attack["nll"] > clean["nll"]


def test_eot_is_one_batched_forward_per_step(trained):
    """All S samples go through the network in one call: a PGD run with `steps` steps
    costs steps + 1 forward calls (the last one scores the restart), independent of S."""
    model, params, x, y = trained
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        predictive_loss_fn(model, params, y)(x)
        assert len(calls) == 1
        calls.clear()
        attack(model, params, x, y, 0.1, steps=5, generator=torch.Generator().manual_seed(6))
        assert len(calls) == 6
    finally:
        handle.remove()


def test_point_params_and_errors(trained):
    model, params, x, y = trained
    point = {k: v[0] for k, v in params.items()}
    acc, x_adv = adversarial_accuracy(model, point, x, y, 0.1, kind="fgsm")
    assert 0.0 <= acc <= 1.0 and ((x_adv - x).abs() <= 0.1 + 1e-6).all()
    with pytest.raises(ConfigError):
        attack(model, params, x, y, 0.1, kind="cw")
    with pytest.raises(ConfigError):
        attack(model, params, x, y, -0.1)
    with pytest.raises(ConfigError):
        attack(model, params, x, y, 0.1, target=y[:5])
