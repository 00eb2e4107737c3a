"""Bayesian linear regression with a known posterior: the yardstick for every method.

y = X w + b + noise, noise ~ N(0, sigma^2), prior w, b ~ N(0, prior_std^2) i.i.d.
The exact posterior over theta = [w..., b] is Gaussian with precision
Lambda = Phi^T Phi / sigma^2 + I / prior_std^2 (Phi = [X, 1]) and mean
Lambda^{-1} Phi^T y / sigma^2. The mean-field (diagonal) VI optimum has the
same mean and variances 1 / Lambda_ii.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from certbnn.likelihoods import GaussianRegression
from certbnn.priors import GaussianPrior


@dataclass
class BLR:
    model: nn.Sequential
    x: torch.Tensor  # (N, d)
    y: torch.Tensor  # (N,)
    prior: GaussianPrior
    likelihood: GaussianRegression
    mean: torch.Tensor  # (d + 1,) exact posterior mean of [w..., b]
    cov: torch.Tensor  # (d + 1, d + 1) exact posterior covariance
    mean_field_std: torch.Tensor  # (d + 1,) optimum of mean-field VI

    def nll(self, params, x, y):
        return self.likelihood.nll(self.model, params, x, y)

    def tempered(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, cov) of the tempered posterior p(D|w)^(1/T) p(w), T = ``temperature``: the
        likelihood alone is tempered, i.e. BLR with noise variance T sigma^2 and the same prior;
        T = 1 gives (mean, cov)."""
        phi = torch.cat([self.x, torch.ones_like(self.x[:, :1])], dim=1)
        noise_var = temperature * self.likelihood.sigma**2
        prior_precision = self.flat(self.prior.std()) ** -2  # zero prior mean (make_blr)
        precision = phi.T @ phi / noise_var + torch.diag(prior_precision)
        cov = torch.linalg.inv(precision)
        return cov @ phi.T @ self.y / noise_var, cov

    @staticmethod
    def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
        """[w..., b] (with any leading sample dims) from a params dict of the model."""
        w, b = params["0.weight"], params["0.bias"]
        return torch.cat([w.flatten(-2), b], dim=-1)


def make_blr(
    n: int = 200, d: int = 3, sigma: float = 0.5, prior_std: float = 1.0, seed: int = 0, dtype=torch.float64
) -> BLR:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    true = torch.randn(d + 1, generator=g, dtype=dtype)
    phi = torch.cat([x, torch.ones(n, 1, dtype=dtype)], dim=1)
    y = phi @ true + sigma * torch.randn(n, generator=g, dtype=dtype)
    model = nn.Sequential(nn.Linear(d, 1)).to(dtype)
    prior = GaussianPrior(
        {n_: torch.zeros_like(p) for n_, p in model.named_parameters()},
        {n_: torch.full_like(p, prior_std) for n_, p in model.named_parameters()},
    )
    precision = phi.T @ phi / sigma**2 + torch.eye(d + 1, dtype=dtype) / prior_std**2
    cov = torch.linalg.inv(precision)
    mean = cov @ phi.T @ y / sigma**2
    return BLR(model, x, y, prior, GaussianRegression(sigma), mean, cov, torch.diagonal(precision).rsqrt())


Z, BATCHES = 5.0, 20


def assert_gaussian(theta: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, bias: float = 0.0) -> None:
    """Samples (M, D) match N(mean, cov) within Z batch-means SEs (+ ``bias`` on the covariance);
    the SEs must be small enough (ESS >~ 100) for the check to have power."""
    chol = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(chol, (theta - mean).T, upper=False).T
    m, d = z.shape
    products = (z[:, :, None] * z[:, None, :]).reshape(m, d * d)
    for stat, target, extra, max_se in (
        (z, torch.zeros(d, dtype=z.dtype), 0.0, 0.1),
        (products, torch.eye(d, dtype=z.dtype).flatten(), bias, 0.15),
    ):
        means = stat[: m // BATCHES * BATCHES].reshape(BATCHES, -1, stat.shape[1]).mean(1)
        se = means.std(0) / math.sqrt(BATCHES)
        assert (se < max_se).all(), f"chain mixes too slowly for a meaningful test: SE {se}"
        error = (stat.mean(0) - target).abs()
        assert (error <= Z * se + extra).all(), f"error {error} vs tolerance {Z * se + extra}"


def run(method, params, batch, nll, steps: int, seed: int = 0):
    """Run ``steps`` steps of any inference method from ``params``; returns (state, infos)."""
    generator = torch.Generator().manual_seed(seed)
    state, infos = method.init(params, generator), []
    for _ in range(steps):
        state, info = method.step(state, batch, nll, generator)
        infos.append(info)
    return state, infos


def assert_resumes_identically(
    method, state_cls, blr: BLR, generator: torch.Generator, warm_steps: int, more_steps: int
) -> None:
    """After ``warm_steps``, a state restored from flatten_state (through JSON) continues
    bit-identically to the original for ``more_steps`` steps (what ``--resume`` relies on)."""
    import json

    from certbnn.functional import detached_params
    from certbnn.inference import flatten_state, unflatten_state

    batch = (blr.x, blr.y)
    state = method.init(detached_params(blr.model), generator)
    for _ in range(warm_steps):
        state, _ = method.step(state, batch, blr.nll, generator)
    tensors, layout = flatten_state(state)
    restored = unflatten_state(state_cls, {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(layout)))
    gen_a, gen_b = torch.Generator(), torch.Generator()
    gen_a.set_state(generator.get_state())
    gen_b.set_state(generator.get_state())
    for _ in range(more_steps):
        state, info_a = method.step(state, batch, blr.nll, gen_a)
        restored, info_b = method.step(restored, batch, blr.nll, gen_b)
        assert info_a == info_b
    (ta, la), (tb, lb) = flatten_state(state), flatten_state(restored)
    assert la == lb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def tiny_classification():
    """(model, x, y, nll): a 4-8-3 ReLU MLP and 64 linearly labelled points, for smoke tests."""
    from certbnn.likelihoods import Categorical

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 4)
    y = (x @ torch.randn(4, 3)).argmax(1)

    def nll(params, xb, yb):
        return Categorical().nll(model, params, xb, yb)

    return model, x, y, nll
