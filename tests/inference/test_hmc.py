"""HMC (Neal 2011): exact posterior recovery on Bayesian linear regression (T = 1 and the
tempered posterior p(D|w)^(1/T) p(w)), MH rejection restores the state, independent samples, prior gradient,
mass matrix, leapfrog order, chunked potential, checkpoint round trip.

Statistical checks whiten the chain, z = L^{-1} (theta - mu) with Sigma = L L^T the
exact posterior covariance, so the target is E z = 0, E z z^T = I. Monte Carlo
standard errors come from batch means (B = 20 batches of consecutive samples, each
far longer than the chain's autocorrelation time): SE = sd(batch means) / sqrt(B).
Each of the 4 means and 10 covariance entries must lie within Z = 5 SE
(P(|t_19| > 5) ~ 8e-5 per entry, so < 0.2 % for the whole file, with fixed seeds
anyway). The SEs must also be small (mean < 0.1, covariance < 0.15: an effective sample
size >~ 100 for every coordinate) so that the check has power.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from blr import assert_gaussian, assert_resumes_identically, make_blr, run, tiny_classification
from torch import nn

from certbnn.errors import ConfigError
from certbnn.functional import detached_params
from certbnn.inference.base import flatten_state, make_method
from certbnn.inference.hmc import HMC, HMCState
from certbnn.priors import GaussianPrior, prior_from_model


@pytest.fixture(scope="module")
def blr():
    # n=30, sigma=0.5: posterior stds ~0.08-0.11, prior std 1 (a broad, correlated posterior)
    return make_blr(n=30, d=3, sigma=0.5, prior_std=1.0, seed=0)


def blr_hmc(blr, **options) -> HMC:
    """HMC on the 30-point Bayesian linear regression at T = 1, without the SGD warm start."""
    return HMC(warm_start_epochs=0, temperature=1.0, prior=blr.prior, num_data=30, **options)


MASS = {"0.weight": torch.tensor([[4.0, 0.25, 2.0]], dtype=torch.float64), "0.bias": 0.5}


@pytest.mark.parametrize("mass", [1.0, MASS], ids=["identity-mass", "diagonal-mass"])
def test_blr_posterior_recovered_with_sane_acceptance(blr, mass):
    method = blr_hmc(
        blr,
        step_size=0.01,
        num_leapfrog=8,
        num_burnin=200,
        jitter=0.2,
        mass=mass,
    )
    state, infos = run(method, detached_params(blr.model), (blr.x, blr.y), blr.nll, 1200, seed=1)
    posterior = method.posterior(state)
    assert posterior.num_samples == 1000
    assert_gaussian(blr.flat(posterior.sample()), blr.mean, blr.cov)
    assert 0.5 < infos[-1]["accept_rate"] < 0.99  # target 0.8 after dual averaging
    assert infos[-1]["accept_rate"] == pytest.approx(sum(i["accepted"] for i in infos[200:]) / 1000)
    assert len({i["step_size"] for i in infos[:200]}) > 100 and infos[-1]["step_size"] != 0.01


def test_tempered_posterior_is_recovered():
    # T = 0.25: the target p(D|w)^(1/T) p(w) is BLR with noise variance T sigma^2 and the same prior
    # (blr.tempered). With a prior as strong as the data, the samples also reject the T = 1
    # posterior and (p(D|w) p(w))^(1/T) (prior tempered too) by the same check.
    blr, temperature = make_blr(n=10, d=3, sigma=1.0, prior_std=0.2, seed=1), 0.25
    mean, cov = blr.tempered(temperature)
    method = HMC(
        warm_start_epochs=0,
        prior=blr.prior,
        num_data=10,
        temperature=temperature,
        num_leapfrog=8,
        num_burnin=200,
        jitter=0.2,
    )
    assert method.initial_step_size == pytest.approx(0.01 * (temperature / 10) ** 0.5)
    state, infos = run(method, detached_params(blr.model), (blr.x, blr.y), blr.nll, 1200, seed=3)
    theta = blr.flat(method.posterior(state).sample())
    assert_gaussian(theta, mean, cov)
    assert 0.5 < infos[-1]["accept_rate"] < 0.99
    for wrong_mean, wrong_cov in ((blr.mean, temperature * blr.cov), (blr.mean, blr.cov)):
        with pytest.raises(AssertionError, match="error"):
            assert_gaussian(theta, wrong_mean, wrong_cov)
    # info["nll"] is the mean NLL at the chain's position, (T / N) (U + log p(w))
    assert infos[-1]["nll"] == pytest.approx(float(blr.nll(state.position, blr.x, blr.y).mean()), rel=1e-9)


def test_warm_start_optimises_the_tempered_objective():
    # mean nll - T log p(w) / N: for BLR its minimiser is the tempered posterior's mean (a Gaussian's
    # mode), which with a strong prior is far from the T = 1 posterior mean.
    blr, temperature = make_blr(n=10, d=3, sigma=1.0, prior_std=0.2, seed=1), 0.25
    mean, _ = blr.tempered(temperature)
    method = HMC(prior=blr.prior, num_data=10, temperature=temperature, warm_start_epochs=1000)
    state, infos = run(method, detached_params(blr.model), (blr.x, blr.y), blr.nll, 1000)
    assert state.num_steps == 0 and all(i["warm_start"] == 1.0 for i in infos)
    assert torch.allclose(blr.flat(state.position), mean, rtol=0, atol=1e-6)
    assert not torch.allclose(blr.flat(state.position), blr.mean, rtol=0, atol=1e-2)


@pytest.mark.parametrize("case", ["constant-likelihood", "no-data"])
def test_prior_gradient_included_samples_the_prior(case):
    model = nn.Linear(3, 1).double()
    prior = GaussianPrior(
        {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()},
        {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()},
    )
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    if case == "no-data":
        x, y = x[:0], y[:0]

    def constant_nll(params, xb, yb):  # depends on nothing: the potential is -log p(w) alone
        return torch.zeros(xb.shape[0], dtype=xb.dtype) + 0.0 * params["bias"].sum()

    method = HMC(
        warm_start_epochs=0, prior=prior, num_data=10, step_size=0.5, num_leapfrog=5, num_burnin=100, jitter=0.2
    )
    state, _ = run(method, detached_params(model), (x, y), constant_nll, 1100, seed=2)
    theta = torch.cat([s.flatten(1) for s in method.posterior(state).sample().values()], 1)
    assert_gaussian(theta, torch.full((4,), 0.5, dtype=torch.float64), 4.0 * torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_potential_is_scaled_nll_minus_log_prior_and_chunking_is_exact(blr, temperature):
    params = {n: p + 0.1 for n, p in detached_params(blr.model).items()}
    whole = HMC(warm_start_epochs=0, prior=blr.prior, num_data=90, temperature=temperature)
    chunked = HMC(warm_start_epochs=0, prior=blr.prior, num_data=90, temperature=temperature, chunk_size=7)
    u, grad = whole.potential_and_grad(params, (blr.x, blr.y), blr.nll)
    u_chunked, grad_chunked = chunked.potential_and_grad(params, (blr.x, blr.y), blr.nll)
    w = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    expected = 90 / temperature * blr.nll(w, blr.x, blr.y).mean() - blr.prior.log_prob(w)
    expected_grad = torch.autograd.grad(expected, list(w.values()))
    for value in (u, u_chunked):
        assert torch.allclose(value, expected.detach(), rtol=1e-12)
    for g in (grad, grad_chunked):
        for got, want in zip(g.values(), expected_grad):
            assert torch.allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_potential_flushes_subnormals_only_inside_and_restores_the_caller(blr, caller_flushes):
    """``flush_denormals`` (default on) changes no value here and leaves the caller's FTZ/DAZ
    setting as it was; the potential equals the unflushed one."""
    from certbnn.denormals import flush_denormals, flushes_anywhere

    params = {n: p + 0.1 for n, p in detached_params(blr.model).items()}
    flushed = HMC(warm_start_epochs=0, prior=blr.prior, num_data=90, chunk_size=7)
    plain = dataclasses.replace(flushed, flush_denormals=False)
    with flush_denormals(caller_flushes):
        u, grad = flushed.potential_and_grad(params, (blr.x, blr.y), blr.nll)
        assert flushes_anywhere() == caller_flushes
        u_plain, grad_plain = plain.potential_and_grad(params, (blr.x, blr.y), blr.nll)
        assert flushes_anywhere() == caller_flushes
    assert torch.allclose(u, u_plain, rtol=1e-12)
    assert all(torch.allclose(grad[n], grad_plain[n], rtol=1e-10) for n in grad)


def test_leapfrog_is_second_order_with_non_identity_mass(blr):
    # The energy error of leapfrog with the kinetic energy it integrates is O(eps^2) over
    # a fixed trajectory time; with an integrator that ignored M^{-1} it would be O(1).
    method = blr_hmc(blr, mass=MASS)
    position = {"0.weight": blr.mean[:3].reshape(1, 3) + 0.05, "0.bias": blr.mean[3:] + 0.05}
    masses = method.masses(position)
    g = torch.Generator().manual_seed(3)
    momentum = {n: torch.randn(w.shape, generator=g, dtype=w.dtype) * masses[n] ** 0.5 for n, w in position.items()}
    u0, g0 = method.potential_and_grad(position, (blr.x, blr.y), blr.nll)
    h0 = u0 + method.kinetic(momentum, masses)
    errors = []
    for eps in (4e-3, 2e-3):
        leaps = blr_hmc(
            blr,
            mass=MASS,
            num_leapfrog=round(0.04 / eps),
        )
        _, p, u, _ = leaps.leapfrog(position, momentum, g0, eps, masses, (blr.x, blr.y), blr.nll)
        errors.append(abs(float(u + method.kinetic(p, masses) - h0)))
    assert errors[0] < 0.05 and 3.0 < errors[0] / errors[1] < 5.0


@pytest.mark.parametrize("huge_step", [1e3, 1e300], ids=["huge-energy", "non-finite-energy"])
def test_rejection_restores_the_exact_old_state(blr, huge_step):
    method = HMC(
        warm_start_epochs=0, temperature=1.0, prior=blr.prior, num_data=30, step_size=0.02, num_leapfrog=3, num_burnin=0
    )
    state, _ = run(method, detached_params(blr.model), (blr.x, blr.y), blr.nll, 3)
    forced = dataclasses.replace(state, step_size=huge_step)
    before = {k: v.clone() for k, v in flatten_state(forced)[0].items()}
    new, info = method.step(forced, (blr.x, blr.y), blr.nll, torch.Generator().manual_seed(4))
    assert info["accepted"] == 0.0 and info["accept_prob"] == 0.0
    for name in state.position:
        assert torch.equal(new.position[name], before[f"position/{name}"])
        assert torch.equal(new.gradient[name], before[f"gradient/{name}"])
        assert torch.equal(new.samples[-1][name], before[f"position/{name}"])
    assert torch.equal(new.potential, before["potential"])
    assert all(torch.equal(v, before[k]) for k, v in flatten_state(forced)[0].items())  # input untouched


def test_stored_samples_are_independent_copies_and_differ(blr):
    # a large fixed step: a mix of accepted and rejected proposals (a rejection re-stores the old position)
    method = blr_hmc(
        blr,
        step_size=0.12,
        num_leapfrog=3,
        num_burnin=5,
        thin=2,
        adapt_step_size=False,
    )
    state, infos = run(method, detached_params(blr.model), (blr.x, blr.y), blr.nll, 45)
    assert len(state.samples) == 20 and all(i["num_samples"] == 0 for i in infos[:5])
    assert 0 < sum(i["accepted"] for i in infos) < 45
    flat = [blr.flat(s) for s in state.samples]
    assert len({tuple(f.tolist()) for f in flat}) > 1
    for i, sample in enumerate(state.samples):
        position, bias = blr.flat(state.position).clone(), sample["0.bias"].clone()
        sample["0.bias"].add_(100.0)
        assert all(torch.equal(blr.flat(s), f) for j, (s, f) in enumerate(zip(state.samples, flat)) if j != i)
        assert torch.equal(blr.flat(state.position), position)
        sample["0.bias"].copy_(bias)


def test_max_samples_keeps_the_newest(blr):
    method = blr_hmc(
        blr,
        step_size=0.02,
        num_leapfrog=2,
        num_burnin=0,
        max_samples=3,
    )
    state, _ = run(method, detached_params(blr.model), (blr.x, blr.y), blr.nll, 6)
    assert len(state.samples) == 3 and torch.equal(blr.flat(state.samples[-1]), blr.flat(state.position))


def test_checkpoint_round_trip_continues_identically(blr):
    method = blr_hmc(
        blr,
        step_size=0.02,
        num_leapfrog=3,
        num_burnin=4,
        jitter=0.1,
    )
    for steps in (0, 2):  # before any cache exists, and mid burn-in; then past burn-in
        assert_resumes_identically(method, HMCState, blr, torch.Generator().manual_seed(5), steps, 6)


def test_classification_mlp_runs_and_lowers_the_loss():
    model, x, y, nll = tiny_classification()
    params = detached_params(model)
    method = make_method(
        "hmc",
        prior=prior_from_model(model),
        num_data=64,
        warm_start_epochs=0,
        step_size=0.01,
        temperature=1.0,
        num_leapfrog=10,
        num_burnin=30,
        chunk_size=16,
    )
    state, infos = run(method, params, (x, y), nll, 50)
    start = float(nll(params, x, y).mean())
    final = float(nll(method.posterior(state).sample(), x, y).mean())
    assert final < 0.8 * start and infos[-1]["accept_rate"] > 0.3


@pytest.mark.parametrize(
    "options",
    [
        {"step_size": -1.0},
        {"num_leapfrog": 0},
        {"target_accept": 1.0},
        {"mass": 0.0},
        {"mass": {"nope": 1.0}},
        {"thin": 0},
        {"chunk_size": 0},
        {"jitter": 1.5},
        {"num_data": -1},
        {"learning_rate": 0.1},
    ],
)
def test_bad_options_are_config_errors(blr, options):
    with pytest.raises(ConfigError):
        make_method("hmc", **{"prior": blr.prior, "num_data": 30, **options})


def test_posterior_without_samples_is_a_clear_error(blr):
    method = blr_hmc(blr, num_burnin=10)
    with pytest.raises(ConfigError, match="no samples"):
        method.posterior(method.init(detached_params(blr.model), torch.Generator()))


# --- the eps schedule: cache keyed on eps, samples only at the target, warm start ----------


@dataclasses.dataclass(frozen=True)
class ShiftedNLL:
    """BLR's NLL plus 50 * eps per example: U(w) grows by N * 50 * eps at every w, the way a
    robust likelihood grows with its radius (same interface as certbnn.likelihoods.BatchNLL)."""

    base: object
    eps: float

    def __call__(self, params, x, y):
        return self.base(params, x, y) + 50.0 * self.eps


def test_stale_potential_across_an_eps_change_is_recomputed(blr):
    # A potential cached at a smaller eps makes log r = U_stale - U_new = -N * 50 * d_eps (-15 per
    # 0.01 step here): every proposal rejected, the chain frozen. Keyed on eps, nothing changes.
    method = blr_hmc(
        blr,
        step_size=0.03,
        num_leapfrog=4,
        num_burnin=0,
        adapt_step_size=False,
    )
    batch, generator = (blr.x, blr.y), torch.Generator().manual_seed(7)
    state = method.init(detached_params(blr.model), generator)
    for _ in range(5):
        state, _ = method.step(state, batch, ShiftedNLL(blr.nll, 0.0), generator)
    infos = []
    for k in range(1, 41):  # eps changes at every proposal
        nll = ShiftedNLL(blr.nll, 0.01 * k)
        state, info = method.step(state, batch, nll, generator)
        infos.append(info)
        u, grad = method.potential_and_grad(state.position, batch, nll)
        assert state.potential_eps == 0.01 * k and torch.equal(state.potential, u)
        assert all(torch.equal(state.gradient[n], grad[n]) for n in grad)
    accepted = sum(i["accepted"] for i in infos)
    assert accepted >= 25, f"only {accepted} of 40 proposals accepted under a changing eps"
    assert len({tuple(blr.flat(s).tolist()) for s in state.samples[-40:]}) >= 25
    assert state.sample_eps[-40:] == [0.01 * k for k in range(1, 41)]


def test_cache_is_reused_while_eps_is_fixed(blr, monkeypatch):
    method = HMC(
        warm_start_epochs=0, temperature=1.0, prior=blr.prior, num_data=30, step_size=0.02, num_leapfrog=3, num_burnin=0
    )
    calls = []
    real = HMC.potential_and_grad
    monkeypatch.setattr(HMC, "potential_and_grad", lambda self, *a: calls.append(1) or real(self, *a))
    run(method, detached_params(blr.model), (blr.x, blr.y), ShiftedNLL(blr.nll, 0.1), 4)
    assert len(calls) == 1 + 4 * 3  # one initial evaluation, then only the leapfrog's


def test_a_float32_cached_potential_from_an_older_checkpoint_is_recomputed(blr, monkeypatch):
    """Checkpoints written before U was summed in float64 cache a rounded float32 U: the first
    step after resuming evaluates U afresh instead of judging the proposal against it."""
    method = HMC(
        warm_start_epochs=0, temperature=1.0, prior=blr.prior, num_data=30, step_size=0.02, num_leapfrog=3, num_burnin=0
    )
    state, _ = run(method, detached_params(blr.model), (blr.x, blr.y), blr.nll, 2)
    old = dataclasses.replace(state, potential=state.potential.float() + 1.0)  # as a pre-float64 checkpoint
    calls = []
    real = HMC.potential_and_grad
    monkeypatch.setattr(HMC, "potential_and_grad", lambda self, *a: calls.append(1) or real(self, *a))
    new, info = method.step(old, (blr.x, blr.y), blr.nll, torch.Generator().manual_seed(5))
    assert len(calls) == 1 + 3 and new.potential.dtype == torch.float64
    if not info["accepted"]:
        assert torch.equal(new.potential, state.potential)


@pytest.mark.parametrize("likelihood_name", ["ibp", "pgd"])
def test_chain_under_an_eps_ramp_keeps_accepting_after_burnin(likelihood_name):
    # The trainer's loop on a small ReLU net with a robust likelihood and a ramp over half the run:
    # burn-in (automatic) covers the ramp, samples are all drawn at the target eps, and the chain
    # still moves (the frozen chain of issue 11 stored 1 distinct sample out of 20; with PGD, a
    # potential that drew new random starts at every evaluation shrank the step to ~1e-8).
    from certbnn.likelihoods import BatchNLL, make_likelihood
    from certbnn.schedules import epoch_ramp

    model, x, y, _ = tiny_classification()
    x = x.sigmoid()  # inputs in [0, 1] like images
    likelihood = make_likelihood(likelihood_name)
    total, target = 40, 0.05
    schedule = epoch_ramp(target, total, 1, ramp_fraction=0.5)
    method = make_method(
        "hmc",
        prior=prior_from_model(model),
        num_data=64,
        step_size=0.04,
        num_leapfrog=10,
        temperature=1.0,
        warm_start_batch_size=16,
    ).for_schedule(schedule.first_target_step, total)
    assert method.num_burnin == schedule.first_target_step - 1 == 18  # + 1 warm-start epoch
    generator = torch.Generator().manual_seed(0)
    state, infos = method.init(detached_params(model), generator), []
    for step in range(total):
        nll = BatchNLL(likelihood, model, schedule.value(step), generator=torch.Generator().manual_seed(step))
        state, info = method.step(state, (x, y), nll, generator)
        infos.append(info)
    assert state.sample_eps == [target] * 21 and len(state.samples) == 21  # steps 20-40 (1-based)
    rate = infos[-1]["accept_rate"]
    assert 0.3 <= rate <= 0.995 and rate == pytest.approx(sum(i["accepted"] for i in infos[-21:]) / 21)
    flat = {tuple(torch.cat([t.flatten() for t in s.values()]).tolist()) for s in state.samples}
    assert len(flat) >= 6


def test_pgd_chain_at_a_large_n_over_t_is_not_rejected_by_attack_noise():
    """At N / T = 640,000 a potential that drew new PGD starts at every evaluation moved by more
    than the leapfrog's energy error: at a step of 1e-6 the chain accepted none of the 21
    proposals after burn-in. With U a function of w alone the same chain accepts them all."""
    from certbnn.likelihoods import BatchNLL, make_likelihood

    model, x, y, _ = tiny_classification()
    x = x.sigmoid()
    likelihood = make_likelihood("pgd")
    method = make_method(
        "hmc",
        prior=prior_from_model(model),
        num_data=64,
        step_size=1e-6,
        num_leapfrog=10,
        temperature=1e-4,
        warm_start_epochs=0,
        num_burnin=19,
        adapt_step_size=False,
    )
    generator = torch.Generator().manual_seed(0)
    state, accepted = method.init(detached_params(model), generator), []
    for step in range(40):
        nll = BatchNLL(likelihood, model, 0.05, generator=torch.Generator().manual_seed(step))
        state, info = method.step(state, (x, y), nll, generator)
        accepted.append(info["accepted"])
    flat = {tuple(torch.cat([t.flatten() for t in s.values()]).tolist()) for s in state.samples}
    assert sum(accepted[19:]) >= 19 and len(flat) >= 19


def test_potential_is_a_function_of_the_weights_under_a_random_attack():
    """PGD draws random starts: inside U they come from a fixed seed, not from the run's generator,
    so U and grad U at one position are the same at every evaluation (the MH test compares one
    function at two points) and the run's generator is left alone."""
    from certbnn.likelihoods import BatchNLL, make_likelihood

    model, x, y, _ = tiny_classification()
    x = x.sigmoid()
    run_generator = torch.Generator().manual_seed(3)
    before = run_generator.get_state()
    nll = BatchNLL(make_likelihood("pgd", steps=3), model, 0.1, generator=run_generator)
    method = HMC(warm_start_epochs=0, prior=prior_from_model(model), num_data=64, chunk_size=16)
    params = detached_params(model)
    (u1, g1), (u2, g2) = (method.potential_and_grad(params, (x, y), nll) for _ in range(2))
    assert torch.equal(u1, u2) and all(torch.equal(g1[n], g2[n]) for n in g1)
    assert torch.equal(run_generator.get_state(), before)
    # and the attack is random: another seed gives another U (so the check above has power)
    other = dataclasses.replace(nll, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(nll(params, x, y), other(params, x, y))


def test_for_schedule_sets_the_automatic_burnin_and_refuses_early_or_no_samples(blr):
    method = HMC(prior=blr.prior, num_data=30)  # num_burnin None, warm_start_epochs 1
    assert method.burnin == 0
    assert method.for_schedule(first_target_step=9, total_steps=20).num_burnin == 8
    assert method.for_schedule(first_target_step=0, total_steps=20).num_burnin == 0
    with pytest.raises(
        ConfigError,
        match=r"hmc: warm_start_epochs=1, num_burnin=2, thin=1 would store samples "
        r"from step 4 of 8, before eps reaches its target at step 5 \(ctx\)",
    ):
        dataclasses.replace(method, num_burnin=2).for_schedule(4, 8, context="ctx")
    with pytest.raises(ConfigError, match="hmc: warm_start_epochs=1, num_burnin=100, thin=1 stores no sample in 20"):
        dataclasses.replace(method, num_burnin=100).for_schedule(9, 20)
    with pytest.raises(ConfigError, match="stores no sample in 3 steps"):  # the ramp alone fills the run
        method.for_schedule(3, 3)


def test_warm_start_epoch_is_sgd_on_the_map_objective_not_a_proposal():
    model, x, y, nll = tiny_classification()
    params = detached_params(model)
    method = make_method(
        "hmc",
        prior=prior_from_model(model),
        num_data=64,
        warm_start_epochs=4,
        warm_start_batch_size=16,
        warm_start_lr=0.3,
        num_burnin=0,
        step_size=0.01,
    )
    state, infos = run(method, params, (x, y), nll, 4)
    assert all(i["warm_start"] == 1.0 and i["num_samples"] == 0 for i in infos)
    assert state.num_steps == 0 and state.warm_epochs_done == 4 and state.potential is None
    assert float(nll(state.position, x, y).mean()) < 0.7 * float(nll(params, x, y).mean())
    state, info = method.step(state, (x, y), nll, torch.Generator().manual_seed(1))
    assert "warm_start" not in info and state.num_steps == 1 and len(state.samples) == 1


def float32_classification(n: int = 4000):
    """(model, x, y, nll): a float32 20-64-10 ReLU MLP and ``n`` random points (N / T large)."""
    from certbnn.likelihoods import Categorical

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(n, 20), torch.randint(0, 10, (n,))

    def nll(params, xb, yb):
        return Categorical().nll(model, params, xb, yb)

    return model, x, y, nll


def test_potential_of_a_float32_network_is_summed_in_float64():
    """U = (N / (n T)) sum_i nll_i - log p(w) equals the float64 sum of the network's own float32
    per-example NLLs: at N / T = 6e6 (U ~ 1.4e7) a float32 sum was off by ~1."""
    model, x, y, nll = float32_classification()
    params, prior = detached_params(model), prior_from_model(model)
    method = HMC(warm_start_epochs=0, prior=prior, num_data=60000, temperature=0.01, chunk_size=1000)
    u, grad = method.potential_and_grad(params, (x, y), nll)
    exact = 60000 / (4000 * 0.01) * nll(params, x, y).detach().double().sum()
    exact = exact - prior.log_prob({n: p.double() for n, p in params.items()})
    assert u.dtype == torch.float64 and float(u) > 1e7
    assert abs(float(u - exact)) < 1e-6 * 1e-3 * float(exact)  # float64 rounding of the sums only
    assert all(g.dtype == torch.float32 for g in grad.values())
    momentum = {n: torch.randn(p.shape) for n, p in params.items()}
    kinetic = method.kinetic(momentum, method.masses(params))
    exact_kinetic = sum(0.5 * (p.double() ** 2).sum() for p in momentum.values())
    assert kinetic.dtype == torch.float64 and torch.allclose(kinetic, exact_kinetic, rtol=1e-12)


def test_energy_error_of_a_float32_network_shrinks_below_the_float32_rounding_of_u():
    """At tiny steps leapfrog's energy error H_old - H_new is ~0 up to the network's per-example
    rounding (~0.02 here); with U and K summed in float32 it was ~0.6 on average at U ~ 1.4e7
    (ulp 1), which the Metropolis test would judge instead of the dynamics."""
    model, x, y, nll = float32_classification()
    params = detached_params(model)
    method = HMC(warm_start_epochs=0, prior=prior_from_model(model), num_data=60000, temperature=0.01)
    masses = method.masses(params)
    u, g = method.potential_and_grad(params, (x, y), nll)
    generator = torch.Generator().manual_seed(1)
    errors = []
    for step in (1e-7, 1e-8):
        for _ in range(5):
            p = {n: torch.randn(w.shape, generator=generator) for n, w in params.items()}
            _, p_new, u_new, _ = method.leapfrog(params, p, g, step, masses, (x, y), nll)
            errors.append(abs(float(u + method.kinetic(p, masses) - u_new - method.kinetic(p_new, masses))))
    assert sum(errors) / len(errors) < 0.1, errors
