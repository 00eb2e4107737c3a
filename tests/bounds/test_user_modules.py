"""User-style modules: the engine bounds exactly what ``model(x)`` computes, or refuses.

Property tests build random chains with shared module instances (with and
without parameters, nested containers shared too), Sequential subclasses
without a custom forward, and containers whose names are not in execution
order, then check every method (IBP, CROWN, CROWN-IBP) with point params,
stacked posterior samples (``S``) and weight boxes: zero violations at sampled
points, and on point boxes the bounds equal ``model(x)`` itself. Everything the
engine cannot follow (custom forwards, overridden forwards, hooks, train-mode
stochastic layers, unsupported configurations) must raise a one-line
:class:`UnsupportedLayerError` naming the module and the reason.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from bounds_testlib import sampled_params, weight_boxes
from torch import nn
from torch.nn.utils import parametrize

from certbnn.bounds import LinearOp, check_soundness, compute_bounds, interval_forward, registry
from certbnn.bounds.checking import reference_call
from certbnn.errors import ConfigError, UnsupportedLayerError
from certbnn.layers import Normalize

METHODS = ["ibp", "crown", "crown-ibp"]


class PlainSeq(nn.Sequential):
    """A Sequential subclass that adds state and helpers but keeps Sequential.forward."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.tag = "plain"

    def describe(self) -> str:
        return f"{self.tag}: {len(self)} layers"


class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class ReversedSeq(nn.Sequential):
    def __iter__(self):
        return iter(reversed(list(self._modules.values())))


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class ClippedReLU(nn.ReLU):
    def forward(self, x):
        return torch.clamp(x, 0.0, 1.0)


class BiasFreeConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight, None)


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class OutOfOrder(nn.Module):
    """Registered second-then-first, run first-then-second."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(3, 2)
        self.first = nn.Linear(4, 3)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


# ---------------------------------------------------------------- random user-style chains


def _activation(rng: random.Random) -> nn.Module:
    kind = rng.choice(["relu", "relu", "leaky", "tanh", "sigmoid", "identity", "dropout"])
    return {
        "relu": lambda: nn.ReLU(inplace=rng.random() < 0.3),
        "leaky": lambda: nn.LeakyReLU(rng.choice([0.1, -0.4, 1.5]), inplace=rng.random() < 0.3),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "identity": nn.Identity,
        "dropout": lambda: nn.Dropout(0.4),  # evaluation mode: the identity
    }[kind]()


def _container(rng: random.Random, layers: list[nn.Module]) -> nn.Module:
    """Plain Sequential, PlainSeq, or an OrderedDict-named Sequential whose names do not sort in call order."""
    kind = rng.choice(["seq", "plain", "named"])
    if kind == "seq":
        return nn.Sequential(*layers)
    if kind == "plain":
        return PlainSeq(*layers)
    names = [f"{rng.choice('zyxmba')}{i}" for i in range(len(layers))]
    names = [n if rng.random() < 0.5 else n[::-1] for n in names]
    return nn.Sequential(OrderedDict(zip(names, layers)))


def shared_chain(seed: int) -> tuple[nn.Module, int, list[int]]:
    """A random chain of width ``w`` whose module instances repeat (Linear, BatchNorm,
    activations, and whole nested blocks); returns ``(model, d_in, ids)`` with ``ids``
    the ``id`` of every layer call in order (for checking the engine's layer list)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    w, d_in = rng.randint(2, 6), rng.randint(1, 5)
    pool: list[nn.Module] = [nn.Linear(w, w, bias=rng.random() < 0.7) for _ in range(rng.randint(1, 3))]
    pool += [_activation(rng) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.4:
        bn = nn.BatchNorm1d(w)
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
        pool.append(bn)
    block = nn.Sequential(nn.Linear(w, w), _activation(rng))  # a nested block, possibly used twice
    body = [rng.choice(pool + [block]) for _ in range(rng.randint(2, 7))]
    head = nn.Linear(w, rng.randint(1, 3))
    first: list[nn.Module] = [nn.Linear(d_in, w)]
    if rng.random() < 0.3:
        first.insert(0, Normalize(rng.uniform(-1, 1), rng.uniform(0.5, 2)))
    # nest a random run of the body in a container
    i = rng.randint(0, len(body) - 1)
    j = rng.randint(i + 1, len(body))
    layers = first + body[:i] + [_container(rng, body[i:j])] + body[j:] + [head]
    model = _container(rng, layers).double().eval()
    ids = [id(m) for m in _calls(model, d_in)]
    return model, d_in, ids


def _calls(module: nn.Module, d_in: int) -> list[nn.Module]:
    """The leaf modules ``model(x)`` calls, in order, found by running it with forward hooks."""
    seen: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda m, i, o: seen.append(m))
        for m in module.modules()
        if not isinstance(m, nn.Sequential)
    ]
    try:
        with torch.no_grad():
            module(torch.zeros(2, d_in, dtype=torch.float64))
    finally:
        for h in handles:
            h.remove()
    return seen


def _boxes(d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(5, d_in, generator=gen, dtype=torch.float64) * 2 - 1
    r = torch.tensor([0.0, 1e-3, 0.05, 0.3, 1.0], dtype=torch.float64).view(5, 1) * torch.rand(
        5, d_in, generator=gen, dtype=torch.float64
    )
    return c - r, c + r


def _assert_sound(counter, model, lower, upper, lo, up, **kw):
    assert torch.all(lo <= up + 1e-12)
    rep = check_soundness(model, lower, upper, lo, up, n_inputs=kw.pop("n_inputs", 32), **kw)
    counter["points"] += rep.n_points
    counter["values"] += rep.n_values
    assert rep.ok, f"{rep.n_violations} violations, max excess {rep.max_excess:.3g}"


def _assert_exact_at_points(model, x, params=None):
    """On a point box every method returns ``model(x)`` (per posterior sample when sampled)."""
    for method in METHODS:
        lo, up = compute_bounds(model, x, x, method, params=params)
        if params is None:
            ref = model(x)
        else:
            S = next(iter(params.values())).shape[0]
            ref = torch.stack([reference_call(model, {k: v[s] for k, v in params.items()}, x) for s in range(S)])
        torch.testing.assert_close(lo, ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(up, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(24))
def test_shared_instances_random_chains(soundness_counter, seed):
    model, d_in, ids = shared_chain(seed)
    lower, upper = _boxes(d_in, seed)
    gen = torch.Generator().manual_seed(seed)
    # the engine's layers are exactly the calls model(x) makes, shared ones once per use
    assert [id(m) for _, m in _named_layers(model, d_in)] == ids
    params = sampled_params(model, 3, gen)
    _assert_exact_at_points(model, lower)
    _assert_exact_at_points(model, lower, params)
    for method in METHODS:
        lo, up = compute_bounds(model, lower, upper, method)
        _assert_sound(soundness_counter, model, lower, upper, lo, up, generator=gen)
        lo, up = compute_bounds(model, lower, upper, method, params=params)
        assert lo.shape[0] == 3
        _assert_sound(soundness_counter, model, lower, upper, lo, up, params=params, generator=gen)
    boxes = weight_boxes(model, random.Random(seed), gen)
    lo, up = compute_bounds(model, lower, upper, "ibp", param_bounds=boxes)
    _assert_sound(soundness_counter, model, lower, upper, lo, up, param_bounds=boxes, generator=gen)
    sampled_boxes = {k: (a.expand(3, *a.shape) - 0.01, b.expand(3, *b.shape) + 0.01) for k, (a, b) in boxes.items()}
    if sampled_boxes:
        lo, up = compute_bounds(model, lower, upper, "ibp", param_bounds=sampled_boxes)
        assert lo.shape[0] == 3
        _assert_sound(soundness_counter, model, lower, upper, lo, up, param_bounds=sampled_boxes, generator=gen)


def _named_layers(model: nn.Module, d_in: int) -> list[tuple[str, nn.Module]]:
    x = torch.zeros(1, d_in, dtype=torch.float64)
    names = [n for n, _, _ in interval_forward(model, x, x)]
    modules = dict(model.named_modules(remove_duplicate=False))
    return [(n, modules[n]) for n in names]


# ---------------------------------------------------------------- the two failures of issue 11


def test_regression_shared_relu_crown_is_sound(soundness_counter):
    """One nn.ReLU instance at two places: the old engine dropped its second use and CROWN
    bounds missed sampled outputs (384 of 512 outside, by up to 0.088, for this seed)."""
    torch.manual_seed(0)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(2, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 2)).double()
    x = torch.rand(4, 2, dtype=torch.float64)
    assert [n for n, _, _ in interval_forward(model, x, x)] == ["0", "1", "2", "3", "4"]
    for method in METHODS:
        lo, up = compute_bounds(model, x - 0.3, x + 0.3, method)
        _assert_sound(
            soundness_counter, model, x - 0.3, x + 0.3, lo, up, generator=torch.Generator().manual_seed(0), n_inputs=64
        )


def test_regression_residual_sequential_subclass_is_traced(soundness_counter):
    """``x + super().forward(x)`` was flattened: bounds [0.998, 1.002] around a true output of 2.0.
    Since the graph engine (issue 14) the custom forward is traced: the sum of both branches is bounded."""
    lin = nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.zero_()
    model = nn.Sequential(nn.Identity(), Residual(lin))
    lower, upper = torch.tensor([[0.998]]), torch.tensor([[1.002]])
    assert model(torch.tensor([[1.0]])).item() == 2.0
    for method in METHODS:
        lo, up = (b.detach() for b in compute_bounds(model, lower, upper, method))
        assert float(lo) <= 2 * 0.998 + 1e-6 and float(up) >= 2 * 1.002 - 1e-6
        assert float(lo) >= 2 * 0.998 - 1e-5 and float(up) <= 2 * 1.002 + 1e-5  # exact: a linear map
        _assert_sound(soundness_counter, model, lower, upper, lo, up)


# ---------------------------------------------------------------- refusals


def _hooked(kind: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    if kind == "forward":
        model[1].register_forward_hook(lambda m, i, o: o * 2)
    elif kind == "pre":
        model.register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    return model


def _monkeypatched() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[1].forward = lambda x: x * 2
    return model


def _patched_container() -> nn.Module:
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    inner.forward = lambda x: x + inner[1](inner[0](x))  # a residual block, patched on the instance
    return nn.Sequential(inner, nn.Linear(4, 2))


def _patched_call_impl() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[2]._call_impl = lambda x: x.sum(-1, keepdim=True)
    return model


def _with_none() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 2))
    model.add_module("gap", None)
    return model


def _self_containing() -> nn.Module:
    inner = nn.Sequential(nn.Linear(4, 4))
    inner.add_module("again", inner)
    return nn.Sequential(inner)


class _Sym(nn.Module):
    def forward(self, w):
        return (w + w.t()) / 2


def _parametrized() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    parametrize.register_parametrization(model[0], "weight", _Sym())
    return model


REFUSED = {
    "linear subclass overriding forward": (
        lambda: nn.Sequential(ScaledLinear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
        r"'0' \(ScaledLinear\) overrides forward \(ScaledLinear.forward\) of Linear, so the Linear bound rule would "
        r"bound another function; register a rule for ScaledLinear",
    ),
    "relu subclass overriding forward": (
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Sequential(ClippedReLU()), nn.Linear(3, 2)),
        r"'1\.0' \(ClippedReLU\) overrides forward",
    ),
    "conv subclass overriding _conv_forward": (
        lambda: nn.Sequential(BiasFreeConv(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)),
        r"'0' \(BiasFreeConv\) overrides _conv_forward",
    ),
    "monkeypatched instance forward": (_monkeypatched, r"'1' \(ReLU\) has an instance attribute 'forward'"),
    "monkeypatched _call_impl": (_patched_call_impl, r"'2' \(Linear\) has an instance attribute '_call_impl'"),
    "forward hook": (lambda: _hooked("forward"), r"'1' \(ReLU\) has a forward hook"),
    "forward pre-hook on the container": (lambda: _hooked("pre"), r"<model> \(Sequential\) has a forward pre-hook"),
    "train-mode dropout": (
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2)).train(),
        r"'1' \(Dropout\) is in training mode with p=0.5.*call model.eval\(\)",
    ),
    "train-mode dropout2d": (
        lambda: nn.Sequential(nn.Dropout2d(0.1)).train(),
        r"'0' \(Dropout2d\) is in training mode",
    ),
    "train-mode batchnorm": (
        lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train(),
        r"'1' \(BatchNorm1d\) is in training mode.*call model.eval\(\)",
    ),
    "batchnorm without running stats": (
        lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval(),
        r"'1' \(BatchNorm1d\) has no running statistics",
    ),
    "maxpool return_indices": (
        lambda: nn.Sequential(nn.MaxPool2d(2, return_indices=True)),
        r"'0' \(MaxPool2d\) has return_indices=True",
    ),
    "flatten negative start_dim": (lambda: nn.Sequential(nn.Flatten(-3)), r"'0' \(Flatten\) has start_dim=-3"),
    "flatten start_dim 0": (lambda: nn.Sequential(nn.Flatten(0)), r"'0' \(Flatten\) has start_dim=0"),
    "None child": (_with_none, r"layer 'gap' is None"),
    "self-containing container": (_self_containing, r"'0\.again' \(Sequential\) contains itself"),
    "parametrization": (_parametrized, r"'0' \(ParametrizedLinear\) has parametrizations"),
    "lazy module": (lambda: nn.Sequential(nn.LazyLinear(3)), r"'0' \(LazyLinear\) is a lazy module"),
    "old-style weight norm (a pre-hook)": (
        lambda: nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(4, 2))),
        r"'0' \(Linear\) has a forward pre-hook",
    ),
}


# Custom forward code that the chain engine refused is traced by the graph engine (issue 14):
# bounded exactly at points and soundly on boxes (tests/bounds/test_graph*.py test graphs at large).
TRACED = {
    "custom forward with functional relu": FunctionalNet,
    "registration order != execution order": lambda: nn.Sequential(OutOfOrder()),
    "sequential subclass overriding __iter__": lambda: nn.Sequential(
        nn.Linear(4, 4), ReversedSeq(nn.Linear(4, 3), nn.ReLU())
    ),
    "monkeypatched container forward": _patched_container,
}


@pytest.mark.parametrize("case", list(TRACED))
def test_custom_forwards_are_traced(soundness_counter, case):
    torch.manual_seed(0)
    model = TRACED[case]().double()
    x = torch.rand(3, 4, dtype=torch.float64)
    _assert_exact_at_points(model, x)
    for method in METHODS:
        lo, up = compute_bounds(model, x - 0.1, x + 0.1, method)
        _assert_sound(soundness_counter, model, x - 0.1, x + 0.1, lo, up, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_refusals_name_the_module_in_one_line(case):
    make, pattern = REFUSED[case]
    model = make()
    shape = (1, 1, 4, 4) if case.startswith(("conv", "maxpool", "flatten", "train-mode dropout2d")) else (2, 4)
    x = torch.rand(*shape)
    for method in METHODS:
        with pytest.raises(UnsupportedLayerError, match=pattern) as err:
            compute_bounds(model, x - 0.1, x + 0.1, method)
        assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedLayerError, match=pattern):
        interval_forward(model, x - 0.1, x + 0.1)


def test_global_forward_hook_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.rand(2, 4)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(
            UnsupportedLayerError, match=r"^layer <model> \(Sequential\) runs under global forward hooks"
        ):
            compute_bounds(model, x, x)
    finally:
        handle.remove()
    compute_bounds(model, x, x)


def test_accepted_variants_are_exact_and_sound(soundness_counter):
    """Backward hooks, train-mode Dropout with p=0, subclasses that override nothing on the call
    path, and inplace activations change no forward value: accepted, exact and sound."""

    class InitLinear(nn.Linear):
        def reset_parameters(self) -> None:
            nn.init.uniform_(self.weight, -1, 1)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

        def extra_repr(self) -> str:
            return "custom init"

    torch.manual_seed(3)
    model = PlainSeq(
        InitLinear(4, 6),
        nn.ReLU(inplace=True),
        nn.Dropout(0.0),
        nn.Linear(6, 6),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Linear(6, 2),
    ).double()
    model.train()
    model[5].register_full_backward_hook(lambda m, gi, go: None)
    x = torch.rand(3, 4, dtype=torch.float64)
    _assert_exact_at_points(model, x)
    for method in METHODS:
        lo, up = compute_bounds(model, x - 0.2, x + 0.2, method)
        _assert_sound(soundness_counter, model, x - 0.2, x + 0.2, lo, up, generator=torch.Generator().manual_seed(1))


def test_subclass_with_its_own_rule_is_used(monkeypatch):
    class BoundScaledLinear(LinearOp):
        input_rank = 1

        def _wb(self):
            return 2 * self.t.values["weight"], 2 * self.t.values["bias"]

        def forward(self, x):
            W, b = self._wb()
            return x @ W.t() + b

        def ibp(self, lower, upper):
            W, b = self._wb()
            c, r = (lower + upper) / 2, (upper - lower) / 2
            return c @ W.t() + b - r @ W.abs().t(), c @ W.t() + b + r @ W.abs().t()

        def backward_linear(self, A):
            W, b = self._wb()
            return A @ W, (A * b).sum(-1)

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_bound(ScaledLinear, BoundScaledLinear)
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.rand(2, 4, dtype=torch.float64)
    _assert_exact_at_points(model, x)
    for method in METHODS:
        lo, up = compute_bounds(model, x - 0.1, x + 0.1, method)
        assert check_soundness(model, x - 0.1, x + 0.1, lo, up).ok


# ---------------------------------------------------------------- parameter names of shared tensors


def test_shared_module_params_use_the_canonical_name(soundness_counter):
    torch.manual_seed(1)
    lin = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(5, 2)).double()
    weight, w0 = lin.weight, lin.weight.detach().clone()
    assert "2.weight" in dict(model.named_parameters()) and "4.weight" not in dict(model.named_parameters())
    x = torch.rand(4, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    params = {"2.weight": lin.weight.detach() + 0.5 * torch.randn(3, 5, 5, generator=gen, dtype=torch.float64)}
    _assert_exact_at_points(model, x, params)  # the sampled weight replaces both uses
    boxes = {"2.weight": (lin.weight.detach() - 0.05, lin.weight.detach() + 0.05)}
    lo, up = compute_bounds(model, x - 0.1, x + 0.1, param_bounds=boxes)
    _assert_sound(soundness_counter, model, x - 0.1, x + 0.1, lo, up, param_bounds=boxes, generator=gen)
    # the reference path leaves the model as it was (torch's functional_call alone does not: pytorch#164759)
    assert model[2].weight is weight and model[4].weight is weight and isinstance(weight, nn.Parameter)
    assert torch.equal(weight, w0)
    with pytest.raises(ConfigError, match=r"'4.weight' is a second name of '2.weight'.*pass it as '2.weight'"):
        compute_bounds(model, x, x, params={"4.weight": lin.weight.detach()})
    with pytest.raises(ConfigError, match="not in the model: 9.weight"):
        compute_bounds(model, x, x, params={"9.weight": lin.weight.detach()})


def test_tied_weights_across_modules(soundness_counter):
    torch.manual_seed(2)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # tied weight, separate biases
    model = nn.Sequential(a, nn.ReLU(), b, nn.Sigmoid(), nn.Linear(4, 2)).double()
    x = torch.rand(3, 4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    params = sampled_params(model, 4, gen)
    assert "2.weight" not in params
    _assert_exact_at_points(model, x, params)
    for method in METHODS:
        lo, up = compute_bounds(model, x - 0.2, x + 0.2, method, params=params)
        _assert_sound(soundness_counter, model, x - 0.2, x + 0.2, lo, up, params=params, generator=gen)


def test_shared_conv_and_pool_with_samples(soundness_counter):
    torch.manual_seed(4)
    conv, pool, act = nn.Conv2d(2, 2, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU()
    model = nn.Sequential(conv, act, pool, conv, act, pool, nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double().eval()
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    params = sampled_params(model, 3, gen, scale=0.1)
    _assert_exact_at_points(model, x, params)
    for method in METHODS:
        lo, up = compute_bounds(model, x - 0.05, x + 0.05, method, params=params)
        _assert_sound(soundness_counter, model, x - 0.05, x + 0.05, lo, up, params=params, generator=gen)
    boxes = {"0.weight": (conv.weight.detach() - 0.02, conv.weight.detach() + 0.02)}
    lo, up = compute_bounds(model, x - 0.05, x + 0.05, param_bounds=boxes)
    _assert_sound(soundness_counter, model, x - 0.05, x + 0.05, lo, up, param_bounds=boxes, generator=gen)
