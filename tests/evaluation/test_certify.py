"""Certificates against attacks: a strong PGD must never break what a sound certificate certifies."""

import math

import pytest
import torch
from prototype_net import prototype_net
from torch.func import functional_call

from certbnn.attacks import pgd
from certbnn.bounds import compute_bounds, margin_spec
from certbnn.errors import ConfigError
from certbnn.evaluation.certify import (
    box_log_mass_lower,
    certified_accuracy,
    certified_radius,
    certify_decision,
    certify_paper,
    certify_statistical,
    certify_weight_box,
    per_sample_certified,
    statistical_certified_radius,
)
from certbnn.functional import forward
from certbnn.posterior import GaussianPosterior, SamplePosterior

K = 3
F64 = torch.float64


@pytest.fixture(scope="module")
def trained():
    """A 36-16-3 ReLU MLP trained (300 Adam steps) on three noisy prototypes; a Gaussian
    posterior around its weights (std 0.02); 64 held-out points."""
    model, mean, posterior, x, y = prototype_net(K, seed=0, steps=300, std=0.02, test_points=64)
    assert bool((model(x).argmax(-1) == y).all())
    return model, mean, posterior, x, y


def _margin(logits, y):
    """max_{j != y} z_j - z_y (>= 0 means the attack succeeded)."""
    true = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[-1]).bool(), -math.inf).amax(-1) - true


def _attack_successes(model, params, x, y, eps, seed=0):
    """Strong PGD (50 steps, 5 restarts, random start) on the margin, each row ``i`` of
    ``x`` with its own weights ``params[name][i]``; returns the number of rows broken."""

    def logits(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),))[0]

    def loss_fn(xa):
        return _margin(torch.vmap(logits)(params, xa), y)

    if x.shape[0] == 0:
        return 0
    x_adv = pgd(loss_fn, x, eps, steps=50, restarts=5, generator=torch.Generator().manual_seed(seed))
    assert float((x_adv - x).abs().max()) <= eps + 1e-6 and bool(((x_adv >= 0) & (x_adv <= 1)).all())
    with torch.no_grad():
        return int((loss_fn(x_adv) >= 0).sum())


def _rows(params, index):
    return {n: t[index] for n, t in params.items()}


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_pgd_never_breaks_per_sample_certificates(trained, method):
    model, mean, posterior, x, y = trained
    certified_total = 0
    for eps in (0.06, 0.1):
        cert = per_sample_certified(model, mean, x, y, eps, method=method, dtype=F64)
        assert cert.shape == (1, 64)
        idx = cert[0].nonzero().squeeze(1)
        certified_total += idx.numel()
        params = {n: t.expand(idx.numel(), *t.shape) for n, t in mean.items()}
        assert _attack_successes(model, params, x[idx], y[idx], eps) == 0
    assert certified_total >= 10  # the check is not vacuous
    # ... and the attack is not toothless: it breaks points at a radius nothing is certified at.
    params = {n: t.expand(64, *t.shape) for n, t in mean.items()}
    assert not per_sample_certified(model, mean, x, y, 0.3, method=method).any()
    assert _attack_successes(model, params, x, y, 0.3) > 0


def test_pgd_never_breaks_certified_posterior_samples(trained):
    model, _, posterior, x, y = trained
    samples = posterior.sample(8, torch.Generator().manual_seed(1))
    cert = per_sample_certified(model, samples, x, y, 0.1, dtype=F64)  # (S, B)
    s_idx, b_idx = cert.nonzero().unbind(1)
    assert cert.shape == (8, 64) and s_idx.numel() >= 20
    assert _attack_successes(model, _rows(samples, s_idx), x[b_idx], y[b_idx], 0.1) == 0


def _box_params(posterior, ks, idx, reps, gen):
    """Per point in ``idx``, ``reps`` weight sets inside its box ``mu ± k_l sigma`` (half random corners,
    half uniform draws), stacked: name -> (len(idx) * reps, *shape)."""
    params = {}
    for name, mu in posterior.mean().items():
        k = ks[name][idx].float().repeat_interleave(reps).view(-1, *[1] * mu.dim())
        u = torch.rand(k.shape[0], *mu.shape, generator=gen) * 2 - 1
        corner = (torch.arange(k.shape[0]) % reps < reps // 2).view(-1, *[1] * mu.dim())
        params[name] = mu + k * posterior.std()[name] * torch.where(corner, u.sign(), u)
    return params


def test_pgd_never_breaks_weights_inside_a_verified_box(trained):
    model, _, posterior, x, y = trained
    eps = 0.08
    res = certify_weight_box(model, posterior, x, y, eps, dtype=F64)
    idx = res["verified"].nonzero().squeeze(1)
    assert idx.numel() >= 10
    reps = 8
    params = _box_params(posterior, res["k"], idx, reps, torch.Generator().manual_seed(2))
    rows = idx.repeat_interleave(reps)
    assert _attack_successes(model, params, x[rows], y[rows], eps) == 0


def _exact_log_mass(ks: dict, b: int, posterior) -> float:
    """log prod_l erf(k_l / sqrt 2)^{n_l} in 60-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        return float(
            sum(
                t.numel() * mpmath.log(mpmath.erf(mpmath.mpf(float(ks[n][b])) / mpmath.sqrt(2)))
                for n, t in posterior.mean().items()
            )
        )


def test_weight_box_lower_bound_is_the_rounded_down_mass_of_the_box_verified(trained):
    model, _, posterior, x, y = trained
    res = certify_weight_box(model, posterior, x, y, 0.05, k_max=5.0, iters=12, refine=1)
    ks, log_lower = res["k"], res["log_lower"]
    assert bool(res["verified"].all())
    for b in range(0, 64, 9):
        exact = _exact_log_mass(ks, b, posterior)
        assert float(log_lower[b]) <= exact and float(log_lower[b]) == pytest.approx(exact, rel=1e-9)
        assert float(res["log10_lower"][b]) <= exact / math.log(10)
        # the box mu ± k_l sigma of those k_l is verified by a direct call of the engine
        lo, up = (x[b : b + 1] - 0.05).clamp(0, 1), (x[b : b + 1] + 0.05).clamp(0, 1)
        box = {
            n: (mu - float(ks[n][b]) * posterior.std()[n], mu + float(ks[n][b]) * posterior.std()[n])
            for n, mu in posterior.mean().items()
        }
        m_lo, _ = compute_bounds(
            model, lo, up, param_bounds=box, spec=margin_spec(y[b : b + 1], K, exclude_true=True), dtype=F64, tol="auto"
        )
        assert bool((m_lo > 0).all())
    # a box one common-bisection step wider than the common k is not verified (k is maximal to that resolution)
    common = certify_weight_box(model, posterior, x[:8], y[:8], 0.05, refine=0)
    kc = common["k"]["1.weight"]
    assert all(bool(torch.equal(common["k"][n], kc)) for n in common["k"])
    assert bool(((kc > 0) & (kc <= 5.0)).all())
    for b in range(8):
        wider = certify_weight_box(
            model, posterior, x[b : b + 1], y[b : b + 1], 0.05, k=float(kc[b]) + 5.0 / 2**12 * 1.01
        )
        assert not bool(wider["verified"][0]) or float(kc[b]) == 5.0
    # the per-tensor refinement never loses mass, and gains some
    assert bool((res["log_lower"][:8] >= common["log_lower"]).all())
    assert bool((res["log_lower"][:8] > common["log_lower"] + 1.0).any())


def test_weight_box_counts_a_point_only_when_the_bound_reaches_the_threshold(trained):
    model, mean, posterior, x, y = trained
    wide = certify_weight_box(model, posterior, x, y, 0.05, threshold=0.5)  # std 0.02: verified, tiny mass
    assert bool(wide["verified"].all()) and not bool(wide["certified"].any())
    assert bool((wide["log10_lower"] < -10).all())
    narrow = GaussianPosterior(mean, {n: torch.full_like(t, 1e-4) for n, t in mean.items()})
    for threshold in (0.0, 0.5, 0.9, 1.0):
        res = certify_weight_box(model, narrow, x, y, 0.05, threshold=threshold, iters=4)
        expected = res["verified"] & (res["log_lower"] >= math.log(threshold) if threshold else True)
        assert torch.equal(res["certified"], expected) and bool(res["verified"].all())
        assert bool(res["certified"].all()) == (threshold < 1)  # k_max = 5 in 643 dims: mass 0.9996 < 1
    assert torch.equal(res["lower"], torch.exp(res["log_lower"]) * (1 - 2.0**-50))
    with pytest.raises(ConfigError, match="threshold"):
        certify_weight_box(model, narrow, x, y, 0.05, threshold=1.5)


def test_box_log_mass_lower_against_high_precision():
    mpmath = pytest.importorskip("mpmath")
    counts = torch.tensor([1.0, 407_050.0], dtype=F64)
    for k1, k2 in ((1e-3, 0.44), (0.7, 1.0), (1.5, 4.0), (5.0, 40.0), (0.0, 1.0)):
        got = float(box_log_mass_lower(torch.tensor([k1, k2], dtype=F64), counts))
        if k1 == 0:
            assert got == -math.inf
            continue
        with mpmath.workdps(80):
            exact = sum(n * mpmath.log(mpmath.erf(mpmath.mpf(k) / mpmath.sqrt(2))) for k, n in ((k1, 1), (k2, 407_050)))
        assert got <= exact and (got == pytest.approx(float(exact), rel=1e-9, abs=1e-280)), (k1, k2)


def test_weight_box_with_given_k_and_errors(trained):
    model, mean, posterior, x, y = trained
    found = certify_weight_box(model, posterior, x, y, 0.08, refine=0)["k"]["1.weight"]
    fixed = certify_weight_box(model, posterior, x, y, 0.08, k=0.5)
    resolution = 5.0 / 2**12
    clear = (found - 0.5).abs() > resolution
    assert torch.equal(fixed["verified"][clear], (found >= 0.5)[clear])
    for ks in fixed["k"].values():
        assert bool((ks[fixed["verified"]] == 0.5).all()) and bool((ks[~fixed["verified"]] == 0).all())
    assert bool(torch.isinf(fixed["log_lower"][~fixed["verified"]]).all())
    per_tensor = certify_weight_box(model, posterior, x, y, 0.08, k={n: 0.5 for n in mean})
    assert torch.equal(per_tensor["log_lower"], fixed["log_lower"])
    stored = SamplePosterior({n: t.unsqueeze(0) for n, t in mean.items()})
    with pytest.raises(ConfigError, match="GaussianPosterior"):
        certify_weight_box(model, stored, x, y, 0.08)
    with pytest.raises(ConfigError):
        certify_weight_box(model, posterior, x, y, 0.08, k=-1.0)
    with pytest.raises(ConfigError, match="every posterior tensor"):
        certify_weight_box(model, posterior, x, y, 0.08, k={"1.weight": 0.5})


def test_decision_certificate_is_sound_by_sampling(trained):
    model, _, posterior, x, y = trained
    eps, n = 0.1, 16
    res = certify_decision(model, posterior, x, y, eps, num_samples=n, generator=torch.Generator().manual_seed(3))
    samples = {k: v.double() for k, v in posterior.sample(n, torch.Generator().manual_seed(3)).items()}
    certified = res["certified"]
    assert 5 <= int(certified.sum()) < 64
    gen = torch.Generator().manual_seed(4)
    for trial in range(64):  # uniform points and random corners of the ball, in float64
        u = torch.rand(x.shape, generator=gen, dtype=F64) * 2 - 1
        u = u.sign() if trial % 2 else u
        xs = (x.double() + eps * u).clamp(0, 1)
        probs = torch.softmax(forward(model, samples, xs), -1).mean(0)  # the Monte Carlo predictive (B, K)
        p_y = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        p_other = probs.masked_fill(torch.nn.functional.one_hot(y, K).bool(), -1.0).amax(-1)
        assert bool((p_y >= res["p_lower"] - 1e-12).all()) and bool((p_other <= res["p_other_upper"] + 1e-12).all())
        assert bool((probs.argmax(-1) == y)[certified].all())

    # PGD on the predictive's probability margin at the certified points
    idx = certified.nonzero().squeeze(1)
    samples32 = {k: v.float() for k, v in samples.items()}

    def loss_fn(xa):
        probs = torch.softmax(forward(model, samples32, xa), -1).mean(0)
        return _margin(probs, y[idx])

    x_adv = pgd(loss_fn, x[idx], eps, steps=50, restarts=5, generator=torch.Generator().manual_seed(5))
    assert int((loss_fn(x_adv) >= 0).sum()) == 0


def test_paper_and_statistical_certificates(trained):
    model, mean, posterior, x, y = trained
    paper = certify_paper(model, posterior, x, y, 0.05, generator=torch.Generator().manual_seed(0))
    assert paper["num_samples"] == 24 and paper["certified"].shape == (64,) and bool(paper["certified"].any())
    assert certify_paper(model, posterior, x[:2], y[:2], 0.05, gamma=0.1)["num_samples"] == 95
    stat = certify_statistical(
        model, posterior, x, y, 0.1, num_samples=200, sample_chunk=64, generator=torch.Generator().manual_seed(0)
    )
    assert stat["num_samples"] == 200
    assert bool((stat["lower"] <= stat["p_hat"]).all() & (stat["p_hat"] <= stat["upper"]).all())
    assert torch.equal(stat["certified"], stat["lower"] >= 0.5)
    assert 0 < int(stat["certified"].sum()) < 64
    # the sequential rule: clear-cut points stop at the first look, the rest continue; all stay consistent
    seq = certify_statistical(model, posterior, x, y, 0.1, sequential=True, generator=torch.Generator().manual_seed(0))
    used = seq["num_samples"]
    assert used.shape == (64,) and bool(((used >= 32) & (used <= 1060)).all()) and bool((used == 32).any())
    assert bool((seq["lower"] <= seq["p_hat"]).all() & (seq["p_hat"] <= seq["upper"]).all())
    clear = (stat["p_hat"] == 1) | (stat["p_hat"] == 0)
    assert torch.equal(seq["certified"][clear], stat["certified"][clear])
    assert certify_statistical(model, posterior, x[:1], y[:1], 0.0, generator=torch.Generator())["num_samples"] == 1060


def test_per_point_eps_tensors(trained):
    model, mean, posterior, x, y = trained
    levels = torch.tensor([0.0, 0.05, 0.1, 0.15])
    eps = levels[torch.arange(64) % 4]

    def same(fn, key=None):
        full = fn(eps)
        full = full if key is None else full[key]
        for level in levels:
            part = fn(float(level))
            part = part if key is None else part[key]
            sel = eps == level
            assert torch.equal(full[..., sel], part[..., sel]), (key, float(level))

    same(lambda e: per_sample_certified(model, mean, x, y, e))
    same(lambda e: certify_weight_box(model, posterior, x, y, e, k=0.5), "verified")
    same(lambda e: certify_weight_box(model, posterior, x, y, e, iters=6, refine=0), "log_lower")
    for fn in (certify_decision, certify_paper):
        same(lambda e: fn(model, posterior, x, y, e, generator=torch.Generator().manual_seed(0)), "certified")
    same(
        lambda e: certify_statistical(
            model, posterior, x, y, e, num_samples=50, generator=torch.Generator().manual_seed(0)
        ),
        "p_hat",
    )
    with pytest.raises(ConfigError):
        per_sample_certified(model, mean, x, y, torch.zeros(3))
    with pytest.raises(ConfigError):
        per_sample_certified(model, mean, x, y, -0.1)


def test_certified_radius_bisection(trained):
    model, mean, _, x, y = trained

    def cert(xx, yy, e):
        return per_sample_certified(model, mean, xx, yy, e, dtype=F64)[0]

    eps_max, iters = 0.3, 10
    radius = certified_radius(cert, x, y, eps_max=eps_max, iters=iters)
    assert radius.shape == (64,) and bool(((radius >= 0) & (radius <= eps_max)).all())
    pos = radius > 0
    assert bool(pos.any())
    assert bool(cert(x, y, radius)[pos].all()) and bool(cert(x, y, 0.99 * radius)[pos].all())
    below = radius < eps_max  # a radius one bisection step larger is not certified
    assert not bool(cert(x, y, (radius + eps_max / 2**iters * 1.01).clamp(max=1.0))[below].any())
    assert bool(cert(x, y, torch.full((64,), eps_max))[~below].all())
    clean = forward(model, mean, x).argmax(-1) == y
    acc = certified_accuracy(clean, cert(x, y, 0.1))
    assert acc == pytest.approx(float((clean & cert(x, y, 0.1)).double().mean()))
    with pytest.raises(ConfigError):
        certified_accuracy(clean, clean[:3])


def test_certified_radius_refuses_a_randomised_certificate(trained):
    model, _, posterior, x, y = trained
    gen = torch.Generator().manual_seed(0)

    def coin(xx, yy, e):  # a randomised "certificate"
        return torch.rand(xx.shape[0], generator=gen) < 0.5

    with pytest.raises(ConfigError, match="deterministic") as err:
        certified_radius(coin, x, y, eps_max=0.1)
    assert "\n" not in str(err.value)


def test_statistical_radius_corrects_for_the_tests_made(trained, monkeypatch):
    from certbnn.evaluation import certify

    model, _, posterior, x, y = trained
    seen, real = [], certify.certify_statistical

    def spy(*args, **kwargs):
        seen.append(kwargs["confidence"])
        return real(*args, **kwargs)

    monkeypatch.setattr(certify, "certify_statistical", spy)
    iters = 5
    radius = statistical_certified_radius(
        model,
        posterior,
        x[:16],
        y[:16],
        eps_max=0.2,
        iters=iters,
        confidence=0.99,
        num_samples=64,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(seen) == iters + 1 and all(c == pytest.approx(1 - 0.01 / (iters + 1)) for c in seen)
    assert radius.shape == (16,) and bool(((radius >= 0) & (radius <= 0.2)).all()) and bool((radius > 0).any())
