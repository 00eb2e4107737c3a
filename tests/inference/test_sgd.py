"""SGD / Adam point estimates: exact MAP on Bayesian linear regression, the 1/N prior
scaling, agreement with torch.optim, checkpoint continuation, classification."""

from __future__ import annotations

import pytest
import torch
from blr import make_blr
from torch import nn

from certbnn.errors import ConfigError
from certbnn.functional import detached_params
from certbnn.inference.base import flatten_state, make_method, unflatten_state
from certbnn.inference.sgd import SGD, Adam
from certbnn.likelihoods import Categorical
from certbnn.posterior import SamplePosterior
from certbnn.priors import prior_from_model

N, SIGMA, PRIOR_STD = 30, 1.0, 0.5  # prior precision 4 vs data precision ~30: the prior matters


def blr_problem():
    return make_blr(n=N, d=3, sigma=SIGMA, prior_std=PRIOR_STD, seed=0)


def analytic_map(blr, prior_weight: float) -> torch.Tensor:
    """argmin of N mean(nll) - prior_weight log p(w): (Phi'Phi/s^2 + c I/s0^2)^-1 Phi'y/s^2."""
    phi = torch.cat([blr.x, torch.ones(len(blr.x), 1, dtype=blr.x.dtype)], dim=1)
    precision = phi.T @ phi / SIGMA**2 + prior_weight * torch.eye(phi.shape[1], dtype=phi.dtype) / PRIOR_STD**2
    return torch.linalg.solve(precision, phi.T @ blr.y / SIGMA**2)


def run_full_batch(method, blr, steps: int, state=None):
    state = method.init(detached_params(blr.model), torch.Generator()) if state is None else state
    for _ in range(steps):
        state, info = method.step(state, (blr.x, blr.y), blr.nll, torch.Generator())
    return state, info


# Full-batch descent on a strongly convex quadratic is deterministic and converges
# linearly; the tolerances are float64 round-off with margin, not statistical.


def test_sgd_converges_to_exact_posterior_mean():
    blr = blr_problem()
    state, info = run_full_batch(SGD(blr.prior, N, prior_weight=1.0), blr, 800)
    torch.testing.assert_close(blr.flat(state.params), blr.mean, atol=1e-10, rtol=0)
    assert state.num_steps == 800 and set(info) == {"loss", "nll"}


def test_adam_converges_to_exact_posterior_mean():
    blr = blr_problem()
    state, _ = run_full_batch(Adam(blr.prior, N, lr=0.05, prior_weight=1.0), blr, 2500)
    torch.testing.assert_close(blr.flat(state.params), blr.mean, atol=1e-8, rtol=0)


@pytest.mark.parametrize("prior_weight", [0.0, 2.0])
def test_prior_weight_scales_the_prior_term(prior_weight):
    blr = blr_problem()
    state, _ = run_full_batch(SGD(blr.prior, N, prior_weight=prior_weight), blr, 800)
    torch.testing.assert_close(blr.flat(state.params), analytic_map(blr, prior_weight), atol=1e-10, rtol=0)


def test_prior_is_scaled_by_one_over_n():
    """The exact posterior mean is reached only with log p(w) / N: the MAPs of the
    mis-scaled objectives (prior weight N or 1/N) lie far outside the tolerance."""
    blr = blr_problem()
    state, _ = run_full_batch(SGD(blr.prior, N, prior_weight=1.0), blr, 800)
    found = blr.flat(state.params)
    torch.testing.assert_close(found, analytic_map(blr, 1.0), atol=1e-10, rtol=0)
    for wrong_weight in (float(N), 1.0 / N):
        assert (found - analytic_map(blr, wrong_weight)).abs().max() > 1e-2


def _mlp_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes, learnable
    likelihood = Categorical()

    def nll(params, xb, yb):
        return likelihood.nll(model, params, xb, yb)

    return model, x, y, nll


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_updates_match_torch_optim(name):
    """With prior_weight 0 the objective is mean nll: the trajectory must equal torch.optim's."""
    model, x, y, nll = _mlp_problem()
    prior = prior_from_model(model)
    options = dict(lr=0.05, momentum=0.8, weight_decay=0.01) if name == "sgd" else dict(lr=0.01, weight_decay=0.01)
    method = make_method(name, prior=prior, num_data=len(x), prior_weight=0.0, **options)
    state = method.init(detached_params(model), torch.Generator())
    reference = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    optim = torch.optim.SGD(reference, **options) if name == "sgd" else torch.optim.Adam(reference, **options)
    names = [n for n, _ in model.named_parameters()]
    for i in range(25):
        batch = slice(8 * (i % 8), 8 * (i % 8) + 8)
        state, _ = method.step(state, (x[batch], y[batch]), nll, torch.Generator())
        optim.zero_grad()
        nll(dict(zip(names, reference)), x[batch], y[batch]).mean().backward()
        optim.step()
    for n, ref in zip(names, reference):
        torch.testing.assert_close(state.params[n], ref.detach(), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_posterior_is_one_sample_copy(cls):
    blr = blr_problem()
    method = cls(blr.prior, N)
    state, _ = run_full_batch(method, blr, 3)
    posterior = method.posterior(state)
    assert isinstance(posterior, SamplePosterior) and posterior.num_samples == 1
    for name, value in state.params.items():
        assert torch.equal(posterior.sample()[name][0], value)
    state.params["0.bias"].add_(1.0)  # the posterior holds its own copy
    assert not torch.equal(posterior.sample()["0.bias"][0], state.params["0.bias"])


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_checkpoint_round_trip_continues_identically(cls):
    model, x, y, nll = _mlp_problem(torch.float32)
    method = cls(prior_from_model(model), len(x))
    state = method.init(detached_params(model), torch.Generator())
    for i in range(5):
        state, _ = method.step(state, (x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]), nll, torch.Generator())
    tensors, layout = flatten_state(state)
    restored = unflatten_state(type(state), {k: v.clone() for k, v in tensors.items()}, layout)
    for i in range(5, 8):
        batch = (x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
        state, _ = method.step(state, batch, nll, torch.Generator())
        restored, _ = method.step(restored, batch, nll, torch.Generator())
    assert restored.num_steps == state.num_steps == 8
    for name in state.params:
        assert torch.equal(state.params[name], restored.params[name])
        assert state.params[name].dtype == torch.float32


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_classification_loss_decreases(name):
    model, x, y, nll = _mlp_problem(torch.float32)
    method = make_method(
        name, prior=prior_from_model(model), num_data=len(x), **({"lr": 0.1} if name == "sgd" else {"lr": 0.01})
    )
    state = method.init(detached_params(model), torch.Generator())
    before = nll(state.params, x, y).mean().item()
    for epoch in range(40):
        for i in range(0, len(x), 16):
            state, info = method.step(state, (x[i : i + 16], y[i : i + 16]), nll, torch.Generator())
        state = method.end_epoch(state, epoch)
    after = nll(method.posterior(state).sample(), x, y).mean().item()  # (1, B): the M = 1 posterior
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize(
    "name, options",
    [
        ("sgd", {"lr": -0.1}),
        ("sgd", {"lr": float("nan")}),
        ("sgd", {"momentum": 1.0}),
        ("sgd", {"weight_decay": -1.0}),
        ("sgd", {"prior_weight": -1.0}),
        ("sgd", {"num_data": 0}),
        ("sgd", {"betas": (0.9, 0.99)}),
        ("adam", {"betas": (1.0, 0.999)}),
        ("adam", {"eps": 0.0}),
        ("adam", {"momentum": 0.9}),
        ("adam", {"prior": "not a prior"}),
    ],
)
def test_bad_options_raise_config_error(name, options):
    blr = blr_problem()
    kwargs = {"prior": blr.prior, "num_data": N, **options}
    with pytest.raises(ConfigError):
        make_method(name, **kwargs)
