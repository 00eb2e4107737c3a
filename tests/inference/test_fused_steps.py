"""The fused (flat-buffer) steps against the simple per-parameter reference steps, with the same
noise, and the joint clean + IBP pass against ``forward`` + ``compute_bounds``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certbnn.bounds import compute_bounds, worst_case_logits
from certbnn.bounds.engine import point_and_ibp
from certbnn.functional import detached_params, forward
from certbnn.inference import flatten_state, make_method, unflatten_state
from certbnn.inference.base import grad_of, requires_grad
from certbnn.inference.flat import FlatLayout
from certbnn.inference.hmc import randn_like
from certbnn.inference.noisy_adam import data_gradients, precision_std, prior_precision, prior_pull
from certbnn.inference.sgd import adam_update, map_gradient, sgd_update
from certbnn.likelihoods import BatchNLL, cross_entropy, make_likelihood, mix_losses
from certbnn.models import build_model
from certbnn.posterior.paramdict import sample_diag_gaussian
from certbnn.priors import prior_from_model

STEPS = 4


def problem(spec: str = "mlp:12", shape: tuple[int, ...] = (1, 6, 6), seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(spec, shape, 5)
    x, y = torch.rand(24, *shape), torch.randint(0, 5, (24,))
    nll = BatchNLL(make_likelihood("ibp", lam=0.25), model, 0.05, None)
    return model, (x, y), nll


def clone_gen(g: torch.Generator) -> torch.Generator:
    copy = torch.Generator()
    copy.set_state(g.get_state())
    return copy


def assert_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


# --- the simple per-parameter reference steps (the equations of each module docstring) ------------


def ref_bbb(method, state, batch, nll, g):
    mu, rho = requires_grad(state.mu), requires_grad(state.rho)
    loss, data_term, kl = method.loss(mu, rho, batch, nll, g)
    grads = grad_of(loss, {**{"m" + n: t for n, t in mu.items()}, **{"r" + n: t for n, t in rho.items()}})
    step = state.num_steps + 1
    new_mu, m_mu, v_mu = adam_update(
        state.mu,
        {n: grads["m" + n] for n in mu},
        state.exp_avg_mu,
        state.exp_avg_sq_mu,
        step,
        method.lr,
        method.betas,
        method.eps,
        0.0,
    )
    new_rho, m_rho, v_rho = adam_update(
        state.rho,
        {n: grads["r" + n] for n in rho},
        state.exp_avg_rho,
        state.exp_avg_sq_rho,
        step,
        method.lr,
        method.betas,
        method.eps,
        0.0,
    )
    return (new_mu, new_rho, m_mu, v_mu, m_rho, v_rho), float(kl.detach())


def ref_noisy_adam(method, state, batch, nll, g):
    lam = prior_precision(method.prior, state.mean)
    weights = sample_diag_gaussian(
        state.mean, precision_std(state.exp_avg_sq, lam, method.effective_data), method.num_samples, g
    )
    grads, _ = data_gradients(weights, batch, nll)
    pull = prior_pull(state.mean, method.prior, lam, method.effective_data)
    b1, b2 = method.betas
    t = state.num_steps + 1
    share = b2**t * method.initial_precision / method.effective_data
    mean, m_new, s_new = {}, {}, {}
    for n, mu in state.mean.items():
        m = b1 * state.exp_avg[n] + (1 - b1) * (grads[n].mean(0) + pull[n])
        s = b2 * state.exp_avg_sq[n] + (1 - b2) * (grads[n] ** 2).mean(0)
        denom = ((s - share) / (1 - b2**t)).clamp_min(0).sqrt() + lam[n] / method.effective_data
        mean[n], m_new[n], s_new[n] = mu - method.lr / (1 - b1**t) * m / denom, m, s
    return mean, m_new, s_new


def ref_sghmc(method, state, batch, nll, g):
    w = requires_grad(state.position)
    lr, T = method.learning_rate, method.temperature
    grad = grad_of(method.num_data * nll(w, *batch).mean() - T * method.prior.log_prob(w), w)
    std = (2 * method.friction * lr * T) ** 0.5
    velocity = {n: (1 - method.friction) * v - lr * grad[n] + randn_like(v, g) * std for n, v in state.velocity.items()}
    return {n: state.position[n] + velocity[n] for n in velocity}, velocity


@pytest.mark.parametrize("num_samples", [1, 3])
def test_bbb_fused_step_matches_reference(num_samples):
    model, batch, nll = problem()
    method = make_method(
        "bbb",
        prior=prior_from_model(model),
        num_data=500,
        num_samples=num_samples,
        init_std=0.02,
        kl_weight=0.5,
        lr=1e-2,
    )
    g = torch.Generator().manual_seed(1)
    state = method.init(detached_params(model), g)
    for _ in range(STEPS):
        expected, kl = ref_bbb(method, state, batch, nll, clone_gen(g))
        state, info = method.step(state, batch, nll, g)
        got = (state.mu, state.rho, state.exp_avg_mu, state.exp_avg_sq_mu, state.exp_avg_rho, state.exp_avg_sq_rho)
        for a, b in zip(got, expected):
            assert_close(a, b)
        assert info["kl"] == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize(
    "name,options",
    [("sgd", {}), ("sgd", {"weight_decay": 1e-3, "prior_weight": 0.0}), ("adam", {}), ("adam", {"weight_decay": 1e-3})],
)
def test_point_estimate_fused_steps_match_reference(name, options):
    model, batch, nll = problem()
    method = make_method(name, prior=prior_from_model(model), num_data=500, **options)
    state = method.init(detached_params(model))
    params, moments = detached_params(model), None
    for step in range(1, STEPS + 1):
        grads, ref_info = map_gradient(params, batch, nll, method.prior, method.prior_weight, method.num_data)
        if name == "sgd":
            moments = moments or {n: torch.zeros_like(p) for n, p in params.items()}
            params, moments = sgd_update(params, grads, moments, method.lr, method.momentum, method.weight_decay)
        else:
            moments = moments or ({n: torch.zeros_like(p) for n, p in params.items()},) * 2
            params, *moments = adam_update(
                params, grads, *moments, step, method.lr, method.betas, method.eps, method.weight_decay
            )
        state, info = method.step(state, batch, nll, torch.Generator())
        assert_close(state.params, params)
        assert info["loss"] == pytest.approx(ref_info["loss"], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_swag_fused_step_matches_reference(optimizer):
    model, batch, nll = problem()
    method = make_method(
        "swag", prior=prior_from_model(model), num_data=500, optimizer=optimizer, lr=0.01, snapshot_every=1, rank=2
    )
    point = make_method(optimizer, prior=method.prior, num_data=500, lr=0.01)
    state, ref = method.init(detached_params(model)), point.init(detached_params(model))
    for _ in range(STEPS):
        state, _ = method.step(state, batch, nll, torch.Generator())
        ref, _ = point.step(ref, batch, nll, torch.Generator())
        assert_close(state.params, ref.params)
    assert state.num_snapshots == STEPS


@pytest.mark.parametrize("num_samples", [1, 2])
def test_noisy_adam_fused_step_matches_reference(num_samples):
    model, batch, nll = problem()
    method = make_method("noisy-adam", prior=prior_from_model(model), num_data=500, num_samples=num_samples, lr=1e-2)
    g = torch.Generator().manual_seed(3)
    state = method.init(detached_params(model), g)
    for _ in range(STEPS):
        expected = ref_noisy_adam(method, state, batch, nll, clone_gen(g))
        state, _ = method.step(state, batch, nll, g)
        for a, b in zip((state.mean, state.exp_avg, state.exp_avg_sq), expected):
            assert_close(a, b)


def test_sghmc_fused_step_matches_reference():
    model, batch, nll = problem()
    method = make_method("sghmc", prior=prior_from_model(model), num_data=500, num_burnin=0, thin=1)
    g = torch.Generator().manual_seed(4)
    state = method.init(detached_params(model), g)
    for _ in range(STEPS):
        position, velocity = ref_sghmc(method, state, batch, nll, clone_gen(g))
        state, _ = method.step(state, batch, nll, g)
        assert_close(state.position, position)
        assert_close(state.velocity, velocity)
    assert len(state.samples) == STEPS


def test_fused_state_is_views_of_one_buffer_and_checkpoints_per_parameter():
    model, batch, nll = problem()
    method = make_method("bbb", prior=prior_from_model(model), num_data=500)
    state, _ = method.step(method.init(detached_params(model)), batch, nll, torch.Generator())
    layout = FlatLayout(state.mu)
    flat = layout.backing(state.mu)
    assert flat is not None and flat.shape == (layout.numel,)
    assert layout.pack(state.mu).data_ptr() == flat.data_ptr()  # no copy
    assert layout.backing(detached_params(model)) is None  # separate tensors: packed by a copy
    tensors, spec = flatten_state(state)  # the documented per-parameter checkpoint layout
    assert set(tensors) == {f"{field}/{n}" for field in spec["fields"] if field != "num_steps" for n in state.mu}
    restored = unflatten_state(type(state), {k: v.clone() for k, v in tensors.items()}, spec)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, info_a = method.step(state, batch, nll, g1)
    b, info_b = method.step(restored, batch, nll, g2)
    assert info_a == info_b and all(torch.equal(a.rho[n], b.rho[n]) for n in a.rho)


@pytest.mark.parametrize(
    "spec,shape", [("mlp:12", (1, 6, 6)), ("cnn:4c3,p2,10", (3, 8, 8)), ("cnn:4c3s2p1,a2,8@tanh", (2, 8, 8))]
)
@pytest.mark.parametrize("num_samples", [None, 1, 3])
def test_point_and_ibp_matches_forward_and_compute_bounds(spec, shape, num_samples):
    torch.manual_seed(0)
    model = build_model(spec, shape, 5)
    x, y = torch.rand(7, *shape), torch.randint(0, 5, (7,))
    params = detached_params(model)
    if num_samples:
        params = {n: p + 0.05 * torch.randn(num_samples, *p.shape) for n, p in params.items()}
    params = requires_grad(params)
    lower, upper = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    logits, lo, hi = point_and_ibp(model, x, lower, upper, params=params)
    ref_lo, ref_hi = compute_bounds(model, lower, upper, params=params)
    ref_logits = forward(model, params, x)
    for a, b in ((logits, ref_logits), (lo, ref_lo), (hi, ref_hi)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the robust likelihood uses it: same loss and gradient as the two-pass path
    like = make_likelihood("ibp", lam=0.25)
    fast = like.nll(model, params, x, y, 0.1)
    slow = mix_losses(
        cross_entropy(ref_logits, y), cross_entropy(worst_case_logits(ref_lo, ref_hi, y), y), 0.25, "prob"
    )
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    g_fast, g_slow = grad_of(fast.sum(), params), grad_of(slow.sum(), params)
    assert_close(g_fast, g_slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("used", ["all", "bounds only"])
def test_linear_point_ibp_function_gradients_match_plain_autograd(bias, used):
    """The hand-written backward of the joint Linear pass against autograd of the plain ops
    (every input: point, box ends, weight, bias), including an unused clean output."""
    from certbnn.bounds.base import mid_rad
    from certbnn.bounds.ops_linear import _LinearPointIBP

    torch.manual_seed(0)
    x, a, b2 = torch.randn(5, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64), torch.rand(6, 7)
    lower, upper = a, a + b2.double()
    W, b = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, dtype=torch.float64) if bias else None
    inputs = [t.clone().requires_grad_() for t in (x, lower, upper, W)] + ([b.clone().requires_grad_()] if bias else [])

    def plain(x, lower, upper, W, b=None):
        c, r = mid_rad(lower, upper)
        yc, yr = F.linear(c, W, b), F.linear(r, W.abs())
        return F.linear(x, W, b), yc - yr, yc + yr

    def fused(x, lower, upper, W, b=None):
        return _LinearPointIBP.apply(x, lower, upper, W, b)

    weights = [
        torch.randn(5, 4, dtype=torch.float64),
        torch.randn(6, 4, dtype=torch.float64),
        torch.randn(6, 4, dtype=torch.float64),
    ]
    results = []
    for fn in (plain, fused):
        outs = fn(*inputs)
        assert all(torch.allclose(o, e) for o, e in zip(outs, plain(*inputs)))
        first = 0 if used == "all" else 1
        loss = sum((o * w).sum() for o, w in list(zip(outs, weights))[first:])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        results.append([torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)])
    for g_plain, g_fused in zip(*results):
        torch.testing.assert_close(g_fused, g_plain)


def test_bbb_kl_gradient_is_the_analytic_one_for_large_rho():
    """softplus saturates (rho > 20): the analytic d/drho = d/dsigma sigmoid(rho) still matches autograd."""
    model, batch, nll = problem()
    method = make_method("bbb", prior=prior_from_model(model), num_data=500, init_std=25.0, kl_weight=1.0)
    g = torch.Generator().manual_seed(6)
    state = method.init(detached_params(model), g)
    expected, _ = ref_bbb(method, state, batch, nll, clone_gen(g))
    state, _ = method.step(state, batch, nll, g)
    assert_close(state.rho, expected[1])
    assert torch.isfinite(F.softplus(next(iter(state.rho.values())))).all()


@pytest.mark.parametrize("name", ["bbb", "sgd", "adam", "noisy-adam", "swag", "sghmc"])
def test_steps_update_the_donated_state_in_place(name):
    """The documented contract (certbnn.inference.base): the first step packs init's tensors into
    new buffers and leaves them as they were; later steps write the parameters into the donated
    state's own buffer (no per-step copy) and return views of it."""
    model, batch, nll = problem()
    method = make_method(name, prior=prior_from_model(model), num_data=500)
    g = torch.Generator().manual_seed(6)
    state = method.init(detached_params(model), g)
    initial = flatten_state(state)[0]  # the init state's own tensors (no copy)
    first = {n: t.clone() for n, t in initial.items()}
    state, _ = method.step(state, batch, nll, g)
    assert all(torch.equal(first[k], initial[k]) for k in first)
    field = next(f for f in ("mu", "params", "mean", "position") if hasattr(state, f))
    params = getattr(state, field)
    buffer = FlatLayout(params).backing(params)
    assert buffer is not None
    before = buffer.clone()
    new, _ = method.step(state, batch, nll, g)
    assert FlatLayout(params).backing(getattr(new, field)).data_ptr() == buffer.data_ptr()
    assert not torch.equal(buffer, before)  # the donated tensors now hold the new values


@pytest.mark.parametrize("constant", [True, False])
def test_precision_products_match_the_elementwise_formulas(constant):
    """Per-parameter scalar precision (the usual prior) and a general one give the plain products."""
    from certbnn.inference.flat import Precision

    torch.manual_seed(0)
    layout = FlatLayout({"a": torch.zeros(3, 4), "b": torch.zeros(5), "c": torch.zeros(0), "d": torch.zeros(2, 2)})
    if constant:
        values = torch.cat([torch.full((12,), 3.0), torch.full((5,), 0.5), torch.full((4,), 7.0)])
    else:
        values = torch.rand(layout.numel) + 0.5
    precision = Precision(values, layout)
    assert (precision.spans is not None) == constant
    x, y, out = torch.randn(layout.numel), torch.randn(layout.numel), torch.randn(layout.numel)
    expected = out + 0.3 * values * x
    torch.testing.assert_close(precision.add_scaled_(out, x, 0.3), expected)
    torch.testing.assert_close(precision.quadratic(x, y), ((x * x + y * y) * values).sum())
    torch.testing.assert_close(precision.shifted(x, 0.25), x + 0.25 * values)
    expected = out + 0.7 * values
    torch.testing.assert_close(precision.add_scaled_(out, None, 0.7), expected)
