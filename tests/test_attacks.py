"""Attacks: stay in the ball and the pixel box, increase the loss, eps = 0 is the identity."""

import pytest
import torch
from torch import nn

from certbnn.attacks import fgsm, pgd, project
from certbnn.errors import ConfigError
from certbnn.likelihoods import cross_entropy


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.rand(64, 10), torch.randint(0, 4, (64,))
    return (lambda xi: cross_entropy(model(xi), y)), x


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attack_stays_in_ball_and_box_and_raises_loss(attack):
    loss, x = _setup()
    eps = 0.1
    x_adv = (
        fgsm(loss, x, eps)
        if attack == "fgsm"
        else pgd(loss, x, eps, steps=10, generator=torch.Generator().manual_seed(0))
    )
    assert ((x_adv - x).abs() <= eps + 1e-7).all()
    assert (x_adv >= 0).all() and (x_adv <= 1).all()
    assert loss(x_adv).mean() > loss(x).mean()


def test_pgd_more_steps_or_restarts_do_not_lower_the_loss_on_average():
    loss, x = _setup(1)

    def g():
        return torch.Generator().manual_seed(3)

    one = loss(pgd(loss, x, 0.1, steps=1, generator=g())).mean()
    many = loss(pgd(loss, x, 0.1, steps=20, generator=g())).mean()
    restarts = loss(pgd(loss, x, 0.1, steps=20, restarts=3, generator=g())).mean()
    assert one <= many + 1e-6 and many <= restarts + 1e-6


def test_zero_eps_returns_input():
    loss, x = _setup()
    assert torch.equal(pgd(loss, x, 0.0), x) and torch.equal(fgsm(loss, x, 0.0), x)


def test_project_and_errors():
    x = torch.tensor([0.05, 0.5, 0.98])
    assert torch.allclose(project(torch.tensor([-1.0, 0.9, 2.0]), x, 0.1), torch.tensor([0.0, 0.6, 1.0]))
    loss, x = _setup()
    with pytest.raises(ConfigError):
        pgd(loss, x, -0.1)
    with pytest.raises(ConfigError):
        pgd(loss, x, 0.1, steps=0)
