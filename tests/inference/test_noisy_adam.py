"""NoisyAdam (Vadam): the update equations by hand, the reported std, batched sampling."""

from __future__ import annotations

import pytest
import torch
from blr import make_blr

from certbnn.inference.noisy_adam import NoisyAdam


def clone(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    return copy


def point_params(b):
    return {n: p.detach().clone() for n, p in b.model.named_parameters()}


def vadam_by_hand(b, mean, m, s, t, generator, *, num_data, prior_std, lr, betas, samples, s0):
    """Khan et al. 2018, Algorithm 1, on the flat vector [w..., b] (prior mean 0)."""
    lam = 1 / prior_std**2
    std = (num_data * s + lam).rsqrt()
    eps = torch.cat(
        [
            torch.randn((samples, 1, 3), generator=generator, dtype=mean.dtype).flatten(1),
            torch.randn((samples, 1), generator=generator, dtype=mean.dtype),
        ],
        dim=1,
    )
    w = (mean + std * eps).requires_grad_(True)
    params = {"0.weight": w[:, :3].reshape(samples, 1, 3), "0.bias": w[:, 3:]}
    (g,) = torch.autograd.grad(b.nll(params, b.x, b.y).mean(-1).sum(), w)  # per-sample gradients
    m = betas[0] * m + (1 - betas[0]) * (g.mean(0) + lam * mean / num_data)
    s = betas[1] * s + (1 - betas[1]) * (g**2).mean(0)
    s_hat = (s - betas[1] ** t * s0) / (1 - betas[1] ** t)
    mean = mean - lr * (m / (1 - betas[0] ** t)) / (s_hat.sqrt() + lam / num_data)
    return mean, m, s


@pytest.mark.parametrize("init_precision", [0.0, 50.0])
def test_two_steps_follow_the_vadam_equations(init_precision):
    b = make_blr(n=25, d=3, sigma=0.5, prior_std=0.7, seed=4)
    opts = dict(num_data=400, lr=0.01, betas=(0.8, 0.95), num_samples=3, kl_weight=1.0)
    method = NoisyAdam(prior=b.prior, init_precision=init_precision, **opts)
    g = torch.Generator().manual_seed(5)
    state = method.init(point_params(b), g)
    g_ref = clone(g)
    mean, m = b.flat(state.mean), torch.zeros(4, dtype=torch.float64)
    s = torch.full((4,), init_precision / 400, dtype=torch.float64)
    for t in (1, 2):
        state, info = method.step(state, (b.x, b.y), b.nll, g)
        mean, m, s = vadam_by_hand(
            b,
            mean,
            m,
            s,
            t,
            g_ref,
            num_data=400,
            prior_std=0.7,
            lr=0.01,
            betas=(0.8, 0.95),
            samples=3,
            s0=init_precision / 400,
        )
        assert torch.allclose(b.flat(state.mean), mean, rtol=1e-12, atol=1e-14)
        assert torch.allclose(b.flat(state.exp_avg), m, rtol=1e-12, atol=1e-14)
        assert torch.allclose(b.flat(state.exp_avg_sq), s, rtol=1e-12, atol=1e-14)
    assert state.num_steps == 2 and isinstance(info["nll"], float)


def test_posterior_std_is_the_precision_not_raw_s():
    b = make_blr(n=25, d=3, sigma=0.5, prior_std=0.7, seed=4)
    method = NoisyAdam(prior=b.prior, num_data=25, init_precision=30.0, lr=0.01, kl_weight=1.0)
    g = torch.Generator().manual_seed(0)
    state = method.init(point_params(b), g)
    expected0 = torch.full((4,), (30.0 + 1 / 0.49) ** -0.5, dtype=torch.float64)
    assert torch.allclose(b.flat(method.posterior(state).std()), expected0)
    for _ in range(10):
        state, _ = method.step(state, (b.x, b.y), b.nll, g)
    s = b.flat(state.exp_avg_sq)
    assert torch.allclose(b.flat(method.posterior(state).std()), (25 * s + 1 / 0.49).rsqrt(), rtol=1e-12)
    assert not torch.allclose(b.flat(method.posterior(state).std()), s)


def test_samples_are_one_stacked_call():
    b = make_blr(n=25, d=3, seed=4)
    shapes = []

    def counting_nll(params, x, y):
        shapes.append(tuple(params["0.weight"].shape))
        return b.nll(params, x, y)

    method = NoisyAdam(prior=b.prior, num_data=25, num_samples=7)
    g = torch.Generator().manual_seed(0)
    method.step(method.init(point_params(b), g), (b.x, b.y), counting_nll, g)
    assert shapes == [(7, 1, 3)]
