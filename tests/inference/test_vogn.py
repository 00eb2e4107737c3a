"""VOGN: per-example gradients (vmap and weight copies), the update equations by hand, the
reported std, and robust (interval-bound) likelihoods."""

from __future__ import annotations

import warnings

import pytest
import torch
from blr import make_blr
from torch import nn

from certbnn.inference.vogn import VOGN, PerExampleFallbackWarning, per_example_grads
from certbnn.likelihoods import Categorical, IntervalRobust
from certbnn.priors import prior_from_model


def clone(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    return copy


def mlp_problem(likelihood, eps: float = 0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    weights = {n: p.detach() + 0.1 * torch.randn((2, *p.shape), generator=g) for n, p in model.named_parameters()}
    return model, x, y, weights, (lambda params, xb, yb: likelihood.nll(model, params, xb, yb, eps))


def loop_reference(weights, x, y, nll):
    """Per-(sample, example) gradients by explicit loops: name -> (S, B, *shape)."""
    rows = []
    for k in range(next(iter(weights.values())).shape[0]):
        row = []
        for i in range(len(y)):
            w = {n: t[k].clone().requires_grad_(True) for n, t in weights.items()}
            grads = torch.autograd.grad(nll(w, x[i : i + 1], y[i : i + 1]).sum(), list(w.values()))
            row.append(dict(zip(w, grads)))
        rows.append(row)
    return {n: torch.stack([torch.stack([r[n] for r in row]) for row in rows]) for n in weights}


@pytest.mark.parametrize("mode", ["vmap", "copies", "auto"])
def test_per_example_grads_match_loops(mode):
    model, x, y, weights, nll = mlp_problem(Categorical())
    grads, values = per_example_grads(weights, (x, y), nll, mode)
    ref = loop_reference(weights, x, y, nll)
    assert values.shape == (2, 6) and torch.allclose(values, nll(weights, x, y))
    for name in weights:
        assert grads[name].shape == (2, 6, *weights[name].shape[1:])
        assert torch.allclose(grads[name], ref[name], atol=1e-6)


def test_interval_likelihood_per_example_grads_by_vmap_are_exact():
    model, x, y, weights, nll = mlp_problem(IntervalRobust(bound="ibp", lam=0.5), eps=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bound engine is vmap-able: no fallback
        grads, _ = per_example_grads(weights, (x, y), nll, "auto")
    ref = loop_reference(weights, x, y, nll)
    for name in weights:
        assert torch.allclose(grads[name], ref[name], atol=1e-6)


def test_likelihood_that_vmap_cannot_run_falls_back_to_exact_copies():
    model, x, y, weights, clean = mlp_problem(Categorical(), eps=0.0)

    def nll(params, xb, yb):  # a data-dependent Python branch: impossible under vmap
        return clean(params, xb, yb) * (1.0 if bool((xb >= 0).all()) else 2.0)

    with pytest.raises(RuntimeError):
        per_example_grads(weights, (x, y), nll, "vmap")
    with pytest.warns(PerExampleFallbackWarning):
        grads, _ = per_example_grads(weights, (x, y), nll, "auto")
    ref = loop_reference(weights, x, y, nll)
    for name in weights:
        assert torch.allclose(grads[name], ref[name], atol=1e-6)


def test_vogn_trains_with_the_robust_likelihood():
    model, x, y, _, nll = mlp_problem(IntervalRobust(bound="ibp", lam=0.25), eps=0.05)
    method = VOGN(
        prior=prior_from_model(model, 1.0),
        num_data=6,
        lr=0.05,
        per_example="copies",
        betas=(0.9, 0.9),
        init_precision=100.0,
    )
    g = torch.Generator().manual_seed(0)
    state = method.init({n: p.detach() for n, p in model.named_parameters()}, g)
    first = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mode "copies" never warns
        for _ in range(30):
            state, info = method.step(state, (x, y), nll, g)
            first = info["nll"] if first is None else first
    after = nll(method.posterior(state).mean(), x, y).mean().item()
    assert after < first


def test_two_steps_follow_the_vogn_equations():
    b = make_blr(n=25, d=3, sigma=0.5, prior_std=0.7, seed=4)
    phi = torch.cat([b.x, torch.ones(25, 1, dtype=torch.float64)], dim=1)
    num_data, lr, (b1, b2), samples, lam = 300, 0.2, (0.8, 0.9), 3, 1 / 0.49
    method = VOGN(
        prior=b.prior,
        num_data=num_data,
        lr=lr,
        betas=(b1, b2),
        num_samples=samples,
        init_precision=40.0,
        kl_weight=1.0,
        damping=0.0,
    )
    g = torch.Generator().manual_seed(5)
    state = method.init({n: p.detach().clone() for n, p in b.model.named_parameters()}, g)
    g_ref = clone(g)
    mean, m = b.flat(state.mean), torch.zeros(4, dtype=torch.float64)
    s = torch.full((4,), 40.0 / num_data, dtype=torch.float64)
    for t in (1, 2):
        state, _ = method.step(state, (b.x, b.y), b.nll, g)
        std = (num_data * s + lam).rsqrt()
        eps = torch.cat(
            [
                torch.randn((samples, 1, 3), generator=g_ref, dtype=torch.float64).flatten(1),
                torch.randn((samples, 1), generator=g_ref, dtype=torch.float64),
            ],
            dim=1,
        )
        w = mean + std * eps  # (S, 4)
        per_example = phi[None] * ((w @ phi.T - b.y) / 0.25)[..., None]  # (S, n, 4): phi_i r_i / sigma^2
        s = b2 * s + (1 - b2) * (per_example**2).mean((0, 1))
        m = b1 * m + (1 - b1) * (per_example.mean((0, 1)) + lam * mean / num_data)
        mean = mean - lr * (m / (1 - b1**t)) / (s + lam / num_data)
        assert torch.allclose(b.flat(state.precision), s, rtol=1e-12)
        assert torch.allclose(b.flat(state.exp_avg), m, rtol=1e-10, atol=1e-14)
        assert torch.allclose(b.flat(state.mean), mean, rtol=1e-12)
    post = method.posterior(state)
    assert torch.allclose(b.flat(post.std()), (num_data * s + lam).rsqrt(), rtol=1e-12)


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_adversarial_likelihood_splits_the_attack_from_per_example_grads(attack):
    """The attack runs once outside vmap (no fallback) and gives the weight-copies gradients."""
    from certbnn.likelihoods import Adversarial, BatchNLL

    model, x, y, weights, _ = mlp_problem(Categorical())
    nll = BatchNLL(Adversarial(attack=attack, lam=0.25, steps=3, random_start=False), model, 0.1)
    assert nll.attack_stage and not BatchNLL(nll.likelihood, model, 0.0).attack_stage
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split, split_values = per_example_grads(weights, (x, y), nll, "vmap")
    copies, copies_values = per_example_grads(weights, (x, y), nll, "copies")
    assert torch.allclose(split_values, copies_values, atol=1e-6)
    assert all(torch.allclose(split[n], copies[n], atol=1e-5) for n in weights)
    assert torch.allclose(split_values, nll(weights, x, y), atol=1e-6)  # the stacked call agrees
