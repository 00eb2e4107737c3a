"""Certificates of BNN robustness on the l_inf ball ``T_eps(x) = [x - eps, x + eps] ∩ [0, 1]`` (SPEC §5).

Every function takes ``x`` ``(B, *in)`` in [0, 1], labels ``y`` ``(B,)`` and
``eps`` as a float or a ``(B,)`` tensor (one radius per point), and is batched
over points and posterior samples. Bounds are rigorous in floating point
(``tol="sound"`` of :func:`certbnn.bounds.compute_bounds`, input boxes rounded
outward by :func:`_input_box`), in float64 by default; ``dtype=torch.float32``
is faster and still rigorous but looser. ``method`` is the bound method of :func:`certbnn.bounds.compute_bounds`.

* :func:`per_sample_certified` -- per weight sample: every margin lower bound > 0.
* :func:`certify_paper` -- the authors' protocol (summed worst-case softmaxes).
* :func:`certify_statistical` -- exact one-sided binomial test of ``P_rob >= threshold``.
* :func:`certify_weight_box` -- sound ``P_rob >= mass(mu ± k_l sigma)`` (Gaussian); certified when >= threshold.
* :func:`certify_decision` -- the argmax of the Monte Carlo predictive is constant on the ball.
* :func:`certified_radius` (deterministic certificates), :func:`statistical_certified_radius`,
  :func:`certified_accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from certbnn.bounds import compute_bounds, margin_spec, worst_case_logits
from certbnn.bounds.rounding import add_down, add_up, cast_down, cast_up, plain_arithmetic
from certbnn.errors import ConfigError
from certbnn.evaluation import stats
from certbnn.evaluation.mlp_bounds import mlp_linears, mlp_logit_bounds
from certbnn.posterior import GaussianPosterior, is_point_mass, mixture_draws

__all__ = [
    "box_log_mass_lower",
    "certified_accuracy",
    "certified_radius",
    "certify_decision",
    "certify_paper",
    "certify_statistical",
    "certify_weight_box",
    "per_sample_certified",
    "statistical_certified_radius",
    "threshold_k",
    "weight_box_grid",
]

Eps = float | Tensor


def _eps_vector(eps: Eps, x: Tensor) -> Tensor:
    """``eps`` as a float64 ``(B,)`` tensor (checked finite and >= 0)."""
    e = torch.as_tensor(eps, dtype=torch.float64, device=x.device)
    if e.dim() == 0:
        e = e.expand(x.shape[0])
    if e.shape != (x.shape[0],):
        raise ConfigError(f"eps must be a float or a ({x.shape[0]},) tensor, got shape {tuple(e.shape)}")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ConfigError("eps must be finite and >= 0")
    return e


def _input_box(x: Tensor, eps: Eps, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """A ``dtype`` box (default float64) containing ``[clip(x - eps, 0, 1), clip(x + eps, 0, 1)]``
    exactly (``x`` and the float64 ``eps`` taken as exact reals), eps broadcast per point:
    ``x -+ eps`` rounded down/up in float64 (exact when representable), clipping (exact),
    then an outward cast to ``dtype``; under gradual underflow even where the caller turned
    flush-to-zero on (:func:`~certbnn.bounds.rounding.plain_arithmetic`)."""
    dt = dtype or torch.float64
    e = _eps_vector(eps, x).view(-1, *([1] * (x.dim() - 1)))
    xd = x.detach().to(torch.float64)  # exact for every floating dtype up to 64 bits
    with plain_arithmetic():
        lo, hi = add_down(xd, -e).clamp(0, 1), add_up(xd, e).clamp(0, 1)
        return cast_down(lo, dt), cast_up(hi, dt)


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        first = next(iter(model.parameters()), None)
        return int(model(x[:1].to(first.dtype) if first is not None else x[:1]).shape[-1])


def _pairwise_spec(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(K*K, K)``: row ``i*K + j`` is ``e_i - e_j``."""
    eye = torch.eye(k, dtype=dtype, device=device)
    return (eye.unsqueeze(1) - eye.unsqueeze(0)).reshape(k * k, k)


def _offdiag_spec(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(K*(K-1), K)``: row ``i*(K-1) + m`` is ``e_i - e_j`` for the ``m``-th ``j != i`` (increasing ``j``)."""
    keep = ~torch.eye(k, dtype=torch.bool, device=device).flatten()
    return _pairwise_spec(k, dtype, device)[keep]


def _margin_lower(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    lo: Tensor,
    hi: Tensor,
    y: Tensor,
    K: int,
    method: str,
    param_bounds: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    input_has_samples: bool | None = None,
) -> Tensor:
    """``(S, B, K-1)`` sound lower bounds of the margins ``z_y - z_j`` (``j != y``, increasing
    ``j``; ``K`` classes) over the input box ``[lo, hi]`` (``(B, *in)``, or ``(P, B, *in)``
    with ``input_has_samples``); ``S = 1`` for point parameters.

    IBP folds one shared spec of all ``K(K-1)`` ordered pairs into the last layer (one GEMM
    for every point and sample) and keeps each point's ``K-1`` rows: each row's folded weights
    ``fl(W_y - W_j)`` and their error bound are the same floats as with the per-point margin
    spec. CROWN back-substitutes the per-point spec (its cost grows with the spec's rows)."""
    yy = y.to(lo.device)
    B = yy.shape[0]
    shared = method == "ibp"
    spec = _offdiag_spec(K, lo.dtype, lo.device) if shared else margin_spec(yy, K, exclude_true=True)
    m_lo, _ = compute_bounds(
        model,
        lo,
        hi,
        method,
        params=params,
        param_bounds=param_bounds,
        spec=spec,
        dtype=lo.dtype,
        tol="sound",
        input_has_samples=input_has_samples,
    )
    m_lo = m_lo if m_lo.dim() == 3 else m_lo.unsqueeze(0)
    if not shared:
        return m_lo
    return m_lo.view(m_lo.shape[0], B, K, K - 1)[:, torch.arange(B, device=lo.device), yy]


def per_sample_certified(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    eps: Eps,
    *,
    method: str = "ibp",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``(S, B)`` bool: sample ``s`` is certified at point ``b`` iff every margin lower
    bound ``z_y - z_j`` (``j != y``) over the input box is > 0. ``params``: stacked
    ``(S, *shape)`` (an unstacked dict gives ``S = 1``)."""
    lo, hi = _input_box(x, eps, dtype)
    return (_margin_lower(model, params, lo, hi, y, _num_classes(model, x), method) > 0).all(-1)


def certify_paper(
    model: nn.Module,
    posterior,
    x: Tensor,
    y: Tensor,
    eps: Eps,
    *,
    gamma: float = 0.2,
    delta: float = 0.3,
    method: str = "ibp",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    sound: bool = True,
) -> dict:
    """The authors' protocol: ``n = hoeffding_sample_size(gamma, delta)`` samples; per
    sample the worst-case logits from separate logit bounds; ``x`` is certified when
    ``y`` is the strict argmax of ``sum_s softmax(z_hat_s)``.

    Returns ``certified`` (B,) bool, ``num_samples`` (int) and ``sample_fraction``
    (B,) float64, the fraction of samples whose own worst-case logits keep ``y``
    on top. Not a sound certificate of the predictive (the sum of worst cases is
    not the worst case of the sum; reproduce the paper only).

    ``sound=False``: the logit bounds in the authors' arithmetic, plain round-to-nearest
    IBP in ``dtype`` (default float32), on the input box clipped in float64 and cast to
    nearest. A ReLU MLP with ``method="ibp"`` takes the fast path of
    :func:`certbnn.evaluation.mlp_bounds.mlp_logit_bounds` (the same plain bounds; sound
    bounds a few ``gamma_n`` looser than the generic engine's, at almost the plain cost).
    """
    n = stats.hoeffding_sample_size(gamma, delta)
    if sound:
        lo, hi = _input_box(x, eps, dtype)
    else:
        e = _eps_vector(eps, x).view(-1, *([1] * (x.dim() - 1)))
        xd, dt = x.detach().to(torch.float64), dtype or torch.float32
        lo, hi = (xd - e).clamp(0, 1).to(dt), (xd + e).clamp(0, 1).to(dt)
    params = mixture_draws(posterior, n, generator)
    linears = mlp_linears(model) if method == "ibp" else None
    if linears is not None:  # a ReLU MLP: all samples in one GEMM per layer (evaluation/mlp_bounds.py)
        z_lo, z_hi = mlp_logit_bounds(model, params, lo, hi, sound=sound, linears=linears)
    else:
        z_lo, z_hi = compute_bounds(
            model, lo, hi, method, params=params, dtype=lo.dtype, tol="sound" if sound else None
        )
    z_hat = worst_case_logits(z_lo, z_hi, y.to(x.device))  # (S, B, K)
    onehot = torch.nn.functional.one_hot(y.to(x.device), z_hat.shape[-1]).bool()

    def y_strictly_on_top(scores: Tensor) -> Tensor:
        return scores.gather(-1, y.to(x.device).expand(scores.shape[:-1]).unsqueeze(-1)).squeeze(
            -1
        ) > scores.masked_fill(onehot, -math.inf).amax(-1)

    certified = y_strictly_on_top(torch.softmax(z_hat, -1).sum(0))
    fraction = y_strictly_on_top(z_hat).double().mean(0)
    return {"certified": certified, "num_samples": n, "sample_fraction": fraction}


_MARGIN_ELEMENTS = 2**22  # margin bounds held at once by _count_certified (samples x points x K(K-1))


def _count_certified(
    model: nn.Module,
    posterior,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    n: int,
    chunk: int,
    method: str,
    generator: torch.Generator | None,
    dtype: torch.dtype | None,
) -> Tensor:
    """Number of ``n`` fresh posterior samples certified per point, ``(B,)`` int64. Samples are
    drawn ``chunk`` at a time, each draw shared by all ``B`` points (every point still sees
    i.i.d. samples), and bounded in slices that keep the margin bounds within
    :data:`_MARGIN_ELEMENTS` (the slices change no result)."""
    if is_point_mass(posterior):  # n draws of one network: bound it once, count it n times
        params = posterior.sample(None)
        return per_sample_certified(model, params, x, y, eps, method=method, dtype=dtype)[0].long() * n
    count = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    per_slice = None
    for start in range(0, n, chunk):
        params = posterior.sample(min(chunk, n - start), generator)
        drawn = next(iter(params.values())).shape[0]
        if per_slice is None:
            classes = _num_classes(model, x) if model is not None else 1
            per_slice = max(1, _MARGIN_ELEMENTS // max(1, x.shape[0] * classes * classes))
        for i in range(0, drawn, per_slice):
            part = {name: t[i : i + per_slice] for name, t in params.items()}
            count += per_sample_certified(model, part, x, y, eps, method=method, dtype=dtype).sum(0)
    return count


def certify_statistical(
    model: nn.Module,
    posterior,
    x: Tensor,
    y: Tensor,
    eps: Eps,
    *,
    num_samples: int | None = None,
    confidence: float = 0.99,
    threshold: float = 0.5,
    method: str = "ibp",
    sequential: bool = False,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    sample_chunk: int = 256,
    first_look: int = 32,
) -> dict:
    """Exact binomial test of ``H0: P_rob < threshold`` at level ``alpha = 1 - confidence``.

    ``P_rob = P_w[sample w certified on T_eps(x)]`` (a lower bound on the
    posterior probability that the network is robust). ``X`` of ``n`` fresh
    samples are certified; ``lower`` is the exact one-sided lower confidence
    bound (:func:`stats.binomial_lower_bound`: ``P(lower > P_rob) <= alpha``)
    and ``certified = lower >= threshold``, so a point with ``P_rob < threshold``
    is certified with probability ``<= alpha``. ``num_samples`` defaults to
    ``hoeffding_sample_size(0.05, 0.01) = 1060``, drawn ``sample_chunk`` at a time.

    ``sequential=True``: samples are examined at the ``T`` looks of
    :func:`stats.sequential_looks` (``first_look`` doubling up to ``num_samples``),
    each at level ``1 - alpha/T`` (Bonferroni over the looks,
    :func:`stats.sequential_confidence`); a point stops certified once ``lower >=
    threshold`` and uncertified once ``upper < threshold``. The false-certification
    rate stays ``<= alpha`` (union bound over the looks); the bounds returned are
    those of the stopping look. Returns ``p_hat``, ``lower``, ``upper`` (B,)
    float64 (``upper``: the one-sided upper bound at the same level),
    ``certified`` (B,) bool, ``num_samples`` (int, or (B,) int64 when sequential).
    """
    n_max = stats.hoeffding_sample_size(0.05, 0.01) if num_samples is None else int(num_samples)
    if n_max < 1 or sample_chunk < 1 or not 0 <= threshold <= 1 or not 0 < confidence < 1:
        raise ConfigError(
            f"need num_samples >= 1, sample_chunk >= 1, 0 <= threshold <= 1, 0 < confidence < 1 "
            f"(got {n_max}, {sample_chunk}, {threshold}, {confidence})"
        )
    e = _eps_vector(eps, x)
    if not sequential:
        succ = _count_certified(model, posterior, x, y, e, n_max, sample_chunk, method, generator, dtype)
        lower, upper = stats.one_sided_bounds(succ, n_max, confidence)
        return {
            "p_hat": succ.double() / n_max,
            "lower": lower,
            "upper": upper,
            "certified": lower >= threshold,
            "num_samples": n_max,
        }
    looks = stats.sequential_looks(n_max, first_look)
    conf = stats.sequential_confidence(confidence, len(looks))
    succ = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    used = torch.zeros_like(succ)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for look in looks:
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        succ[idx] += _count_certified(
            model, posterior, x[idx], y[idx], e[idx], look - int(used[idx[0]]), sample_chunk, method, generator, dtype
        )
        used[idx] = look
        lower, upper = stats.one_sided_bounds(succ[idx], look, conf)
        active[idx[(lower >= threshold) | (upper < threshold)]] = False
    lower, upper = stats.one_sided_bounds(succ, used, conf)
    return {
        "p_hat": succ.double() / used,
        "lower": lower,
        "upper": upper,
        "certified": lower >= threshold,
        "num_samples": used,
    }


def _outward_box(mean: Tensor, std: Tensor, k: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """A ``dt`` box containing ``[mean - k std, mean + k std]`` exactly: computed in float64
    with a 4-ulp slack for its own rounding, then rounded outward to ``dt``.
    ``k`` is float64, ``()`` or ``(P,)`` (then the box gains a leading ``P``)."""
    mu, sd = mean.double(), std.double()
    if k.dim():
        mu, sd, k = mu.unsqueeze(0), sd.unsqueeze(0), k.view(-1, *([1] * mean.dim()))
    half = k * sd
    slack = 4 * torch.finfo(torch.float64).eps * (mu.abs() + half)
    lo64, hi64 = mu - half - slack, mu + half + slack
    lo, hi = lo64.to(dt), hi64.to(dt)
    lo = torch.where(lo.double() > lo64, torch.nextafter(lo, torch.full_like(lo, -math.inf)), lo)
    hi = torch.where(hi.double() < hi64, torch.nextafter(hi, torch.full_like(hi, math.inf)), hi)
    return lo, hi


def _log_erf(z: Tensor) -> Tensor:
    """``log erf(z)`` for ``z > 0`` (float64), accurate for small and large ``z``."""
    return torch.where(z > 1, torch.log1p(-torch.special.erfc(z)), torch.log(torch.special.erf(z)))


_REL_SAFETY = 1e-12  # >> the float64 error of erf/erfc/log/log1p (a few ulps each) and of the sums below


def box_log_mass_lower(k: Tensor, counts: Tensor) -> Tensor:
    """Rigorous float64 lower bound on ``log prod_l erf(k_l / sqrt 2)^{n_l}``, the log mass of
    the box ``mu ± k_l sigma`` (tensor ``l`` of ``n_l = counts[l]`` coordinates) under the
    diagonal Gaussian ``N(mu, sigma^2)``. ``k``: ``(..., L)`` float64 ``>= 0``; ``-inf`` where
    some ``k_l = 0``.

    Rounded down: ``z = k / sqrt 2`` is shrunk by ``2^-50`` relative (more than the
    rounding of the division; ``erf`` increases), the float64 sum of ``n_l log erf(z_l)``
    (all terms ``<= 0``) is enlarged by ``1e-12`` relative, far above the few-ulp error of
    the math library's ``erf``/``erfc``/``log1p`` (``|log erf z| >= 0.17`` on the ``log``
    branch ``z <= 1``), and ``1e-290`` is subtracted for ``erfc`` underflow."""
    z = k / math.sqrt(2.0) * (1.0 - 2.0**-50)
    positive = (z > 0).all(-1)
    total = (_log_erf(torch.where(z > 0, z, torch.ones_like(z))) * counts).sum(-1)
    lower = total * (1.0 + _REL_SAFETY) - 1e-290
    return torch.where(positive, lower, torch.full_like(lower, -math.inf))


def _log_threshold_up(threshold: float) -> float:
    """``log(threshold)`` rounded up (two ulps; ``-inf`` for 0): ``lower >= this`` implies ``>= threshold``."""
    if threshold <= 0:
        return -math.inf
    return math.nextafter(math.nextafter(math.log(threshold), math.inf), math.inf)


def _box_certified(
    model: nn.Module,
    posterior: GaussianPosterior,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    k: Tensor,
    method: str,
    dtype: torch.dtype | None,
) -> Tensor:
    """Per point ``b``: is the whole weight box ``mu ± k[b, l] sigma`` (``l``: the posterior's
    tensors in order; ``k`` ``(B, L)`` float64) certified on ``T_eps_b(x_b)``? Point ``b``
    gets its own box as sample ``b`` (inputs ``(B, 1, *in)``), one batched pass."""
    lo, hi = _input_box(x, eps, dtype)
    dt = lo.dtype
    std = posterior.std()
    boxes = {name: _outward_box(mu, std[name], k[:, i], dt) for i, (name, mu) in enumerate(posterior.mean().items())}
    K = _num_classes(model, x)
    spec = _pairwise_spec(K, dt, x.device)  # shared spec: the label differs per "sample"
    m_lo, _ = compute_bounds(
        model,
        lo.unsqueeze(1),
        hi.unsqueeze(1),
        method,
        param_bounds=boxes,
        spec=spec,
        dtype=dt,
        tol="sound",
        input_has_samples=True,
    )
    m_lo = m_lo[:, 0].view(-1, K, K)[torch.arange(x.shape[0], device=x.device), y.to(x.device)]  # (B, K): z_y - z_j
    others = ~torch.nn.functional.one_hot(y.to(x.device), K).bool()
    return torch.where(others, m_lo > 0, torch.ones_like(others)).all(-1)


def _largest_scale(
    cert: Callable[[Tensor], Tensor], d: Tensor, lo: Tensor, hi: Tensor, iters: int, try_hi: bool
) -> tuple[Tensor, Tensor]:
    """Per point, the largest ``s`` in ``[lo, hi]`` found by bisection with ``cert(s d)`` true
    (``d`` ``(B, L)``; ``hi`` tried first if ``try_hi``). Returns ``(s, ok)``: ``ok`` where
    ``s d`` was itself verified by a call of ``cert`` (elsewhere ``s = 0``)."""
    good, bad = lo.clone(), hi.clone()
    ok = torch.zeros_like(lo, dtype=torch.bool)
    top = cert(hi.unsqueeze(-1) * d) if try_hi else ok.clone()
    for _ in range(iters):
        mid = (good + bad) / 2
        passed = cert(mid.unsqueeze(-1) * d) & ~top
        good, bad = torch.where(passed, mid, good), torch.where(passed | top, bad, mid)
        ok |= passed
    ok |= top
    return torch.where(top, bad, torch.where(ok, good, torch.zeros_like(good))), ok


def _search_box(
    cert: Callable[[Tensor, Tensor], Tensor],
    counts: Tensor,
    B: int,
    k_max: float,
    iters: int,
    refine: int,
    refine_iters: int,
    device: torch.device,
) -> Tensor:
    """Per-point per-tensor half-widths ``(B, L)`` of a verified box (0 rows: none found):
    bisection on a common ``k`` in ``(0, k_max]``, then ``refine`` rounds of pattern search
    on the log mass: per tensor ``l`` and factor ``f in {rho, 1/rho}`` (``rho = 2^(2^-r)`` in
    round ``r``), scale ``k_l`` by ``f`` and bisect (``refine_iters`` steps) the largest
    common rescaling ``s`` of the result (``s`` in ``[min(1, 1/f), max(1, 1/f)]``) that
    verifies; keep it if its mass is larger."""
    L = counts.numel()
    ones = torch.ones(B, L, dtype=torch.float64, device=device)
    every = torch.arange(B, device=device)
    zero = torch.zeros(B, dtype=torch.float64, device=device)
    scale, _ = _largest_scale(lambda kk: cert(kk, every), ones, zero, torch.full_like(zero, k_max), iters, True)
    return _refine_box(cert, counts, scale.unsqueeze(-1) * ones, refine, refine_iters)


def _refine_box(
    cert: Callable[[Tensor, Tensor], Tensor], counts: Tensor, ks: Tensor, refine: int, refine_iters: int
) -> Tensor:
    """``refine`` rounds of the per-point pattern search of :func:`_search_box` from the
    verified half-widths ``ks`` ``(B, L)`` (rows of 0: none verified, left alone)."""
    L = counts.numel()
    idx = (ks > 0).all(-1).nonzero().squeeze(1)
    if idx.numel() == 0 or L == 0 or refine == 0:
        return ks
    ks = ks.clone()
    best, best_mass = ks[idx], box_log_mass_lower(ks[idx], counts)
    for r in range(refine):
        rho = 2.0 ** (2.0**-r)
        for i in range(L):
            for f in (rho, 1.0 / rho):
                d = best.clone()
                d[:, i] *= f
                lo = torch.full_like(best_mass, min(1.0, 1.0 / f))
                s, ok = _largest_scale(
                    lambda kk: cert(kk, idx), d, lo, torch.full_like(lo, max(1.0, 1.0 / f)), refine_iters, False
                )
                cand = s.unsqueeze(-1) * d
                mass = box_log_mass_lower(cand, counts)
                better = ok & (mass > best_mass)
                best = torch.where(better.unsqueeze(-1), cand, best)
                best_mass = torch.where(better, mass, best_mass)
    ks[idx] = best
    return ks


def threshold_k(counts: Tensor, threshold: float) -> float:
    """The smallest common half-width ``k`` (stds, to 2^-40 relative) whose rigorous log mass
    lower bound (:func:`box_log_mass_lower`) reaches ``log(threshold)`` rounded up: the box
    of :func:`certify_weight_box`'s grid that decides certification. ``counts``: ``(L,)``."""
    target = _log_threshold_up(threshold)
    if target == -math.inf:
        return 0.0
    lo, hi = 0.0, 1.0
    while float(box_log_mass_lower(torch.full_like(counts, hi), counts)) < target:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if float(box_log_mass_lower(torch.full_like(counts, mid), counts)) >= target else (mid, hi)
    return hi


def weight_box_grid(counts: Tensor, threshold: float, k_max: float = 5.0, size: int = 33) -> Tensor:
    """The common half-widths tested by ``certify_weight_box(search="grid")``, increasing
    float64 ``(G,)``: ``k_max 2^(-j/4)`` for ``j < size`` (down to ``k_max / 2^((size-1)/4)``)
    and :func:`threshold_k`."""
    grid = [k_max * 2.0 ** (-j / 4) for j in range(size)] + [threshold_k(counts, threshold)]
    return torch.tensor(sorted({k for k in grid if k > 0}), dtype=torch.float64)


def _grid_verified(
    model: nn.Module,
    posterior: GaussianPosterior,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    grid: Tensor,
    method: str,
    dtype: torch.dtype | None,
) -> Tensor:
    """``(G, B)`` bool: is the box ``mu ± grid[g] sigma`` (every tensor) certified on
    ``T_eps_b(x_b)``? One bound pass per slice of boxes, each box shared by all points
    (as a sample is), so the first layer is one GEMM for every point and box."""
    lo, hi = _input_box(x, eps, dtype)
    dt, K = lo.dtype, _num_classes(model, x)
    std = posterior.std()
    per_slice = max(1, _MARGIN_ELEMENTS // max(1, x.shape[0] * K * K))
    out = []
    for i in range(0, grid.numel(), per_slice):
        part = grid[i : i + per_slice].to(x.device)
        boxes = {name: _outward_box(mu, std[name], part, dt) for name, mu in posterior.mean().items()}
        out.append((_margin_lower(model, None, lo, hi, y, K, method, param_bounds=boxes) > 0).all(-1))
    return torch.cat(out)


def certify_weight_box(
    model: nn.Module,
    posterior,
    x: Tensor,
    y: Tensor,
    eps: Eps,
    *,
    k: float | Mapping[str, float] | None = None,
    threshold: float = 0.5,
    k_max: float = 5.0,
    iters: int = 12,
    refine: int = 1,
    refine_iters: int = 6,
    method: str = "ibp",
    dtype: torch.dtype | None = None,
    point_chunk: int = 64,
    search: str = "bisection",
    grid_size: int = 33,
) -> dict:
    """Sound lower bound on ``P_rob`` from a verified weight box ``H = mu ± k_l sigma`` (SPEC §5).

    If every weight in ``H`` (and every input in the ball) keeps ``y`` on top, then
    ``P_rob >= mass(H) = prod_l erf(k_l / sqrt 2)^{n_l}`` (``k_l``: the half-width, in
    stds, of the posterior's tensor ``l`` of ``n_l`` coordinates), with no sampling
    error. The box verified contains ``mu ± k_l sigma`` (rounded outward by a few
    ulps); its log mass is rounded down (:func:`box_log_mass_lower`). A point is
    ``certified`` only when that lower bound reaches ``threshold``.

    With ``k`` given (one float for every tensor, or ``{name: k_l}``): that box for
    all points. Else per point: the largest common ``k`` by ``iters`` bisection steps
    on ``(0, k_max]`` (``k_max`` tried first), then ``refine`` rounds of per-tensor
    pattern search that maximise the mass subject to verification (see
    :func:`_search_box`; ``refine=0``: the common ``k`` only). Cost: ``1 + iters +
    refine * 2 L * refine_iters`` bound passes per chunk of ``point_chunk`` points.
    ``search="grid"``: instead of the bisection, the common ``k`` of
    :func:`weight_box_grid` (``grid_size`` geometric steps from ``k_max`` down, plus
    :func:`threshold_k`, the box that decides certification) are tested for all points at
    once, each box shared by every point (far cheaper than per-point boxes); each point keeps
    the largest verified one, then ``refine`` rounds of per-point pattern search as above.
    ``point_chunk`` applies to the bisection and the refinement.

    Returns ``k`` (name -> (B,) float64; 0 where nothing verified), ``log_lower``
    (B,) float64 (natural log of the lower bound; ``-inf`` where nothing verified),
    ``log10_lower`` (B,) (its base-10 value, rounded down), ``lower`` (B,) (may
    underflow to 0), ``verified`` (B,) bool (some box verified) and ``certified`` (B,)
    bool (``lower >= threshold``).
    """
    if not isinstance(posterior, GaussianPosterior):
        raise ConfigError(
            f"certify_weight_box needs a GaussianPosterior (mean ± k std boxes), got {type(posterior).__name__}"
        )
    names = list(posterior.mean())
    if k is not None:
        given = {n: k for n in names} if not isinstance(k, Mapping) else dict(k)
        if set(given) != set(names):
            raise ConfigError(
                f"weight box k must give every posterior tensor ({', '.join(names)}), got {', '.join(map(str, given))}"
            )
        for name, value in given.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"weight box half-width k[{name}] must be a positive finite number of stds, got {value!r}"
                )
    elif not (
        math.isfinite(k_max)
        and k_max > 0
        and iters >= 0
        and refine >= 0
        and refine_iters >= 0
        and grid_size >= 1
        and search in ("bisection", "grid")
    ):
        raise ConfigError(
            f"need k_max > 0, iters, refine, refine_iters >= 0, grid_size >= 1 and search bisection "
            f"or grid, got {k_max}, {iters}, {refine}, {refine_iters}, {grid_size}, {search!r}"
        )
    if not 0 <= threshold <= 1:
        raise ConfigError(f"threshold must lie in [0, 1], got {threshold}")
    e = _eps_vector(eps, x)
    B, dev = x.shape[0], x.device
    counts = torch.tensor([t.numel() for t in posterior.mean().values()], dtype=torch.float64, device=dev)
    ks = torch.zeros(B, len(names), dtype=torch.float64, device=dev)
    if k is None and search == "grid":
        grid = weight_box_grid(counts.cpu(), threshold, float(k_max), grid_size).to(dev)
        verified = _grid_verified(model, posterior, x, y, e, grid, method, dtype)  # (G, B)
        best = torch.where(verified, grid.unsqueeze(1), torch.zeros_like(grid).unsqueeze(1)).amax(0)
        ks = best.unsqueeze(-1).expand(B, len(names)).clone()
    for s in range(0, B, max(1, point_chunk)):
        xs, ys, es = x[s : s + point_chunk], y[s : s + point_chunk], e[s : s + point_chunk]

        def cert(kk: Tensor, rows: Tensor, xs: Tensor = xs, ys: Tensor = ys, es: Tensor = es) -> Tensor:
            return _box_certified(model, posterior, xs[rows], ys[rows], es[rows], kk, method, dtype)

        if k is not None:
            kk = torch.tensor([float(given[n]) for n in names], dtype=torch.float64, device=dev).expand(xs.shape[0], -1)
            ok = cert(kk, torch.arange(xs.shape[0], device=dev))
            ks[s : s + point_chunk] = torch.where(ok.unsqueeze(-1), kk, torch.zeros_like(kk))
            continue
        if search == "grid":
            ks[s : s + point_chunk] = _refine_box(cert, counts, ks[s : s + point_chunk], refine, refine_iters)
            continue
        ks[s : s + point_chunk] = _search_box(cert, counts, xs.shape[0], float(k_max), iters, refine, refine_iters, dev)
    verified = (ks > 0).all(-1)
    log_lower = box_log_mass_lower(ks, counts)
    log10_lower = log_lower / math.log(10.0) * (1.0 + 1e-15)  # negative: enlarging rounds down
    return {
        "k": {n: ks[:, i] for i, n in enumerate(names)},
        "log_lower": log_lower,
        "log10_lower": log10_lower,
        "lower": torch.exp(log_lower) * (1.0 - 2.0**-50),
        "verified": verified,
        "certified": verified & (log_lower >= _log_threshold_up(threshold)),
    }


def certify_decision(
    model: nn.Module,
    posterior,
    x: Tensor,
    y: Tensor,
    eps: Eps,
    *,
    num_samples: int = 24,
    method: str = "ibp",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Is ``argmax_j mean_s softmax(f_s(x'))_j = y`` for every ``x'`` in the ball, for the
    ``num_samples`` weights drawn (one call ``posterior.sample(num_samples, generator)``)?

    With ``D_lo[i, j] <= z_i - z_j <= D_hi[i, j]`` (pairwise spec bounds, per sample):
    ``p_y = 1/sum_i exp(z_i - z_y) >= 1/sum_i exp(D_hi[i, y])`` and
    ``p_j = 1/sum_i exp(z_i - z_j) <= 1/sum_i exp(D_lo[i, j])``. Averaging over
    samples bounds the predictive: ``p_lower <= mean p_y`` and ``mean p_j <=
    p_upper_j``. Certified iff ``p_lower > max_{j != y} p_upper_j`` or
    ``p_lower > 1/2`` (either forces ``y`` to be the strict argmax).
    Returns ``certified`` (B,) bool, ``p_lower`` (B,), ``p_other_upper`` (B,)
    (``max_{j != y} p_upper_j``), ``num_samples``.
    """
    lo, hi = _input_box(x, eps, dtype)
    params = mixture_draws(posterior, num_samples, generator)
    K = _num_classes(model, x)
    d_lo, d_hi = compute_bounds(
        model, lo, hi, method, params=params, spec=_pairwise_spec(K, lo.dtype, x.device), dtype=lo.dtype, tol="sound"
    )
    eye = torch.eye(K, dtype=torch.bool, device=x.device)
    d_lo = d_lo.view(*d_lo.shape[:-1], K, K).masked_fill(eye, 0.0)  # (S, B, i, j); z_j - z_j = 0 exactly
    d_hi = d_hi.view(*d_hi.shape[:-1], K, K).masked_fill(eye, 0.0)
    p_up = torch.exp(-torch.logsumexp(d_lo, dim=-2))  # (S, B, j)
    p_lo = torch.exp(-torch.logsumexp(d_hi, dim=-2))
    yy = y.to(x.device)
    p_lower = p_lo.mean(0).gather(-1, yy.unsqueeze(-1)).squeeze(-1)
    onehot = torch.nn.functional.one_hot(yy, K).bool()
    p_other = p_up.mean(0).masked_fill(onehot, -math.inf).amax(-1)
    return {
        "certified": (p_lower > p_other) | (p_lower > 0.5),
        "p_lower": p_lower,
        "p_other_upper": p_other,
        "num_samples": num_samples,
    }


def certified_radius(
    certify_fn: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, y: Tensor, *, eps_max: float, iters: int = 10
) -> Tensor:
    """Per-point bisection for the largest certified radius, ``(B,)`` float64 in ``[0, eps_max]``.

    ``certify_fn(x, y, eps)`` must accept a ``(B,)`` eps tensor, return ``(B,)``
    bool, and be **deterministic** (per-sample, weight-box, decision with a fixed
    generator): the bisection makes ``1 + iters`` calls per point, and each call of a
    randomised certificate is a test with its own error probability. ``eps_max`` is
    evaluated twice and a disagreement is refused (``ConfigError``); for the
    statistical certificate use :func:`statistical_certified_radius`, which corrects
    for the calls. ``eps_max`` is tried first; every returned radius > 0 was itself
    certified by ``certify_fn`` (0: nothing certified among those tried).
    """
    if not (math.isfinite(eps_max) and eps_max > 0) or iters < 0:
        raise ConfigError(f"certified_radius needs eps_max > 0 and iters >= 0, got {eps_max}, {iters}")
    top_eps = torch.full((x.shape[0],), float(eps_max), dtype=torch.float64, device=x.device)
    first = torch.as_tensor(certify_fn(x, y, top_eps), device=x.device).bool()
    again = torch.as_tensor(certify_fn(x, y, top_eps), device=x.device).bool()
    if not torch.equal(first, again):
        raise ConfigError(
            f"certified_radius needs a deterministic certify_fn: two calls at eps_max disagree on "
            f"{int((first != again).sum())} points (randomised certificate? use "
            f"statistical_certified_radius)"
        )
    return _bisect_radius(certify_fn, x, y, top_eps, first, iters)


def _bisect_radius(
    certify_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    top_eps: Tensor,
    top: Tensor,
    iters: int,
) -> Tensor:
    good, bad = torch.zeros_like(top_eps), top_eps.clone()
    for _ in range(iters):
        mid = (good + bad) / 2
        ok = torch.as_tensor(certify_fn(x, y, mid), device=x.device).bool() & ~top
        good, bad = torch.where(ok, mid, good), torch.where(ok | top, bad, mid)
    return torch.where(top, bad, good)


def statistical_certified_radius(
    model: nn.Module,
    posterior,
    x: Tensor,
    y: Tensor,
    *,
    eps_max: float,
    iters: int = 10,
    confidence: float = 0.99,
    threshold: float = 0.5,
    **statistical,
) -> Tensor:
    """Largest radius, by bisection, at which :func:`certify_statistical` certifies
    ``P_rob >= threshold``, corrected for the ``1 + iters`` tests made per point: each
    call runs at level ``1 - alpha/(1 + iters)`` (``alpha = 1 - confidence``; Bonferroni),
    so with probability ``>= confidence`` every certifying call of a point is right and
    ``P_rob(radius) >= threshold`` wherever ``radius > 0``. Each call draws fresh
    samples; ``statistical`` goes to :func:`certify_statistical`. ``(B,)`` float64."""
    if not (math.isfinite(eps_max) and eps_max > 0) or iters < 0 or not 0 < confidence < 1:
        raise ConfigError(
            f"statistical_certified_radius needs eps_max > 0, iters >= 0 and 0 < confidence < 1, "
            f"got {eps_max}, {iters}, {confidence}"
        )
    per_call = 1.0 - (1.0 - confidence) / (1 + iters)

    def cert(xx: Tensor, yy: Tensor, e: Tensor) -> Tensor:
        return certify_statistical(
            model, posterior, xx, yy, e, confidence=per_call, threshold=threshold, **statistical
        )["certified"]

    top_eps = torch.full((x.shape[0],), float(eps_max), dtype=torch.float64, device=x.device)
    return _bisect_radius(cert, x, y, top_eps, cert(x, y, top_eps), iters)


def certified_accuracy(correct: Tensor, certified: Tensor) -> float:
    """Fraction of points both correctly classified and certified (state which certificate)."""
    correct = torch.as_tensor(correct).bool()
    certified = torch.as_tensor(certified, device=correct.device).bool()
    if correct.shape != certified.shape or correct.dim() != 1 or correct.numel() == 0:
        raise ConfigError(
            f"correct {tuple(correct.shape)} and certified {tuple(certified.shape)} "
            "must be equal non-empty (B,) tensors"
        )
    return float((correct & certified).double().mean())
