"""The memo of the eps-box operands (``certbnn.bounds.engine.OPERAND_MEMO``, used by the IBP
likelihood through ``point_and_ibp_eps``): the same U and grad U bit for bit as recomputing the box
every time, and never an entry served for another batch, contents, eps, dtype, device or
flush-to-zero mode."""

from __future__ import annotations

import gc

import pytest
import torch

from certbnn.bounds import engine, worst_case_logits
from certbnn.bounds.engine import OPERAND_MEMO, point_and_ibp, point_and_ibp_eps
from certbnn.denormals import flush_denormals
from certbnn.functional import detached_params
from certbnn.inference.base import grad_of, requires_grad
from certbnn.inference.hmc import HMC
from certbnn.likelihoods import BatchNLL, cross_entropy, make_likelihood, mix_losses
from certbnn.models import build_model
from certbnn.priors import prior_from_model

SHAPE = (1, 6, 6)


@pytest.fixture(autouse=True)
def empty_memo():
    OPERAND_MEMO.clear()
    yield
    OPERAND_MEMO.clear()


@pytest.fixture
def builds(monkeypatch):
    """Counts the operand builds of ``point_and_ibp_eps`` (memo misses)."""
    calls = []
    real = engine.point_box_operands

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(engine, "point_box_operands", counted)
    return calls


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32, spec: str = "mlp:16"):
    torch.manual_seed(seed)
    model = build_model(spec, SHAPE, 5).to(dtype)
    return model, detached_params(model)


def reference(model, x, eps, params):
    """The simple path: the box built from ``x`` on every call."""
    return point_and_ibp(model, x, (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0), params, check_order=False)


def loss_and_grads(fn, model, x, y, eps, params):
    w = requires_grad(params)
    logits, lo, hi = fn(model, x, eps, w)
    loss = mix_losses(cross_entropy(logits, y), cross_entropy(worst_case_logits(lo, hi, y), y), 0.25, "prob").sum()
    return [loss.detach(), *grad_of(loss, w).values()]


def assert_same(model, x, y, eps, params):
    """``point_and_ibp_eps`` (memoised) and the simple path: equal loss and gradients, bit for bit."""
    got = loss_and_grads(point_and_ibp_eps, model, x, y, eps, params)
    want = loss_and_grads(reference, model, x, y, eps, params)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


class ReferenceNLL:
    """The IBP likelihood of ``make_likelihood("ibp")`` computed by the simple path."""

    def __init__(self, model, eps: float, lam: float = 0.25, mix: str = "prob") -> None:
        self.model, self.eps, self.lam, self.mix = model, eps, lam, mix

    def __call__(self, params, x, y):
        logits, lo, hi = reference(self.model, x, self.eps, params)
        robust = cross_entropy(worst_case_logits(lo, hi, y), y)
        return mix_losses(cross_entropy(logits, y), robust, self.lam, self.mix)


@pytest.mark.parametrize("lam,mix", [(0.25, "prob"), (0.5, "loss")])
def test_hmc_potential_and_grad_bitwise_equal_and_built_once(builds, lam, mix):
    """Full-batch HMC in 3 chunks, evaluated 3 times: the operands are built once per chunk and U,
    grad U equal the simple path's bit for bit every time."""
    model, params = mlp()
    x, y = torch.rand(50, *SHAPE), torch.randint(0, 5, (50,))
    hmc = HMC(prior=prior_from_model(model), num_data=1000, chunk_size=20)
    nll = BatchNLL(make_likelihood("ibp", lam=lam, mix=mix), model, 0.1)
    u_ref, g_ref = hmc.potential_and_grad(params, (x, y), ReferenceNLL(model, 0.1, lam, mix))
    for _ in range(3):
        u, g = hmc.potential_and_grad(params, (x[:], y), nll)  # a fresh view each time, as the trainer
        assert torch.equal(u, u_ref) and all(torch.equal(g[n], g_ref[n]) for n in g_ref)
    assert builds == [torch.Size([20, 36]), torch.Size([20, 36]), torch.Size([10, 36])]
    assert len(OPERAND_MEMO) == 3


def test_hmc_leapfrog_bitwise_equal():
    """A whole proposal (several leapfrog steps, moving weights) with and without the memo."""
    model, params = mlp()
    x, y = torch.rand(30, *SHAPE), torch.randint(0, 5, (30,))
    hmc = HMC(prior=prior_from_model(model), num_data=1000, chunk_size=16, num_leapfrog=4, warm_start_epochs=0)
    results = []
    for nll in (ReferenceNLL(model, 0.1), BatchNLL(make_likelihood("ibp"), model, 0.1)):
        g = torch.Generator().manual_seed(1)
        state = hmc.init(params, g)
        state, _ = hmc.step(state, (x, y), nll, g)
        results.append((state.potential, state.gradient, state.position))
    (u1, g1, w1), (u2, g2, w2) = results
    assert torch.equal(u1, u2)
    assert all(torch.equal(g1[n], g2[n]) and torch.equal(w1[n], w2[n]) for n in g1)


def test_new_batch_in_place_write_and_eps_are_never_stale(builds):
    model, params = mlp()
    x, y = torch.rand(12, *SHAPE), torch.randint(0, 5, (12,))
    assert_same(model, x, y, 0.1, params)
    assert_same(model, x, y, 0.1, params)
    assert len(builds) == 1
    assert_same(model, x, y, 0.2, params)  # another eps
    x2 = x.clone()  # another batch, the same values
    assert_same(model, x2, y, 0.2, params)
    x2.mul_(0.5)  # written in place
    assert_same(model, x2, y, 0.2, params)
    x2[3:5].add_(0.25)  # through a view: the root's version counter
    assert_same(model, x2, y, 0.2, params)
    with torch.no_grad():
        x2[0, 0, 0, 0] = 0.75
    assert_same(model, x2, y, 0.2, params)
    assert_same(model, x2[2:8], y[2:8], 0.2, params)  # another chunk of the same batch
    assert_same(model, x2[:6], y[:6], 0.2, params)
    assert_same(model, x2[::2], y[::2], 0.2, params)  # the same offset and shape, strided
    assert len(builds) == 9


def test_dtype_and_flush_mode_are_part_of_the_key(builds):
    model, params = mlp()
    model64, params64 = mlp(dtype=torch.float64)
    x, y = torch.rand(12, *SHAPE), torch.randint(0, 5, (12,))
    assert_same(model, x, y, 0.1, params)
    x64 = x.double()
    assert_same(model64, x64, y, 0.1, params64)
    # one storage read as float16 and as bfloat16 (two roots sharing one version counter)
    x16 = x.half()
    for dtype, view in ((torch.float16, x16), (torch.bfloat16, x16.view(torch.bfloat16))):
        model_d, params_d = mlp(dtype=dtype)
        assert_same(model_d, view, y, 0.1, params_d)
    # subnormal box ends: flush-to-zero changes the operands; each mode gets its own
    tiny = torch.full((12, *SHAPE), 3e-38)
    with flush_denormals(True):
        assert_same(model, tiny, y, 2e-38, params)
        flushed = loss_and_grads(point_and_ibp_eps, model, tiny, y, 2e-38, params)
    with flush_denormals(False):
        assert_same(model, tiny, y, 2e-38, params)
        gradual = loss_and_grads(point_and_ibp_eps, model, tiny, y, 2e-38, params)
    if torch.set_flush_denormal(False):  # DAZ supported: the modes differ here
        assert not all(torch.equal(a, b) for a, b in zip(flushed, gradual))
    assert len(builds) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_is_part_of_the_key(builds):
    model, params = mlp()
    x, y = torch.rand(12, *SHAPE), torch.randint(0, 5, (12,))
    assert_same(model, x, y, 0.1, params)
    gpu = {n: p.cuda() for n, p in params.items()}
    assert_same(model.cuda(), x.cuda(), y.cuda(), 0.1, gpu)
    assert len(builds) == 2


def test_one_batch_held_and_released_with_it(builds):
    """Minibatch training: a new batch each step replaces the previous batch's entries; a batch
    that dies takes its entries with it."""
    model, params = mlp()
    for _ in range(5):
        x, y = torch.rand(8, *SHAPE), torch.randint(0, 5, (8,))
        assert_same(model, x, y, 0.1, params)
        assert len(OPERAND_MEMO) == 1
    assert len(builds) == 5
    del x
    gc.collect()
    assert len(OPERAND_MEMO) == 0


def test_entries_bounded_by_three_times_the_batch():
    """Overlapping views of one batch: the entries never hold more than 3x its storage."""
    model, params = mlp()
    x, y = torch.rand(40, *SHAPE), torch.randint(0, 5, (40,))
    for start in range(0, 30):
        assert_same(model, x[start : start + 10], y[start : start + 10], 0.1, params)
        held = OPERAND_MEMO._held
        assert held is not None and held.size <= 3 * x.untyped_storage().nbytes()
    # an expanded view larger than its storage is computed, not stored
    wide = x[:1].expand(60, *SHAPE)
    assert_same(model, wide, torch.zeros(60, dtype=torch.long), 0.1, params)
    assert len(OPERAND_MEMO) == 0


def test_not_memoised_where_it_cannot_be_keyed_or_does_not_apply(builds):
    model, params = mlp()
    y = torch.randint(0, 5, (6,))
    with torch.inference_mode():
        x_inf = torch.rand(6, *SHAPE)  # no version counter
    assert_same(model, x_inf, y, 0.1, params)
    x = torch.rand(6, *SHAPE)
    assert_same(model, x, y, torch.tensor(0.1).item(), params)  # a float eps: memoised
    assert_same(model, x, y, 0.0, params)
    assert len(builds) == 2
    sampled = {n: p + 0.01 * torch.randn(3, *p.shape) for n, p in params.items()}  # 3 weight samples
    assert_same(model, x, y, 0.1, sampled)
    one = {n: p.unsqueeze(0) for n, p in params.items()}  # one sample: still one matrix
    assert_same(model, x, y, 0.1, one)
    cnn, cnn_params = mlp(spec="cnn:4c3,8")
    assert_same(cnn, x, y, 0.1, cnn_params)
    assert len(builds) == 3
    # an input requiring grad: its gradient is the simple path's
    xs = [x.clone().requires_grad_() for _ in range(2)]
    grads = []
    for fn, xg in zip((point_and_ibp_eps, reference), xs):
        logits, lo, hi = fn(model, xg, 0.1, params)
        (g,) = torch.autograd.grad((logits.sum() + lo.sum() - hi.sum()), xg)
        grads.append(g)
    assert torch.equal(*grads) and len(builds) == 3


def test_negative_eps_keeps_the_order_check():
    from certbnn.errors import ConfigError

    model, params = mlp()
    x = torch.rand(4, *SHAPE)
    with pytest.raises(ConfigError, match="lower > upper"):
        point_and_ibp_eps(model, x, -0.1, params)
    assert len(OPERAND_MEMO) == 0
