"""Bayes by Backprop: the per-step objective, its KL scaling, sampling and the posterior."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from blr import make_blr

from certbnn.inference.base import make_method
from certbnn.inference.bbb import BayesByBackprop, inverse_softplus


def clone(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    return copy


def point_params(b):
    return {n: p.detach().clone() for n, p in b.model.named_parameters()}


@pytest.mark.parametrize("kl_weight", [1.0, 0.1])
def test_loss_is_mean_nll_plus_weighted_kl_over_n(kl_weight):
    b = make_blr(n=30, d=3, sigma=0.5, prior_std=1.0, seed=1)
    method = BayesByBackprop(prior=b.prior, num_data=1000, num_samples=4, init_std=0.05, kl_weight=kl_weight)
    g = torch.Generator().manual_seed(0)
    state = method.init(point_params(b), g)
    g_ref = clone(g)
    _, info = method.step(state, (b.x, b.y), b.nll, g)
    sigma = {n: F.softplus(r) for n, r in state.rho.items()}
    weights = {
        n: m + sigma[n] * torch.randn((4, *m.shape), generator=g_ref, dtype=m.dtype) for n, m in state.mu.items()
    }
    data_term = b.nll(weights, b.x, b.y).mean()
    # exact KL, summed over all coordinates, by hand (prior N(0, 1))
    mu, sd = b.flat(state.mu), b.flat(sigma)
    kl = (-torch.log(sd) + (sd**2 + mu**2) / 2 - 0.5).sum()
    assert info["kl"] == pytest.approx(float(kl), rel=1e-12)
    assert info["nll"] == pytest.approx(float(data_term), rel=1e-12)
    assert info["loss"] == pytest.approx(float(data_term + kl_weight * kl / 1000), rel=1e-12)


def test_duplicated_data_with_doubled_n_halves_only_the_kl_term():
    b = make_blr(n=30, d=3, sigma=0.5, prior_std=1.0, seed=1)
    x2, y2 = torch.cat([b.x, b.x]), torch.cat([b.y, b.y])
    infos = []
    for num_data, batch in [(30, (b.x, b.y)), (60, (x2, y2))]:
        method = BayesByBackprop(prior=b.prior, num_data=num_data, num_samples=1, init_std=0.05)
        g = torch.Generator().manual_seed(3)
        _, info = method.step(method.init(point_params(b), g), batch, b.nll, g)
        infos.append(info)
    assert infos[0]["nll"] == pytest.approx(infos[1]["nll"], rel=1e-12)
    assert infos[0]["loss"] - infos[0]["nll"] == pytest.approx(2 * (infos[1]["loss"] - infos[1]["nll"]), rel=1e-10)


def test_samples_are_one_stacked_call_and_first_step_is_adam_sized():
    b = make_blr(n=30, d=3, seed=2)
    calls = []

    def counting_nll(params, x, y):
        calls.append({n: tuple(p.shape) for n, p in params.items()})
        return b.nll(params, x, y)

    method = make_method("bbb", prior=b.prior, num_data=30, num_samples=5, lr=0.01)
    g = torch.Generator().manual_seed(0)
    state = method.init(point_params(b), g)
    new, _ = method.step(state, (b.x, b.y), counting_nll, g)
    assert calls == [{"0.weight": (5, 1, 3), "0.bias": (5, 1)}]
    # Adam's first bias-corrected step moves every coordinate by lr * g / (|g| + eps) ~ lr
    moved = (b.flat(new.mu) - b.flat(state.mu)).abs()
    assert torch.allclose(moved, torch.full_like(moved, 0.01), rtol=1e-4)
    assert new.num_steps == 1 and state.num_steps == 0


def test_init_and_posterior_report_softplus_rho():
    b = make_blr(n=30, d=3, seed=2)
    method = BayesByBackprop(prior=b.prior, num_data=30, init_std=0.02)
    g = torch.Generator().manual_seed(0)
    state = method.init(point_params(b), g)
    post = method.posterior(state)
    assert torch.allclose(b.flat(post.std()), torch.full((4,), 0.02, dtype=torch.float64))
    assert torch.equal(b.flat(post.mean()), b.flat(point_params(b)))
    for _ in range(5):
        state, _ = method.step(state, (b.x, b.y), b.nll, g)
    post = method.posterior(state)
    assert torch.equal(b.flat(post.std()), F.softplus(b.flat(state.rho)))
    assert post.mean()["0.weight"].dtype == torch.float64


def test_inverse_softplus_is_stable():
    sigma = torch.tensor([1e-8, 1e-3, 1.0, 30.0], dtype=torch.float64)
    assert torch.allclose(F.softplus(inverse_softplus(sigma)), sigma, rtol=1e-10)
