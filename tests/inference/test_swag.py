"""SWAG: running moments and deviation buffer against the recorded snapshots, the
snapshot schedule, the low-rank + diagonal sampler, the BLR approximation,
checkpoint continuation, classification."""

from __future__ import annotations

import math

import pytest
import torch
from blr import make_blr
from torch import nn

from certbnn.errors import ConfigError
from certbnn.functional import detached_params
from certbnn.inference.base import flatten_state, make_method, unflatten_state
from certbnn.inference.swag import SWAG, SWAGState
from certbnn.likelihoods import Categorical
from certbnn.posterior import GaussianPosterior, SamplePosterior
from certbnn.priors import prior_from_model

N, SIGMA, BATCH = 40, 1.0, 5


def blr_problem():
    return make_blr(n=N, d=3, sigma=SIGMA, prior_std=0.5, seed=0)


def train(method, blr, epochs: int, state=None, seed: int = 0, on_step=None, on_epoch=None):
    """Epochs of shuffled minibatches; callbacks see the state after every step / end_epoch."""
    state = method.init(detached_params(blr.model), torch.Generator()) if state is None else state
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(N, generator=g)
        for i in range(0, N, BATCH):
            idx = perm[i : i + BATCH]
            state, _ = method.step(state, (blr.x[idx], blr.y[idx]), blr.nll, g)
            if on_step:
                on_step(state)
        state = method.end_epoch(state, epoch)
        if on_epoch:
            on_epoch(state)
    return state


class Recorder:
    """Collects the params whenever the snapshot count grows (the SWAG iterates)."""

    def __init__(self):
        self.snapshots, self.count = [], 0

    def __call__(self, state):
        assert state.num_snapshots in (self.count, self.count + 1)
        if state.num_snapshots > self.count:
            self.snapshots.append({n: p.clone() for n, p in state.params.items()})
            self.count = state.num_snapshots


@pytest.mark.parametrize("every", ["epoch", 2])
def test_running_moments_equal_direct_moments_of_snapshots(every):
    blr = blr_problem()
    method = SWAG(blr.prior, N, lr=0.05, burnin_steps=3, snapshot_every=every, rank=4)
    record = Recorder()
    state = train(method, blr, 6, on_step=record, on_epoch=record)
    assert state.num_snapshots == len(record.snapshots) > 4
    for name in state.params:
        stack = torch.stack([s[name] for s in record.snapshots])
        torch.testing.assert_close(state.mean[name], stack.mean(0), atol=1e-13, rtol=1e-11)
        torch.testing.assert_close(
            state.sq_mean[name] - state.mean[name] ** 2, stack.var(0, unbiased=False), atol=1e-13, rtol=1e-9
        )
        # the ring buffer holds the last K = rank deviations w_i - mean(w_1..w_i), slot i mod K
        total, rank = len(stack), method.rank
        for i in range(total - rank, total):
            expected = stack[i] - stack[: i + 1].mean(0)
            torch.testing.assert_close(state.deviations[name][i % rank], expected, atol=1e-13, rtol=1e-10)


def test_epoch_schedule_waits_for_burnin():
    blr = blr_problem()
    method = SWAG(blr.prior, N, burnin_epochs=2)
    counts = []
    train(
        method,
        blr,
        5,
        on_step=lambda s: counts.append(("step", s.num_snapshots)),
        on_epoch=lambda s: counts.append(("epoch", s.num_snapshots)),
    )
    per_epoch = [c for kind, c in counts if kind == "epoch"]
    assert per_epoch == [0, 0, 1, 2, 3]
    steps_per_epoch = N // BATCH
    step_counts = [c for kind, c in counts if kind == "step"]
    assert step_counts == sum(([max(e - 2, 0)] * steps_per_epoch for e in range(5)), [])  # no snapshot in step()


@pytest.mark.parametrize("burnin_epochs, burnin_steps, k", [(0, 4, 3), (1, 0, 2), (1, 20, 5), (0, 0, 1)])
def test_step_schedule_counts(burnin_epochs, burnin_steps, k):
    blr = blr_problem()
    method = SWAG(blr.prior, N, burnin_epochs=burnin_epochs, burnin_steps=burnin_steps, snapshot_every=k)
    counts = []
    train(method, blr, 4, on_step=lambda s: counts.append(s.num_snapshots))
    steps_per_epoch = N // BATCH
    start = max(burnin_steps, burnin_epochs * steps_per_epoch)  # steps done when burn-in ends
    expected = [max(t - start, 0) // k for t in range(1, len(counts) + 1)]
    assert counts == expected


def test_posterior_before_any_snapshot_is_config_error():
    blr = blr_problem()
    method = SWAG(blr.prior, N, burnin_epochs=3)
    state = train(method, blr, 2)
    with pytest.raises(ConfigError, match="snapshot"):
        method.posterior(state)


def test_diagonal_posterior_and_var_clamp():
    blr = blr_problem()
    method = SWAG(blr.prior, N, rank=0, var_clamp=1e-20)
    state = train(method, blr, 1)  # one snapshot: zero variance, clamped
    posterior = method.posterior(state)
    assert isinstance(posterior, GaussianPosterior)
    for name, std in posterior.std().items():
        torch.testing.assert_close(std, torch.full_like(std, 1e-10))
        assert torch.equal(posterior.mean()[name], state.params[name])
    state = train(method, blr, 4, state=state)
    posterior = method.posterior(state)
    for name, std in posterior.std().items():
        expected = (state.sq_mean[name] - state.mean[name] ** 2).clamp(min=1e-20).sqrt()
        assert torch.equal(std, expected)


def test_low_rank_sampler_has_the_swag_covariance():
    """Draws have mean `mean` and covariance diag/2 + D D^T / (2 (K - 1)).

    With M draws, the sample mean of coordinate i has SE sqrt(S_ii / M) and a sample
    covariance entry has SE sqrt((S_ii S_jj + S_ij^2) / M) (Gaussian fourth moments);
    we allow 5 SE per entry (20 entries: family-wise false alarm < 1e-5)."""
    blr = blr_problem()
    draws = 20000
    method = SWAG(blr.prior, N, lr=0.1, snapshot_every=1, rank=6, num_posterior_samples=draws, posterior_seed=3)
    state = train(method, blr, 3)
    assert state.num_snapshots > method.rank
    samples = blr.flat(method.posterior(state).sample())
    deviations = blr.flat(state.deviations).T  # (d + 1, K)
    variance = blr.flat(method.diagonal_variance(state))
    cov = torch.diag(variance) / 2 + deviations @ deviations.T / (2 * (method.rank - 1))
    mean = blr.flat(state.mean)
    assert ((samples.mean(0) - mean).abs() <= 5 * (cov.diagonal() / draws).sqrt()).all()
    se = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / draws).sqrt()
    assert ((torch.cov(samples.T) - cov).abs() <= 5 * se).all()
    # deterministic in posterior_seed
    again = blr.flat(method.posterior(state).sample())
    assert torch.equal(samples, again)


def test_blr_posterior_approximation():
    """SWAG on BLR, SGD without momentum, with-replacement minibatches of S = 5.

    Mandt et al. 2017: constant-lr SGD iterates have stationary covariance Sigma with
    A Sigma + Sigma A = (lr / S) C (A: Hessian of the per-example objective, C: per-
    example gradient covariance). For a well-specified model C ~ A_data ~ A, so
    Sigma ~ lr / (2S) I, while the posterior is A^-1 / N ~ sigma^2 / N I here
    (x ~ N(0, I)): lr = 2 S sigma^2 / N = 0.25 matches the scale. Because Sigma is
    ~isotropic whatever the posterior correlations, SWAG (plain SGD) cannot be
    expected to reproduce correlations, so only the mean and per-coordinate scale
    are asserted:
    * mean: the iterates are ~AR(1) with rho = 1 - lr lambda per eigen-direction,
      lambda in eig(A) = [0.83, 1.43] here, so rho <= 0.79, the integrated
      autocorrelation time (1+rho)/(1-rho) <= 9 steps and the SE of the SWAG mean over
      T = 2400 snapshots <= sqrt(9/2400) ~ 0.06 iterate std; 0.5 posterior std is
      > 5 SE even if the iterate std were 1.5x the posterior's.
    * std: the prediction is ratio ~1 (the discrete-time correction (1 - lr A/2)^-1
      is <= 1.22 in variance; observed 0.93-1.31 over seeds); the variance estimate
      over T correlated snapshots has relative SE sqrt(2 tau / T) <= 0.09, and 4000
      draws add 0.01 in std, so a factor 2 either way is > 10 SE from the prediction.
    """
    blr = blr_problem()
    lr = 2 * BATCH * SIGMA**2 / N
    method = SWAG(
        blr.prior,
        N,
        lr=lr,
        momentum=0.0,
        burnin_steps=200,
        snapshot_every=1,
        prior_weight=1.0,
        num_posterior_samples=4000,
    )
    state = method.init({n: torch.zeros_like(p) for n, p in detached_params(blr.model).items()}, None)
    g = torch.Generator().manual_seed(7)
    for _ in range(200 + 2400):
        idx = torch.randint(N, (BATCH,), generator=g)
        state, _ = method.step(state, (blr.x[idx], blr.y[idx]), blr.nll, g)
    assert state.num_snapshots == 2400
    post_std = blr.cov.diagonal().sqrt()
    assert ((blr.flat(state.mean) - blr.mean).abs() < 0.5 * post_std).all()
    samples = blr.flat(method.posterior(state).sample())
    # sample mean of 4000 draws adds SE ~ 1/sqrt(4000) ~ 0.02 std
    assert ((samples.mean(0) - blr.mean).abs() < 0.5 * post_std).all()
    ratio = samples.std(0) / post_std
    assert ((ratio > 0.5) & (ratio < 2)).all(), ratio


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_checkpoint_round_trip_continues_identically(optimizer):
    blr = blr_problem()
    method = SWAG(blr.prior, N, optimizer=optimizer, snapshot_every=3, rank=3, burnin_steps=2)
    state = train(method, blr, 2)
    tensors, layout = flatten_state(state)
    restored = unflatten_state(SWAGState, {k: v.clone() for k, v in tensors.items()}, layout)
    state = train(method, blr, 2, state=state, seed=5)
    restored = train(method, blr, 2, state=restored, seed=5)
    a, b = flatten_state(state)[0], flatten_state(restored)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert flatten_state(state)[1] == flatten_state(restored)[1]
    assert torch.equal(method.posterior(state).sample()["0.weight"], method.posterior(restored).sample()["0.weight"])


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 0.01)])
def test_classification_loss_decreases(optimizer, lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()

    def nll(params, xb, yb):
        return Categorical().nll(model, params, xb, yb)

    method = make_method(
        "swag",
        prior=prior_from_model(model),
        num_data=len(x),
        optimizer=optimizer,
        lr=lr,
        burnin_epochs=30,
        rank=5,
        num_posterior_samples=16,
    )
    state = method.init(detached_params(model), g)
    before = nll(state.params, x, y).mean().item()
    for epoch in range(40):
        for i in range(0, len(x), 16):
            state, info = method.step(state, (x[i : i + 16], y[i : i + 16]), nll, g)
        state = method.end_epoch(state, epoch)
    posterior = method.posterior(state)
    assert isinstance(posterior, SamplePosterior) and posterior.num_samples == 16
    assert state.num_snapshots == 10 and info["snapshots"] == 9.0  # info precedes the last end_epoch
    after = nll(posterior.sample(), x, y).mean().item()  # (16, B): mean over samples and data
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "rmsprop"},
        {"snapshot_every": 0},
        {"snapshot_every": "step"},
        {"snapshot_every": True},
        {"rank": -1},
        {"burnin_epochs": 1.5},
        {"var_clamp": 0.0},
        {"num_posterior_samples": 0},
        {"lr": 0.0},
        {"momentum": -0.1},
        {"betas": (0.9,)},
        {"max_models": 3},
    ],
)
def test_bad_options_raise_config_error(options):
    blr = blr_problem()
    with pytest.raises(ConfigError):
        make_method("swag", prior=blr.prior, num_data=N, **options)


def test_low_rank_with_single_snapshot_falls_back_to_diagonal():
    blr = blr_problem()
    method = SWAG(blr.prior, N, rank=5, num_posterior_samples=8)
    state = train(method, blr, 1)
    samples = method.posterior(state).sample()
    # zero variance (one snapshot, var_clamp 1e-30): every draw is the snapshot itself
    for name, value in samples.items():
        torch.testing.assert_close(value, state.params[name].expand_as(value), atol=1e-14, rtol=0)
    assert math.isfinite(float(samples["0.bias"].sum()))


class EpsNLL:
    """BLR's NLL carrying the radius it stands for (like certbnn.likelihoods.BatchNLL)."""

    def __init__(self, base, eps):
        self.base, self.eps = base, eps

    def __call__(self, params, x, y):
        return self.base(params, x, y)


@pytest.mark.parametrize("every", ["epoch", 3])
def test_no_snapshot_before_the_target_eps(every):
    from certbnn.schedules import epoch_ramp

    blr = blr_problem()
    steps_per_epoch, epochs = N // BATCH, 6  # 8 steps per epoch, 48 in all
    schedule = epoch_ramp(0.1, epochs, steps_per_epoch, ramp_fraction=0.5)  # target from step 24 (1-based)
    method = SWAG(blr.prior, N, lr=0.05, snapshot_every=every, rank=2)
    method = method.for_schedule(schedule.first_target_step, epochs * steps_per_epoch, steps_per_epoch)
    assert method.burnin_steps == schedule.first_target_step + 1 == 24
    step = 0
    state = method.init(detached_params(blr.model), torch.Generator())
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        for i in range(0, N, BATCH):
            state, _ = method.step(
                state, (blr.x[i : i + BATCH], blr.y[i : i + BATCH]), EpsNLL(blr.nll, schedule.value(step)), g
            )
            step += 1
            if schedule.value(step - 1) < 0.1:
                assert state.num_snapshots == 0
        state = method.end_epoch(state, epoch)
    expected = 4 if every == "epoch" else (48 - 24) // 3  # ends of epochs 3-6; after steps 27, 30, ..., 48
    assert state.num_snapshots == expected and state.snapshot_eps == [0.1] * expected
    assert method.sampling_metadata(state) == {"snapshot_eps": [0.1] * expected}
    with pytest.raises(
        ConfigError,
        match=r"swag: burnin_epochs=2, burnin_steps=0, snapshot_every='epoch' would "
        r"store samples from step 24 of 48, before eps reaches its target at step 25",
    ):
        SWAG(blr.prior, N, burnin_epochs=2, burnin_steps=0).for_schedule(24, 48, steps_per_epoch)
    with pytest.raises(ConfigError, match="stores no sample in 48 steps"):
        SWAG(blr.prior, N, burnin_epochs=6).for_schedule(0, 48, steps_per_epoch)
