"""Graph engine: ``tol="sound"`` on a small residual net against exact rational arithmetic
(as test_float_rigor.py for chains), the resnet model of the registry, and the import
structure of ``certbnn.bounds`` (no cycles)."""

from __future__ import annotations

import ast
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_float_rigor import _flat, _fr, adversarial_box, adversarial_params, box_points, wild
from torch import nn

from certbnn.bounds import check_soundness, compute_bounds, margin_spec
from certbnn.models import build_model

METHODS = ["ibp", "crown", "crown-ibp"]


class TinyRes(nn.Module):
    """``head(cat(relu(h + fc2(relu(h)) * 0.5), h) - 1)`` with ``h = fc1(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        y = F.relu(h + self.fc2(torch.relu(h)) * 0.5)
        return self.head(torch.cat([y, h], 1) - 1.0)


def exact_tinyres(x: list, p: dict) -> list:
    def lin(name, v):
        W, b = _fr(p[f"{name}.weight"]), _fr(p[f"{name}.bias"])
        return [sum((w * a for w, a in zip(row, v)), bb) for row, bb in zip(W, b)]

    relu = lambda v: [max(a, Fraction(0)) for a in v]  # noqa: E731
    h = lin("fc1", x)
    y = relu([a + Fraction(1, 2) * b for a, b in zip(h, lin("fc2", relu(h)))])
    return lin("head", [a - 1 for a in y + h])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["ulp", "straddle", "wide"])
def test_sound_mode_residual_net_contains_exact_outputs(dtype, kind):
    rng, gen = random.Random(hash((str(dtype), kind)) % 1000), torch.Generator().manual_seed(3)
    model = TinyRes().to(dtype)
    viol = 0
    for trial in range(3):
        p = (
            adversarial_params(model, rng, dtype)
            if trial
            else {k: wild(v.shape, rng, dtype, -6, 2) for k, v in model.named_parameters()}
        )
        lo_b, hi_b = adversarial_box((2, 4), rng, dtype, kind)
        pts = box_points(lo_b, hi_b, 4, gen)
        for method in METHODS:
            lo, hi = compute_bounds(model, lo_b, hi_b, method, params=p, tol="sound", intersect_ibp=False)
            assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
            L, H = _fr(lo), _fr(hi)
            for x in pts:
                for b in range(x.shape[0]):
                    y = exact_tinyres(_fr(x[b]), p)
                    viol += sum(not (lv <= yv <= hv) for lv, yv, hv in zip(_flat(L[b]), y, _flat(H[b])))
    assert viol == 0


def test_sound_mode_residual_samples_and_weight_boxes():
    dtype = torch.float32
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    model = TinyRes().to(dtype)
    p = adversarial_params(model, rng, dtype, S=2)
    lo_b, hi_b = adversarial_box((2, 4), rng, dtype, "straddle")
    pts = box_points(lo_b, hi_b, 3, gen)
    viol = 0
    for method in METHODS:
        lo, hi = compute_bounds(model, lo_b, hi_b, method, params=p, tol="sound", intersect_ibp=False, sample_chunk=1)
        for s in range(2):
            ps = {k: v[s] for k, v in p.items()}
            for x in pts:
                for b in range(2):
                    y = exact_tinyres(_fr(x[b]), ps)
                    viol += sum(
                        not (Fraction(float(lo[s, b, k])) <= y[k] <= Fraction(float(hi[s, b, k]))) for k in range(2)
                    )
    boxes = {k: (v[0] - v[0].abs() * 2.0**-10, v[0] + v[0].abs() * 2.0**-12) for k, v in p.items()}
    lo, hi = compute_bounds(model, lo_b, hi_b, "ibp", param_bounds=boxes, tol="sound")
    for pick in (0, 1):
        ps = {k: ab[pick] for k, ab in boxes.items()}
        for x in pts:
            for b in range(2):
                y = exact_tinyres(_fr(x[b]), ps)
                viol += sum(not (Fraction(float(lo[b, k])) <= y[k] <= Fraction(float(hi[b, k]))) for k in range(2))
    assert viol == 0


def test_resnet_registry_model_sound_and_certifiable(soundness_counter):
    torch.manual_seed(0)
    model = build_model("resnet:4", (3, 8, 8), 10).double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    lower, upper = (x - 0.01).clamp(0, 1), (x + 0.01).clamp(0, 1)
    spec = margin_spec(torch.tensor([1, 2, 3]), 10).double()
    gen = torch.Generator().manual_seed(0)
    params = {
        k: v.detach() + 0.05 * torch.randn((2, *v.shape), generator=gen, dtype=v.dtype)
        for k, v in model.named_parameters()
    }
    for method in ("ibp", "crown-ibp"):
        lo, up = compute_bounds(model, lower, upper, method, params=params, spec=spec)
        rep = check_soundness(model, lower, upper, lo, up, params=params, spec=spec, n_inputs=64, generator=gen)
        soundness_counter["points"] += rep.n_points
        assert rep.ok
        lo32, up32 = compute_bounds(
            model.float(), lower.float(), upper.float(), method, tol="sound", dtype=torch.float32
        )
        model.double()
        rep = check_soundness(
            model, lower, upper, lo32.double(), up32.double(), n_inputs=64, generator=gen, rtol=0, atol=0
        )
        assert rep.ok
    with pytest.raises(Exception, match="resnet takes one width"):
        build_model("resnet:x", (3, 8, 8), 10)


def _imports(path: Path) -> set[str]:
    """Modules of certbnn.bounds imported anywhere in ``path`` (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("certbnn.bounds"):
            if node.module == "certbnn.bounds":
                found.update(f"certbnn.bounds.{a.name}" for a in node.names)
            else:
                found.add(node.module)
    return found


def test_bounds_package_has_no_import_cycles():
    """base -> params -> registry -> base was a circle (issue 14): every import, lazy ones included."""
    pkg = Path(__import__("certbnn.bounds", fromlist=["x"]).__file__).parent
    graph = {f"certbnn.bounds.{p.stem}": _imports(p) for p in pkg.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) == 2 or m not in graph:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "certbnn.bounds.registry" in graph["certbnn.bounds.ops_linear"]  # the walk sees real imports
