"""Certificates of BNN robustness on the l_inf ball ``T_eps(x) = [x - eps, x + eps] ∩ [0, 1]`` (SPEC §5).

Every function takes ``x`` ``(B, *in)`` in [0, 1], labels ``y`` ``(B,)`` and
``eps`` as a float or a ``(B,)`` tensor (one radius per point), and is batched
over points and posterior samples. Bounds are rigorous in floating point
(``tol="sound"`` of :func:`certbnn.bounds.compute_bounds`, input boxes rounded
outward by :func:`_input_box`), in float64 by default; ``dtype=torch.float32``
is faster and still rigorous but looser. ``method`` is the bound method of :func:`certbnn.bounds.compute_bounds`.

* :func:`per_sample_certified` -- per weight sample: every margin lower bound > 0.
* :func:`certify_paper` -- the authors' protocol (summed worst-case softmaxes).
* :func:`certify_statistical` -- Clopper-Pearson interval on ``P_rob``.
* :func:`certify_weight_box` -- sound ``P_rob >= mass(mu ± k sigma)`` (Gaussian).
* :func:`certify_decision` -- the argmax of the Monte Carlo predictive is constant on the ball.
* :func:`certified_radius`, :func:`certified_accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from certbnn.bounds import compute_bounds, margin_spec, worst_case_logits
from certbnn.bounds.rounding import add_down, add_up, cast_down, cast_up
from certbnn.errors import ConfigError
from certbnn.evaluation import stats
from certbnn.posterior import GaussianPosterior

__all__ = ["certified_accuracy", "certified_radius", "certify_decision", "certify_paper", "certify_statistical",
           "certify_weight_box", "per_sample_certified"]

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
    then an outward cast to ``dtype``."""
    dt = dtype or torch.float64
    e = _eps_vector(eps, x).view(-1, *([1] * (x.dim() - 1)))
    xd = x.detach().to(torch.float64)  # exact for every floating dtype up to 64 bits
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


def per_sample_certified(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, eps: Eps, *,
                         method: str = "ibp", dtype: torch.dtype | None = None) -> Tensor:
    """``(S, B)`` bool: sample ``s`` is certified at point ``b`` iff every margin lower
    bound ``z_y - z_j`` (``j != y``) over the input box is > 0. ``params``: stacked
    ``(S, *shape)`` (an unstacked dict gives ``S = 1``)."""
    lo, hi = _input_box(x, eps, dtype)
    spec = margin_spec(y.to(x.device), _num_classes(model, x), exclude_true=True)
    m_lo, _ = compute_bounds(model, lo, hi, method, params=params, spec=spec, dtype=lo.dtype, tol="sound")
    cert = (m_lo > 0).all(-1)
    return cert if cert.dim() == 2 else cert.unsqueeze(0)


def certify_paper(model: nn.Module, posterior, x: Tensor, y: Tensor, eps: Eps, *, gamma: float = 0.2,
                  delta: float = 0.3, method: str = "ibp", generator: torch.Generator | None = None,
                  dtype: torch.dtype | None = None) -> dict:
    """The authors' protocol: ``n = hoeffding_sample_size(gamma, delta)`` samples; per
    sample the worst-case logits from separate logit bounds; ``x`` is certified when
    ``y`` is the strict argmax of ``sum_s softmax(z_hat_s)``.

    Returns ``certified`` (B,) bool, ``num_samples`` (int) and ``sample_fraction``
    (B,) float64, the fraction of samples whose own worst-case logits keep ``y``
    on top. Not a sound certificate of the predictive (the sum of worst cases is
    not the worst case of the sum; reproduce the paper only).
    """
    n = stats.hoeffding_sample_size(gamma, delta)
    lo, hi = _input_box(x, eps, dtype)
    params = posterior.sample(n, generator)
    z_lo, z_hi = compute_bounds(model, lo, hi, method, params=params, dtype=lo.dtype, tol="sound")
    z_hat = worst_case_logits(z_lo, z_hi, y.to(x.device))  # (S, B, K)
    onehot = torch.nn.functional.one_hot(y.to(x.device), z_hat.shape[-1]).bool()

    def y_strictly_on_top(scores: Tensor) -> Tensor:
        return scores.gather(-1, y.to(x.device).expand(scores.shape[:-1]).unsqueeze(-1)).squeeze(-1) > \
            scores.masked_fill(onehot, -math.inf).amax(-1)

    certified = y_strictly_on_top(torch.softmax(z_hat, -1).sum(0))
    fraction = y_strictly_on_top(z_hat).double().mean(0)
    return {"certified": certified, "num_samples": n, "sample_fraction": fraction}


def _count_certified(model: nn.Module, posterior, x: Tensor, y: Tensor, eps: Tensor, n: int, chunk: int,
                     method: str, generator: torch.Generator | None, dtype: torch.dtype | None) -> Tensor:
    """Number of ``n`` fresh posterior samples certified per point, ``(B,)`` int64 (chunks of ``chunk``)."""
    count = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, n, chunk):
        params = posterior.sample(min(chunk, n - start), generator)
        count += per_sample_certified(model, params, x, y, eps, method=method, dtype=dtype).sum(0)
    return count


def certify_statistical(model: nn.Module, posterior, x: Tensor, y: Tensor, eps: Eps, *,
                        num_samples: int | None = None, confidence: float = 0.99, threshold: float = 0.5,
                        method: str = "ibp", sequential: bool = False, generator: torch.Generator | None = None,
                        dtype: torch.dtype | None = None, sample_chunk: int = 256, first_look: int = 32) -> dict:
    """Clopper-Pearson interval on ``P_rob = P_w[sample w certified on T_eps(x)]``.

    ``num_samples`` defaults to ``hoeffding_sample_size(0.05, 0.01) = 1060``;
    samples are drawn ``sample_chunk`` at a time. ``certified = lower >= threshold``.
    With ``sequential=True`` samples are examined at the looks of
    :func:`stats.sequential_looks` (``first_look`` doubling up to ``num_samples``);
    a point stops once its interval, at the Bonferroni-adjusted confidence
    :func:`stats.sequential_confidence`, lies on one side of ``threshold``; the
    reported interval (valid at ``confidence`` by the union bound over looks) is
    the one at its stopping look. Returns ``p_hat``, ``lower``, ``upper`` (B,)
    float64, ``certified`` (B,) bool, ``num_samples`` (int, or (B,) int64 when sequential).
    """
    n_max = stats.hoeffding_sample_size(0.05, 0.01) if num_samples is None else int(num_samples)
    if n_max < 1 or sample_chunk < 1 or not 0 <= threshold <= 1:
        raise ConfigError(f"need num_samples >= 1, sample_chunk >= 1, 0 <= threshold <= 1 "
                          f"(got {n_max}, {sample_chunk}, {threshold})")
    e = _eps_vector(eps, x)
    if not sequential:
        succ = _count_certified(model, posterior, x, y, e, n_max, sample_chunk, method, generator, dtype)
        lower, upper = stats.clopper_pearson(succ, n_max, confidence)
        return {"p_hat": succ.double() / n_max, "lower": lower, "upper": upper,
                "certified": lower >= threshold, "num_samples": n_max}
    looks = stats.sequential_looks(n_max, first_look)
    conf = stats.sequential_confidence(confidence, len(looks))
    succ = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    used = torch.zeros_like(succ)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for look in looks:
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        succ[idx] += _count_certified(model, posterior, x[idx], y[idx], e[idx], look - int(used[idx[0]]),
                                      sample_chunk, method, generator, dtype)
        used[idx] = look
        lower, upper = stats.clopper_pearson(succ[idx], look, conf)
        active[idx[(lower >= threshold) | (upper < threshold)]] = False
    lower, upper = stats.clopper_pearson(succ, used, conf)
    return {"p_hat": succ.double() / used, "lower": lower, "upper": upper,
            "certified": lower >= threshold, "num_samples": used}


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


def _box_certified(model: nn.Module, posterior: GaussianPosterior, x: Tensor, y: Tensor, eps: Tensor, k: Tensor,
                   method: str, dtype: torch.dtype | None) -> Tensor:
    """Per point ``b``: is the whole weight box ``mu ± k_b sigma`` certified on ``T_eps_b(x_b)``?
    Point ``b`` gets its own box as sample ``b`` (inputs ``(B, 1, *in)``), one batched pass."""
    lo, hi = _input_box(x, eps, dtype)
    dt = lo.dtype
    std = posterior.std()
    boxes = {name: _outward_box(mu, std[name], k, dt) for name, mu in posterior.mean().items()}
    K = _num_classes(model, x)
    spec = _pairwise_spec(K, dt, x.device)  # shared spec: the label differs per "sample"
    m_lo, _ = compute_bounds(model, lo.unsqueeze(1), hi.unsqueeze(1), method, param_bounds=boxes, spec=spec,
                             dtype=dt, tol="sound", input_has_samples=True)
    m_lo = m_lo[:, 0].view(-1, K, K)[torch.arange(x.shape[0], device=x.device), y.to(x.device)]  # (B, K): z_y - z_j
    others = ~torch.nn.functional.one_hot(y.to(x.device), K).bool()
    return torch.where(others, m_lo > 0, torch.ones_like(others)).all(-1)


def certify_weight_box(model: nn.Module, posterior, x: Tensor, y: Tensor, eps: Eps, *, k: float | None = None,
                       k_max: float = 5.0, iters: int = 12, method: str = "ibp", dtype: torch.dtype | None = None,
                       point_chunk: int = 64) -> dict:
    """Sound lower bound on ``P_rob`` from a certified weight box ``H = mu ± k sigma`` (SPEC §5).

    If every weight in ``H`` (and every input in the ball) keeps ``y`` on top,
    ``P_rob >= mass(H) = prod erf(k / sqrt 2)`` over the posterior's coordinates,
    with no sampling error. The box actually verified contains ``mu ± k sigma``
    (rounded outward by a few ulps), so the reported mass is that of a box
    inside the verified one. With ``k`` given: that box for all points; else per
    point the largest certified ``k`` found by ``iters`` bisection steps on
    ``(0, k_max]`` (``k_max`` itself is tried first). Points are processed
    ``point_chunk`` at a time (each holds its own weight box).

    Returns ``k`` (B,) float64 (0 when nothing is certified), ``log_mass`` (B,)
    float64 (``-inf`` where ``k = 0``), ``certified`` (B,) bool (``k > 0``).
    """
    if not isinstance(posterior, GaussianPosterior):
        raise ConfigError(f"certify_weight_box needs a GaussianPosterior (mean ± k std boxes), "
                          f"got {type(posterior).__name__}")
    if k is not None and not (math.isfinite(k) and k > 0):
        raise ConfigError(f"weight box half-width k must be a positive finite number of stds, got {k!r}")
    if k is None and not (math.isfinite(k_max) and k_max > 0 and iters >= 0):
        raise ConfigError(f"need k_max > 0 and iters >= 0, got {k_max}, {iters}")
    e = _eps_vector(eps, x)
    B = x.shape[0]
    ks = torch.zeros(B, dtype=torch.float64, device=x.device)
    for s in range(0, B, max(1, point_chunk)):
        xs, ys, es = x[s:s + point_chunk], y[s:s + point_chunk], e[s:s + point_chunk]

        def cert(kk: Tensor) -> Tensor:
            return _box_certified(model, posterior, xs, ys, es, kk, method, dtype)

        if k is not None:
            ks[s:s + point_chunk] = torch.where(cert(torch.full((xs.shape[0],), float(k), dtype=torch.float64)),
                                                float(k), 0.0)
            continue
        good = torch.zeros(xs.shape[0], dtype=torch.float64, device=x.device)
        bad = torch.full_like(good, float(k_max))
        top = cert(bad)
        for _ in range(iters):
            mid = (good + bad) / 2
            ok = cert(mid) & ~top
            good, bad = torch.where(ok, mid, good), torch.where(ok | top, bad, mid)
        ks[s:s + point_chunk] = torch.where(top, bad, good)
    certified = ks > 0
    safe = torch.where(certified, ks, torch.ones_like(ks))
    log_mass = posterior.num_coordinates * _log_erf(safe / math.sqrt(2.0))
    return {"k": ks, "log_mass": torch.where(certified, log_mass, torch.full_like(ks, -math.inf)),
            "certified": certified}


def certify_decision(model: nn.Module, posterior, x: Tensor, y: Tensor, eps: Eps, *, num_samples: int = 24,
                     method: str = "ibp", generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None) -> dict:
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
    params = posterior.sample(num_samples, generator)
    K = _num_classes(model, x)
    d_lo, d_hi = compute_bounds(model, lo, hi, method, params=params, spec=_pairwise_spec(K, lo.dtype, x.device),
                                dtype=lo.dtype, tol="sound")
    eye = torch.eye(K, dtype=torch.bool, device=x.device)
    d_lo = d_lo.view(*d_lo.shape[:-1], K, K).masked_fill(eye, 0.0)  # (S, B, i, j); z_j - z_j = 0 exactly
    d_hi = d_hi.view(*d_hi.shape[:-1], K, K).masked_fill(eye, 0.0)
    p_up = torch.exp(-torch.logsumexp(d_lo, dim=-2))  # (S, B, j)
    p_lo = torch.exp(-torch.logsumexp(d_hi, dim=-2))
    yy = y.to(x.device)
    p_lower = p_lo.mean(0).gather(-1, yy.unsqueeze(-1)).squeeze(-1)
    onehot = torch.nn.functional.one_hot(yy, K).bool()
    p_other = p_up.mean(0).masked_fill(onehot, -math.inf).amax(-1)
    return {"certified": (p_lower > p_other) | (p_lower > 0.5), "p_lower": p_lower, "p_other_upper": p_other,
            "num_samples": num_samples}


def certified_radius(certify_fn: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, y: Tensor, *,
                     eps_max: float, iters: int = 10) -> Tensor:
    """Per-point bisection for the largest certified radius, ``(B,)`` float64 in ``[0, eps_max]``.

    ``certify_fn(x, y, eps)`` must accept a ``(B,)`` eps tensor and return
    ``(B,)`` bool. ``eps_max`` is tried first; every returned radius > 0 was
    itself certified by ``certify_fn`` (0: nothing certified among those tried).
    """
    if not (math.isfinite(eps_max) and eps_max > 0) or iters < 0:
        raise ConfigError(f"certified_radius needs eps_max > 0 and iters >= 0, got {eps_max}, {iters}")
    good = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    bad = torch.full_like(good, float(eps_max))
    top = torch.as_tensor(certify_fn(x, y, bad)).bool()
    for _ in range(iters):
        mid = (good + bad) / 2
        ok = torch.as_tensor(certify_fn(x, y, mid)).bool() & ~top
        good, bad = torch.where(ok, mid, good), torch.where(ok | top, bad, mid)
    return torch.where(top, bad, good)


def certified_accuracy(correct: Tensor, certified: Tensor) -> float:
    """Fraction of points both correctly classified and certified (state which certificate)."""
    correct, certified = torch.as_tensor(correct).bool(), torch.as_tensor(certified).bool()
    if correct.shape != certified.shape or correct.dim() != 1 or correct.numel() == 0:
        raise ConfigError(f"correct {tuple(correct.shape)} and certified {tuple(certified.shape)} "
                          "must be equal non-empty (B,) tensors")
    return float((correct & certified).double().mean())
