"""The fast certification paths give the same certificates as the simple ones (issue 13, item 4)."""

import math

import pytest
import torch

from certbnn.bounds import compute_bounds, margin_spec
from certbnn.bounds.rounding import sound_mid_rad
from certbnn.evaluation import certify, stats
from certbnn.evaluation.certify import (
    box_log_mass_lower,
    certify_paper,
    certify_statistical,
    certify_weight_box,
    per_sample_certified,
    threshold_k,
    weight_box_grid,
)
from certbnn.functional import detached_params
from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior

K = 4


@pytest.fixture(scope="module")
def net():
    """A 36-16-4 ReLU MLP (200 Adam steps on four noisy prototypes), a Gaussian posterior
    (std 0.03) around it and 48 held-out points."""
    gen = torch.Generator().manual_seed(1)
    protos = 0.2 + 0.6 * torch.rand(K, 1, 6, 6, generator=gen)

    def data(n):
        y = torch.randint(K, (n,), generator=gen)
        return (protos[y] + 0.08 * torch.randn(n, 1, 6, 6, generator=gen)).clamp(0, 1), y

    x_train, y_train = data(512)
    torch.manual_seed(1)
    model = build_model("mlp:16", (1, 6, 6), K)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        idx = torch.randint(512, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    mean = detached_params(model)
    posterior = GaussianPosterior(mean, {n: torch.full_like(t, 0.03) for n, t in mean.items()})
    x, y = data(48)
    return model, posterior, x, y


def _simple_per_sample(model, params, x, y, eps, dtype):
    """The simple path: the per-point margin spec folded point by point."""
    lo, hi = certify._input_box(x, eps, dtype)
    m_lo, _ = compute_bounds(
        model, lo, hi, "ibp", params=params, spec=margin_spec(y, K, exclude_true=True), dtype=dtype, tol="sound"
    )
    return m_lo, (m_lo > 0).all(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_pairwise_spec_gives_the_per_point_margins(net, dtype):
    model, posterior, x, y = net
    params = posterior.sample(40, torch.Generator().manual_seed(3))
    mixed = False
    for eps in (0.02, 0.06, 0.1, 0.15):
        m_simple, cert_simple = _simple_per_sample(model, params, x, y, eps, dtype)
        lo, hi = certify._input_box(x, eps, dtype)
        m_fast = certify._margin_lower(model, params, lo, hi, y, K, "ibp")
        assert m_fast.shape == m_simple.shape == (40, 48, K - 1)
        if dtype == torch.float64:
            assert torch.allclose(m_fast, m_simple, rtol=1e-12, atol=1e-12)
        else:
            # The two GEMMs sum in different orders, so float32 results differ by a few ulps of the
            # largest margin (measured up to 3.8e-6 at |m| ~ 10 over six seeds); that is ~1/50 of the
            # rounding allowance each sound bound carries (~2e-4 below the float64 bound), and both
            # stay below the float64 bound: the gap is summation order, not a lost error term.
            scale = float(m_simple.abs().amax())
            assert torch.allclose(m_fast, m_simple, rtol=0.0, atol=8 * torch.finfo(dtype).eps * scale)
            exact, _ = _simple_per_sample(model, {k: v.double() for k, v in params.items()}, x, y, eps, torch.float64)
            assert (m_fast.double() <= exact).all() and (m_simple.double() <= exact).all()
        fast = per_sample_certified(model, params, x, y, eps, dtype=dtype)
        assert torch.equal(fast, cert_simple)
        mixed |= 0 < int(fast.sum()) < fast.numel()
    assert mixed


def test_statistical_counts_do_not_depend_on_the_slices(net, monkeypatch):
    model, posterior, x, y = net
    e = certify._eps_vector(0.08, x)
    whole = certify._count_certified(model, posterior, x, y, e, 70, 70, "ibp", torch.Generator().manual_seed(5), None)
    # the same draws, bounded 3 samples at a time
    monkeypatch.setattr(certify, "_MARGIN_ELEMENTS", 3 * 48 * K * K)
    sliced = certify._count_certified(model, posterior, x, y, e, 70, 70, "ibp", torch.Generator().manual_seed(5), None)
    assert torch.equal(whole, sliced)
    # and the counts are those of the simple path on the one shared draw of 70 samples
    params = posterior.sample(70, torch.Generator().manual_seed(5))
    assert torch.equal(whole, _simple_per_sample(model, params, x, y, 0.08, torch.float64)[1].sum(0))


def test_sequential_certificate_matches_a_point_by_point_replay(net):
    """The batched sequential test (shared draws, active points only) equals a replay of the
    rule on the same draws, point by point: the same looks, levels and stopping decisions."""
    model, posterior, x, y = net
    res = certify_statistical(
        model,
        posterior,
        x,
        y,
        0.08,
        sequential=True,
        num_samples=300,
        sample_chunk=300,
        generator=torch.Generator().manual_seed(9),
    )
    looks = stats.sequential_looks(300, 32)
    conf = stats.sequential_confidence(0.99, len(looks))
    gen = torch.Generator().manual_seed(9)
    active = torch.ones(48, dtype=torch.bool)
    draws = []
    for i, look in enumerate(looks):  # the batched code draws (look - previous look) samples per look
        params = posterior.sample(look - (looks[i - 1] if i else 0), gen)
        draws.append(_simple_per_sample(model, params, x, y, 0.08, torch.float64)[1])
        if not active.any():
            break
        cert = torch.cat(draws)
        succ = cert.sum(0)
        lower, upper = stats.one_sided_bounds(succ, look, conf)
        for b in active.nonzero().squeeze(1).tolist():
            if lower[b] >= 0.5 or upper[b] < 0.5 or look == looks[-1]:
                assert int(res["num_samples"][b]) == look and int(round(float(res["p_hat"][b]) * look)) == int(succ[b])
                assert bool(res["certified"][b]) == bool(lower[b] >= 0.5)
                active[b] = False
        # points still active in the batched run drew the same samples as every other point
        if not active.any():
            break
    assert not active.any()


def _sequential_size(n_max, first, alpha, t, p):
    """Exact probability that the sequential rule certifies when every sample is certified
    with probability ``p`` (dynamic programme over the looks on the count of successes)."""
    looks = stats.sequential_looks(n_max, first)
    conf = stats.sequential_confidence(1 - alpha, len(looks))
    alive = torch.zeros(n_max + 1, dtype=torch.float64)
    alive[0] = 1.0
    done, prev = 0.0, 0
    for look in looks:
        m = look - prev
        j = torch.arange(m + 1, dtype=torch.float64)
        inc = torch.exp(
            torch.lgamma(torch.tensor(m + 1.0))
            - torch.lgamma(j + 1)
            - torch.lgamma(m - j + 1)
            + j * math.log(p)
            + (m - j) * math.log1p(-p)
        )
        alive = torch.nn.functional.conv1d(alive.view(1, 1, -1), inc.flip(0).view(1, 1, -1), padding=m).view(-1)[
            : n_max + 1
        ]
        k = torch.arange(look + 1)
        lower, upper = stats.one_sided_bounds(k, look, conf)
        done += float(alive[: look + 1][lower >= t].sum())
        alive[: look + 1][(lower >= t) | (upper < t)] = 0.0
        prev = look
    return done


@pytest.mark.parametrize("p", [0.3, 0.45, 0.5])
def test_sequential_false_certification_rate_exactly_at_most_alpha(p):
    """Under H0 (P_rob <= t) the default sequential rule (looks 32, 64, ..., 1060, each at
    alpha/7) certifies with probability <= alpha, computed exactly; with P_rob = 0.6 it has power."""
    size = _sequential_size(1060, 32, 0.01, 0.5, p)
    assert 0 <= size <= 0.01
    assert _sequential_size(1060, 32, 0.01, 0.5, 0.6) > 0.95
    assert _sequential_size(1060, 32, 0.01, 0.5, 0.97) > 0.999


def test_weight_box_grid_gives_the_simple_path_decisions(net):
    model, posterior, x, y = net
    counts = torch.tensor([t.numel() for t in posterior.mean().values()], dtype=torch.float64)
    grid = weight_box_grid(counts, 0.5, 5.0, 25)
    assert bool((grid[1:] > grid[:-1]).all()) and float(grid[-1]) == 5.0
    e = certify._eps_vector(0.03, x)
    verified = certify._grid_verified(model, posterior, x, y, e, grid, "ibp", None)
    for g, kg in list(enumerate(grid.tolist()))[::3]:  # the simple path: that box for every point, one per point
        assert torch.equal(verified[g], certify_weight_box(model, posterior, x, y, 0.03, k=kg)["verified"]), kg
    assert 0 < int(verified.sum()) < verified.numel()
    res = certify_weight_box(model, posterior, x, y, 0.03, search="grid", grid_size=25, refine=0)
    best = torch.where(verified, grid.unsqueeze(1), torch.zeros(1, dtype=torch.float64)).amax(0)
    for name in res["k"]:
        assert torch.equal(res["k"][name], best)
    assert torch.equal(res["log_lower"], box_log_mass_lower(best.unsqueeze(-1).expand(-1, 4), counts))
    # the certified decision is that of the threshold box
    kt = threshold_k(counts, 0.5)
    simple = certify_weight_box(model, posterior, x, y, 0.03, k=kt, threshold=0.5)
    assert torch.equal(res["certified"], simple["certified"] | (best > kt) & res["certified"])
    assert torch.equal(res["certified"] & (best <= kt), simple["certified"] & (best <= kt))
    # the grid then refined per point never loses a verified box
    refined = certify_weight_box(model, posterior, x, y, 0.03, search="grid", grid_size=25, refine=1, refine_iters=3)
    assert bool((refined["log_lower"] >= res["log_lower"]).all())


def test_threshold_k_is_the_smallest_box_reaching_the_threshold():
    counts = torch.tensor([401408.0, 512.0, 5120.0, 10.0], dtype=torch.float64)
    for t in (0.5, 0.9, 1e-3):
        kt = threshold_k(counts, t)
        assert float(box_log_mass_lower(torch.full((4,), kt, dtype=torch.float64), counts)) >= math.log(t)
        assert float(box_log_mass_lower(torch.full((4,), kt * (1 - 1e-9), dtype=torch.float64), counts)) < math.log(t)
    assert 4.5 < threshold_k(counts, 0.5) < 5.2


@pytest.mark.parametrize("sound", [True, False])
def test_paper_protocol_arithmetic(net, sound):
    """``sound=False`` is the authors' plain IBP; both give the same decisions here, and the plain
    path equals plain compute_bounds on the clipped box."""
    model, posterior, x, y = net
    res = certify_paper(
        model, posterior, x, y, 0.06, generator=torch.Generator().manual_seed(2), sound=sound, dtype=torch.float32
    )
    ref = certify_paper(model, posterior, x, y, 0.06, generator=torch.Generator().manual_seed(2))
    assert torch.equal(res["certified"], ref["certified"]) and 0 < int(ref["certified"].sum()) < 48
    if not sound:
        params = posterior.sample(24, torch.Generator().manual_seed(2))
        z_lo, z_hi = compute_bounds(model, (x - 0.06).clamp(0, 1), (x + 0.06).clamp(0, 1), "ibp", params=params)
        z_hat = torch.where(torch.nn.functional.one_hot(y, K).bool(), z_lo, z_hi)
        assert torch.equal(res["certified"], torch.softmax(z_hat, -1).sum(0).argmax(-1) == y)


@pytest.mark.parametrize("sound,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.float64)])
def test_paper_mlp_fast_path_matches_the_generic_engine(net, sound, dtype, monkeypatch):
    """The MLP fast path (all samples in one GEMM) against compute_bounds: the same plain bounds,
    sound bounds enclosing the generic plain ones and within 1e-4 (float32) of the generic sound
    ones, and the same certificates and sample fractions at every radius."""
    from certbnn.evaluation import mlp_bounds

    model, posterior, x, y = net
    params = posterior.sample(24, torch.Generator().manual_seed(4))
    monkeypatch.setattr(mlp_bounds, "POINT_CHUNK", 7)  # several point chunks and sample groups
    for eps in (0.02, 0.06, 0.1):
        lo, hi = certify._input_box(x, eps, dtype)
        fast = mlp_bounds.mlp_logit_bounds(model, params, lo, hi, sound=sound)
        plain = compute_bounds(model, lo, hi, "ibp", params=params, dtype=dtype)
        if not sound:
            assert torch.allclose(fast[0], plain[0], atol=1e-5) and torch.allclose(fast[1], plain[1], atol=1e-5)
        else:
            generic = compute_bounds(model, lo, hi, "ibp", params=params, dtype=dtype, tol="sound")
            assert bool((fast[0] <= plain[0]).all() and (fast[1] >= plain[1]).all())
            slack = 1e-4 if dtype == torch.float32 else 1e-12
            assert bool((fast[0] >= generic[0] - slack).all() and (fast[1] <= generic[1] + slack).all())
        kw = {"generator": torch.Generator().manual_seed(2), "sound": sound, "dtype": dtype}
        res = certify_paper(model, posterior, x, y, eps, **kw)
        with monkeypatch.context() as m:
            m.setattr(certify, "mlp_linears", lambda model: None)  # the generic engine
            ref = certify_paper(model, posterior, x, y, eps, **dict(kw, generator=torch.Generator().manual_seed(2)))
        assert torch.equal(res["certified"], ref["certified"])
        assert torch.equal(res["sample_fraction"], ref["sample_fraction"])


def test_sound_point_boxes_have_radius_zero_not_subnormal():
    lo = torch.tensor([0.0, 0.25, -1.5, 0.0, 1e-30])
    hi = torch.tensor([0.0, 0.25, -1.0, 0.5, 1e-30])
    c, r = sound_mid_rad(lo, hi)
    assert torch.equal(r[[0, 1, 4]], torch.zeros(3)) and bool((r[[2, 3]] > 0).all())
    assert bool(((c - r <= lo) & (c + r >= hi)).all())
    smallest_normal = torch.finfo(torch.float32).tiny
    assert not bool(((r != 0) & (r.abs() < smallest_normal)).any())


def test_paper_arithmetic_setting(net):
    """``EvalOptions.paper_arithmetic``: typed and range-checked; "authors" runs the plain float32
    protocol, "sound" (the default) the rigorous one in the certificates' dtype."""
    from certbnn.errors import ConfigError
    from certbnn.evaluation.runner import EvalOptions, certificate

    assert EvalOptions().validate().paper_arithmetic == "sound"
    with pytest.raises(ConfigError, match="paper_arithmetic"):
        EvalOptions(paper_arithmetic="tf").validate()
    model, posterior, x, y = net
    common = {"method": "ibp", "dtype": torch.float64}
    for arithmetic, kw in (("authors", {"sound": False, "dtype": torch.float32}), ("sound", common)):
        options = EvalOptions(paper_arithmetic=arithmetic).validate()
        got = certificate(
            "paper", model, posterior, None, x, y, 0.06, options, torch.Generator().manual_seed(3), common
        )
        want = certify_paper(model, posterior, x, y, 0.06, generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(got["sample_fraction"], want["sample_fraction"])
