"""The graph engine (issue 14): bounds of traced ``forward`` code with residual sums,
concatenations, functional activations, reshapes, constant affine maps, pools and means.

* soundness on random DAGs with residual blocks (MLPs and CNNs) for IBP, CROWN and
  CROWN-IBP, with point params, stacked posterior samples and weight boxes: zero
  violations at sampled points, and point boxes give ``model(x)`` itself;
* the graph engine on a chain (``nn.Sequential``) returns the chain engine's bounds;
* everything it cannot bound exactly is refused in one line naming the operation.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from bounds_testlib import random_boxes, random_cnn, random_mlp, sampled_params, weight_boxes
from torch import nn

from certbnn.bounds import check_soundness, compute_bounds, interval_forward, margin_spec
from certbnn.bounds.checking import reference_call
from certbnn.bounds.graph import compute_graph
from certbnn.errors import UnsupportedLayerError

METHODS = ["ibp", "crown", "crown-ibp"]


def _act(kind: str, x: torch.Tensor) -> torch.Tensor:
    return {
        "relu": F.relu,
        "torch.relu": torch.relu,
        "method": lambda t: t.relu(),
        "tanh": torch.tanh,
        "sigmoid": lambda t: t.sigmoid(),
        "leaky": lambda t: F.leaky_relu(t, 0.1),
        "none": lambda t: t,
    }[kind](x)


ACTS = ["relu", "torch.relu", "method", "tanh", "sigmoid", "leaky", "none"]


class ResMLP(nn.Module):
    """Random residual MLP: blocks ``act(x + f(x))`` / ``x - f(x)`` / ``cat`` + projection,
    constant affine maps, a functional or module activation between them."""

    def __init__(self, rng: random.Random, d_in: int, n_out: int = 3) -> None:
        super().__init__()
        w = rng.randint(2, 6)
        self.stem = nn.Linear(d_in, w)
        self.blocks = nn.ModuleList()
        self.plan: list[tuple[str, str, float]] = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["add", "sub", "cat", "add"])
            inner = nn.Sequential(nn.Linear(w, w), nn.ReLU() if rng.random() < 0.5 else nn.Tanh(), nn.Linear(w, w))
            block = nn.ModuleDict({"f": inner})
            if kind == "cat":
                block["proj"] = nn.Linear(2 * w, w)
            if rng.random() < 0.3:
                bn = nn.BatchNorm1d(w)
                with torch.no_grad():
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 2.0)
                block["bn"] = bn
            self.blocks.append(block)
            self.plan.append((kind, rng.choice(ACTS), rng.choice([1.0, 0.5, -2.0])))
        self.register_buffer("shift", torch.randn(w))
        self.head = nn.Linear(w, n_out)

    def forward(self, x):
        h = self.stem(x)
        for block, (kind, act, scale) in zip(self.blocks, self.plan):
            f = block["f"](h)
            if "bn" in block:
                f = block["bn"](f)
            if kind == "add":
                h = h + f * scale
            elif kind == "sub":
                h = h - f / 2
            else:
                h = block["proj"](torch.cat([h, f], dim=1))
            h = _act(act, h)
        return self.head(h + self.shift)


class ResCNN(nn.Module):
    """Random residual CNN: conv stem, blocks ``relu(x + conv(relu(conv(x))))``, functional
    pools, then global mean or flatten/view, and dense layers."""

    def __init__(self, rng: random.Random, c_in: int, n_out: int = 3) -> None:
        super().__init__()
        c = rng.randint(1, 3)
        self.stem = nn.Conv2d(c_in, c, 3, padding=1)
        self.convs = nn.ModuleList()
        self.acts = []
        for _ in range(rng.randint(1, 2)):
            self.convs.append(nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)]))
            self.acts.append(rng.choice(ACTS))
        self.pool = rng.choice(["max", "avg", "none"])
        self.head_kind = rng.choice(["mean", "adaptive", "flatten", "view"])
        self.c = c
        self.head: nn.Module | None = None  # set by build() once the feature size is known
        self.n_out = n_out

    def build(self, h: int, w: int) -> ResCNN:
        if self.pool != "none":
            h, w = h // 2, w // 2
        feat = self.c if self.head_kind in ("mean", "adaptive") else self.c * h * w
        self.head = nn.Linear(feat, self.n_out)
        return self

    def forward(self, x):
        x = F.relu(self.stem(x))
        for (c1, c2), act in zip(self.convs, self.acts):
            x = _act(act, x + c2(torch.relu(c1(x))))
        if self.pool == "max":
            x = F.max_pool2d(x, 2)
        elif self.pool == "avg":
            x = F.avg_pool2d(x, 2)
        if self.head_kind == "mean":
            x = x.mean((2, 3))
        elif self.head_kind == "adaptive":
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        elif self.head_kind == "flatten":
            x = x.flatten(1)
        else:
            x = x.view(x.size(0), -1)
        return self.head(x)


def random_dag(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        d = rng.randint(1, 6)
        return ResMLP(rng, d).double().eval(), (d,)
    c, h, w = rng.randint(1, 2), rng.randint(4, 6), rng.randint(4, 6)
    return ResCNN(rng, c).build(h, w).double().eval(), (c, h, w)


def _assert_sound(counter, model, lower, upper, lo, up, **kw):
    assert torch.all(lo <= up + 1e-12), "lower bound above upper bound"
    rep = check_soundness(model, lower, upper, lo, up, n_inputs=kw.pop("n_inputs", 128), **kw)
    counter["points"] += rep.n_points
    counter["values"] += rep.n_values
    assert rep.ok, f"{rep.n_violations} violations, max excess {rep.max_excess:.3g}"


def _assert_exact_at_points(model, x, params=None):
    for method in METHODS:
        lo, up = compute_bounds(model, x, x, method, params=params)
        if params is None:
            ref = model(x)
        else:
            S = next(iter(params.values())).shape[0]
            ref = torch.stack([reference_call(model, {k: v[s] for k, v in params.items()}, x) for s in range(S)])
        torch.testing.assert_close(lo, ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(up, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_random_dags_sound_all_methods(soundness_counter, seed, kind):
    model, in_shape = random_dag(seed, kind)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lower, upper = random_boxes(in_shape, rng, gen, batch=4)
    _assert_exact_at_points(model, lower)
    params = sampled_params(model, 2, gen, scale=0.1)
    _assert_exact_at_points(model, lower, params)
    spec = margin_spec(torch.tensor([0, 1, 2, 0]), 3).double()
    for method in METHODS:
        lo, up = compute_bounds(model, lower, upper, method)
        _assert_sound(soundness_counter, model, lower, upper, lo, up, generator=gen)
        lo, up = compute_bounds(model, lower, upper, method, params=params, spec=spec)
        assert lo.shape == (2, 4, 3)
        _assert_sound(
            soundness_counter, model, lower, upper, lo, up, params=params, spec=spec, generator=gen, n_inputs=16
        )
        if method != "ibp":  # the raw relaxation is sound by itself
            lo, up = compute_bounds(model, lower, upper, method, intersect_ibp=False)
            _assert_sound(soundness_counter, model, lower, upper, lo, up, generator=gen, n_inputs=16)
    boxes = weight_boxes(model, rng, gen)
    lo, up = compute_bounds(model, lower, upper, "ibp", param_bounds=boxes)
    _assert_sound(soundness_counter, model, lower, upper, lo, up, param_bounds=boxes, n_weights=4, generator=gen)
    sboxes = {k: (torch.stack([a, a - 0.01]), torch.stack([b, b])) for k, (a, b) in boxes.items()}
    if sboxes:
        lo, up = compute_bounds(model, lower, upper, "ibp", param_bounds=sboxes)
        assert lo.shape[0] == 2
        _assert_sound(
            soundness_counter, model, lower, upper, lo, up, param_bounds=sboxes, n_weights=3, generator=gen, n_inputs=16
        )


@pytest.mark.parametrize("seed", range(4))
def test_sample_chunks_and_sampled_inputs_agree(seed):
    """Chunked sample passes equal one pass; an input with a leading S is bounded per sample."""
    model, in_shape = random_dag(seed, "cnn" if seed % 2 else "mlp")
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lower, upper = random_boxes(in_shape, rng, gen, batch=3)
    params = sampled_params(model, 3, gen, scale=0.1)
    for method in METHODS:
        whole = compute_bounds(model, lower, upper, method, params=params, sample_chunk=3)
        parts = compute_bounds(model, lower, upper, method, params=params, sample_chunk=1)
        for a, b in zip(whole, parts):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        lo_s, up_s = compute_bounds(
            model, lower.expand(3, *lower.shape), upper.expand(3, *upper.shape), method, params=params
        )
        torch.testing.assert_close(lo_s, whole[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_graph_engine_equals_chain_engine_on_sequentials(seed, kind):
    """The flat nn.Sequential path is the fast path of the graph engine: same bounds."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    model, in_shape = (random_cnn if kind == "cnn" else random_mlp)(rng, 1 + seed % 5)
    lower, upper = random_boxes(in_shape, rng, gen, batch=3)
    params = sampled_params(model, 2, gen) if seed % 2 else None
    spec = margin_spec(torch.tensor([0, 2, 1]), 3).double() if seed % 3 else None
    for method in METHODS:
        flat = compute_bounds(model, lower, upper, method, params=params, spec=spec)
        graph = compute_graph(
            model, lower, upper, method, params, None, spec, torch.float64, None, True, None, None, False
        )
        for a, b in zip(flat, graph):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_interval_forward_names_every_node():
    torch.manual_seed(0)
    model, in_shape = random_dag(3, "mlp")
    x = torch.rand(2, *in_shape, dtype=torch.float64)
    names = [n for n, _, _ in interval_forward(model, x, x)]
    assert (
        names[0] == "stem"
        and names[-1] == "head"
        and any(n.startswith("add") or n.startswith("sub") or n.startswith("cat") for n in names)
    )
    for _, lo, up in interval_forward(model, x - 0.1, x + 0.1):
        assert lo.shape[0] == 2 and bool((lo <= up).all())


# ---------------------------------------------------------------- refusals
class _Net(nn.Module):
    def __init__(self, fn, inplace_relu: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.act = nn.ReLU(inplace=inplace_relu)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def _hooked_leaf():
    net = _Net(lambda s, x: s.out(F.relu(s.fc(x)) + x))
    net.fc.register_forward_hook(lambda m, i, o: o * 2)
    return net


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


def _hooked_block():
    block = _Block()
    block.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    return nn.Sequential(block, nn.Linear(4, 2))


def _mutating(s, x):
    h = s.fc(x)
    g = h
    g += 1.0  # also changes h: traced as an out-of-place sum
    return s.out(h * 2 + g)


def _gelu():
    net = _Net(lambda s, x: s.out(s.act(s.fc(x)) + x))
    net.act = nn.GELU()
    return net


REFUSED = {
    "data-dependent control flow": (
        lambda s, x: s.out(x) if x.sum() > 0 else s.out(-x),
        r"^model <model> \(_Net\) cannot be traced by torch.fx",
    ),
    "unknown function": (lambda s, x: s.out(torch.sin(s.fc(x))), r"^operation 'sin' \(torch.sin\) has no bound rule"),
    "unknown method": (lambda s, x: s.out(s.fc(x).exp()), r"^operation 'exp' \(Tensor.exp\) has no bound rule"),
    "in-place method": (lambda s, x: s.out(s.fc(x).relu_()), r"^operation 'relu_' \(Tensor.relu_\) is an in-place"),
    "product of traced tensors": (lambda s, x: s.out(s.fc(x) * x), r"multiplies two traced tensors"),
    "indexing": (lambda s, x: s.out(s.fc(x)[:, :4]), r"indexes or slices a traced tensor"),
    "flatten over the batch": (
        lambda s, x: s.out(torch.flatten(s.fc(x)).view(-1, 4)),
        r"mixes the examples of the batch",
    ),
    "train-mode functional dropout": (lambda s, x: s.out(F.dropout(s.fc(x), 0.5)), r"dropout in training mode"),
    "mean over everything": (lambda s, x: s.out(s.fc(x)) - s.fc(x).mean(), r"averages over the batch"),
    "tuple output": (lambda s, x: (s.out(x), x), r"returns tuple: the engine bounds models whose output is one"),
    "broadcasting sum": (lambda s, x: s.out(s.fc(x) + x[:, :1]), r"indexes or slices"),
    "model tensor arithmetic": (lambda s, x: s.out(x * s.fc.weight.exp()[0]), r"computes with a tensor of the model"),
}
MODULES = {
    "forward hook on a leaf": (_hooked_leaf, r"^layer 'fc' \(Linear\) has a forward hook"),
    "pre-hook on a traced block": (_hooked_block, r"^layer '0' \(_Block\) has a forward pre-hook"),
    "in-place update read again": (lambda: _Net(_mutating), r"does not reproduce model\(x\)"),
    "inplace relu on a shared tensor": (
        lambda: _Net(lambda s, x: (lambda h: s.out(s.act(h) + h))(s.fc(x)), inplace_relu=True),
        r"^layer 'act' \(ReLU\) works in place on a tensor that another operation also reads",
    ),
    "module without a rule": (_gelu, r"^layer 'act' \(GELU\) has no bound rule"),
    "adaptive pool to 2x2": (lambda: _AdaptiveTwo(), r"output_size=2 is not supported"),
    "train-mode batchnorm in a block": (lambda: _BNBlock().train(), r"^layer 'bn' \(BatchNorm1d\) is in training mode"),
}


class _AdaptiveTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.conv(x) + 1.0, 2).flatten(1))


class _BNBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return x + self.bn(self.fc(x))


@pytest.mark.parametrize("case", list(REFUSED) + list(MODULES))
def test_refusals_are_one_line_naming_the_operation(case):
    if case in REFUSED:
        fn, pattern = REFUSED[case]
        model = _Net(fn)
    else:
        make, pattern = MODULES[case]
        model = make()
    x = torch.rand(2, 1, 5, 5) if case.startswith("adaptive") else torch.rand(2, 4)
    for method in METHODS:
        with pytest.raises(UnsupportedLayerError, match=pattern) as err:
            compute_bounds(model, x - 0.1, x + 0.1, method)
        assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedLayerError, match=pattern):
        interval_forward(model, x - 0.1, x + 0.1)


def test_global_forward_hook_is_refused_and_cached_plans_follow_changes():
    torch.manual_seed(0)
    model = _Net(lambda s, x: s.out(F.relu(s.fc(x)) * s.scale + x))
    model.scale = 2.0
    x = torch.rand(3, 4)
    lo, _ = compute_bounds(model, x, x)
    torch.testing.assert_close(lo, model(x))
    model.scale = -1.0  # a Python attribute forward reads: the cached plan must not be reused
    lo, _ = compute_bounds(model, x, x)
    torch.testing.assert_close(lo, model(x))
    handle = model.fc.register_forward_hook(lambda m, i, o: o * 3)  # after a cached trace
    try:
        with pytest.raises(UnsupportedLayerError, match=r"^layer 'fc' \(Linear\) has a forward hook"):
            compute_bounds(model, x, x)
    finally:
        handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(UnsupportedLayerError, match=r"^layer <model> \(_Net\) runs under global forward hooks"):
            compute_bounds(model, x, x)
    finally:
        handle.remove()
