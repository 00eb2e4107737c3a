"""Likelihoods: the robust NLL upper-bounds the loss anywhere in the ball; mixing rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certbnn.errors import ConfigError
from certbnn.functional import detached_params, forward
from certbnn.likelihoods import cross_entropy, make_likelihood, mix_losses


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def test_cross_entropy_matches_torch():
    logits, y = torch.randn(7, 5), torch.randint(0, 5, (7,))
    assert torch.allclose(cross_entropy(logits, y), nn.functional.cross_entropy(logits, y, reduction="none"))
    stacked = torch.randn(3, 7, 5)
    assert cross_entropy(stacked, y).shape == (3, 7)


@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0])
def test_mixtures(lam):
    clean, robust = torch.tensor([0.3, 2.0]), torch.tensor([1.0, 5.0])
    prob = mix_losses(clean, robust, lam, "prob")
    expected = -torch.log(lam * torch.exp(-clean) + (1 - lam) * torch.exp(-robust))
    assert torch.allclose(prob, expected)
    assert torch.allclose(mix_losses(clean, robust, lam, "loss"), lam * clean + (1 - lam) * robust)


@pytest.mark.parametrize("name,beta", [("ibp", 1.0), ("crown-ibp", 1.0), ("crown-ibp", 0.3), ("crown-ibp", 0.0)])
@pytest.mark.parametrize("margins", [False, True])
def test_robust_nll_bounds_worst_case_loss(name, beta, margins):
    """CE at any point of the eps-ball (clipped to [0, 1]) is <= the worst-case CE (also for the
    CROWN-IBP / IBP mixtures of the beta schedule)."""
    model = _mlp()
    params = detached_params(model)
    x, y = torch.rand(6, 12), torch.randint(0, 5, (6,))
    lik = make_likelihood(name, lam=0.0, margins=margins, **({"beta": beta} if beta != 1.0 else {}))
    bound = lik.nll(model, params, x, y, eps=0.05)
    for _ in range(200):
        x_adv = (x + 0.05 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        assert (cross_entropy(forward(model, params, x_adv), y) <= bound + 1e-5).all()


@pytest.mark.parametrize("margins", [False, True])
def test_beta_mixes_crown_ibp_and_ibp_bounds_linearly(margins):
    """beta = 1 is CROWN-IBP, beta = 0 is IBP exactly (its fast joint path included), and in
    between the worst-case logits are the convex combination of the two bound sets."""
    model = _mlp(2)
    params = detached_params(model)
    x, y = torch.rand(9, 12), torch.randint(0, 5, (9,))

    def worst(name, **kw):
        return make_likelihood(name, lam=0.0, margins=margins, **kw).worst_case_logits(model, params, x, y, 0.05, 5)

    ibp, crown_ibp = worst("ibp"), worst("crown-ibp")
    assert torch.equal(worst("crown-ibp", beta=0.0), ibp) and torch.equal(worst("crown-ibp", beta=1.0), crown_ibp)
    assert torch.allclose(worst("crown-ibp", beta=0.25), 0.25 * crown_ibp + 0.75 * ibp, atol=1e-6)
    for lam in (0.0, 0.5):  # the joint clean + IBP pass gives IBP's loss at beta = 0
        at_zero = make_likelihood("crown-ibp", lam=lam, beta=0.0, margins=margins).nll(model, params, x, y, 0.05)
        plain = make_likelihood("ibp", lam=lam, margins=margins).nll(model, params, x, y, 0.05)
        assert torch.allclose(at_zero, plain, atol=1e-6)


def test_margin_worst_case_is_tighter():
    model = _mlp(1)
    params = detached_params(model)
    x, y = torch.rand(20, 12), torch.randint(0, 5, (20,))
    separate = make_likelihood("ibp", lam=0.0).nll(model, params, x, y, eps=0.05)
    margins = make_likelihood("ibp", lam=0.0, margins=True).nll(model, params, x, y, eps=0.05)
    assert (margins <= separate + 1e-6).all() and (margins < separate).any()


def test_zero_eps_and_lambda_one_are_the_clean_loss():
    model = _mlp()
    params = detached_params(model)
    x, y = torch.rand(4, 12), torch.randint(0, 5, (4,))
    clean = make_likelihood("categorical").nll(model, params, x, y)
    for name in ("ibp", "pgd", "fgsm"):
        assert torch.equal(make_likelihood(name).nll(model, params, x, y, eps=0.0), clean)
        assert torch.equal(make_likelihood(name, lam=1.0).nll(model, params, x, y, eps=0.1), clean)


def test_adversarial_raises_loss_and_is_seeded():
    model = _mlp(2)
    params = detached_params(model)
    x, y = torch.rand(16, 12), torch.randint(0, 5, (16,))
    clean = make_likelihood("categorical").nll(model, params, x, y)
    pgd = make_likelihood("pgd", lam=0.0)
    a = pgd.nll(model, params, x, y, eps=0.1, generator=torch.Generator().manual_seed(1))
    b = pgd.nll(model, params, x, y, eps=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.mean() > clean.mean()
    ibp = make_likelihood("ibp", lam=0.0).nll(model, params, x, y, eps=0.1)
    assert (a <= ibp + 1e-5).all()  # a sound bound is above any attack


def test_sampled_params_give_sample_dimension_and_gradients():
    model = _mlp()
    params = {k: v.expand(3, *v.shape).clone().requires_grad_(True) for k, v in detached_params(model).items()}
    x, y = torch.rand(5, 12), torch.randint(0, 5, (5,))
    for name in ("categorical", "ibp", "crown-ibp", "pgd"):
        out = make_likelihood(name).nll(model, params, x, y, eps=0.05)
        assert out.shape == (3, 5)
        grads = torch.autograd.grad(out.sum(), list(params.values()))
        assert all(torch.isfinite(g).all() for g in grads)


def test_gaussian_regression_density():
    model = nn.Sequential(nn.Linear(2, 1))
    params = detached_params(model)
    x, y = torch.randn(4, 2), torch.randn(4)
    f = forward(model, params, x).squeeze(-1)
    nll = make_likelihood("gaussian", sigma=0.5).nll(model, params, x, y)
    expected = -torch.distributions.Normal(f, 0.5).log_prob(y)
    assert torch.allclose(nll, expected, atol=1e-6)


def test_bad_options():
    with pytest.raises(
        ConfigError,
        match=r"lam \(lambda, the weight of the clean term\) must be in \[0, 1\] \(a finite number\), got 1.5",
    ):
        make_likelihood("ibp", lam=1.5)
    with pytest.raises(ConfigError, match="mix must be"):
        make_likelihood("pgd", mix="avg")
    with pytest.raises(ConfigError, match="beta mixes CROWN-IBP with IBP bounds: it needs bound crown-ibp"):
        make_likelihood("ibp", beta=0.5)
    with pytest.raises(ConfigError, match=r"beta must be in \[0, 1\]"):
        make_likelihood("crown-ibp", beta=2.0)
    with pytest.raises(ConfigError, match="unknown likelihood 'cw'"):
        make_likelihood("cw")
    with pytest.raises(ConfigError, match=r"sigma must be > 0 \(a finite number\), got 0.0"):
        make_likelihood("gaussian", sigma=0.0)
    with pytest.raises(ConfigError, match="likelihood 'categorical'"):
        make_likelihood("categorical", lam=0.3)
    with pytest.raises(ConfigError, match=r"likelihood 'pgd': unknown option\(s\) foo \(known: lam, mix, "):
        make_likelihood("pgd", foo=1)
    with pytest.raises(ConfigError, match=r"steps must be >= 1 \(an integer\), got 'abc'"):
        make_likelihood("pgd", steps="abc")
