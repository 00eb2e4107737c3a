"""Likelihoods: per-example negative log-likelihoods of a batch under given weights.

Every likelihood has ``nll(model, params, x, y, eps) -> Tensor`` returning shape
(B,) for point ``params`` or (S, B) when ``params`` carry a leading sample
dimension S (see :mod:`certbnn.functional`). ``eps`` is the current training
radius in pixel units (ignored by the non-robust likelihoods); ``generator``
drives any randomness (PGD random starts) so that runs are reproducible. Build one by
name with :func:`make_likelihood`.

The robust likelihood (Wicker et al. 2021, SPEC §2): bound the logits over the
input box ``[clip(x - eps, 0, 1), clip(x + eps, 0, 1)]`` with a sound method,
form worst-case logits (lower bound for the label, upper bounds for the rest;
or, tighter, from lower bounds on the margins z_y - z_j), and mix with the clean
term with weight ``lam`` on the clean part:

* ``mix="prob"`` (the authors'): ``-log(lam p_y + (1 - lam) p_hat_y)``;
* ``mix="loss"``: ``lam CE + (1 - lam) CE_worst``.

Both upper-bound the clean loss mixture at the worst point of the ball.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from certbnn.attacks import fgsm, pgd
from certbnn.errors import ConfigError
from certbnn.functional import forward
from certbnn.settings import LAM_LABEL, UNIT, Range, at_least, check_settings, one_of, positive

_MIXES = ("prob", "loss")


class Likelihood(Protocol):
    name: str

    def nll(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        eps: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example CE of logits (..., B, K) against labels (B,): shape (..., B)."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def mix_losses(clean: Tensor, robust: Tensor, lam: float, mix: str) -> Tensor:
    """Combine clean and worst-case per-example losses (see module docstring)."""
    if mix == "loss":
        return lam * clean + (1.0 - lam) * robust
    # -log(lam exp(-clean) + (1 - lam) exp(-robust)), stably
    stacked = torch.stack([math.log(lam) - clean, math.log1p(-lam) - robust]) if 0 < lam < 1 else None
    if stacked is None:
        return clean if lam == 1 else robust
    return -torch.logsumexp(stacked, dim=0)


def _check_mix(lam: float, mix: str) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"lambda (weight of the clean term) must be in [0, 1], got {lam}")
    if mix not in _MIXES:
        raise ConfigError(f"mix must be one of {', '.join(_MIXES)}, got {mix!r}")


@dataclass(frozen=True)
class Categorical:
    """Standard softmax likelihood: CE of the logits."""

    name: str = "categorical"

    def nll(self, model, params, x, y, eps=0.0, generator=None):
        return cross_entropy(forward(model, params, x), y)


@dataclass(frozen=True)
class GaussianRegression:
    """y ~ N(f(x), sigma^2) for scalar outputs f(x) of shape (..., B, 1) or (..., B)."""

    sigma: float = 1.0
    name: str = "gaussian"

    SETTING_RANGES: ClassVar[dict[str, Range]] = {"sigma": positive()}

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ConfigError(f"Gaussian likelihood needs sigma > 0, got {self.sigma}")

    def nll(self, model, params, x, y, eps=0.0, generator=None):
        f = forward(model, params, x)
        f = f.squeeze(-1) if f.shape[-1] == 1 and f.dim() > y.dim() else f
        return 0.5 * ((f - y) / self.sigma) ** 2 + math.log(self.sigma) + 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class IntervalRobust:
    """The robust likelihood with sound bounds (``bound`` = ``ibp``, ``crown-ibp`` or
    ``crown``); ``margins=True`` builds worst-case logits from margin bounds. With
    ``crown-ibp``, ``beta`` < 1 uses ``beta * CROWN-IBP + (1 - beta) * IBP`` bounds (Zhang et
    al. 2020; a convex combination of sound bounds is sound), plain IBP at ``beta = 0``."""

    bound: str = "ibp"
    lam: float = 0.25
    mix: str = "prob"
    margins: bool = False
    beta: float = 1.0
    name: str = "robust"

    SETTING_RANGES: ClassVar[dict[str, Range]] = {
        "bound": one_of("ibp", "crown-ibp", "crown"),
        "lam": UNIT,
        "mix": one_of(*_MIXES),
        "beta": UNIT,
    }
    SETTING_LABELS: ClassVar[dict[str, str]] = LAM_LABEL

    def __post_init__(self) -> None:
        _check_mix(self.lam, self.mix)
        if self.bound not in ("ibp", "crown-ibp", "crown"):
            raise ConfigError(f"robust likelihood bound must be ibp, crown-ibp or crown, got {self.bound!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta (weight of the CROWN-IBP bounds) must be in [0, 1], got {self.beta}")
        if self.beta != 1.0 and self.bound != "crown-ibp":
            raise ConfigError(f"beta mixes CROWN-IBP with IBP bounds: it needs bound crown-ibp, not {self.bound!r}")

    @property
    def effective_bound(self) -> str:
        """The bound actually computed: ``crown-ibp`` at ``beta = 0`` is plain IBP."""
        return "ibp" if self.bound == "crown-ibp" and self.beta == 0.0 else self.bound

    def _bounds(self, model, lower, upper, params, spec=None) -> tuple[Tensor, Tensor]:
        from certbnn.bounds import compute_bounds

        bound = self.effective_bound
        lo, hi = compute_bounds(model, lower, upper, method=bound, params=params, spec=spec)
        if bound == "crown-ibp" and self.beta != 1.0:
            ibp_lo, ibp_hi = compute_bounds(model, lower, upper, method="ibp", params=params, spec=spec)
            lo = self.beta * lo + (1.0 - self.beta) * ibp_lo
            hi = self.beta * hi + (1.0 - self.beta) * ibp_hi
        return lo, hi

    def worst_case_logits(self, model, params, x, y, eps: float, num_classes: int) -> Tensor:
        """(B, K) or (S, B, K) logits whose CE upper-bounds the CE anywhere in the eps-box."""
        from certbnn.bounds import margin_spec, worst_case_logits

        lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        if self.margins:
            margin_lower, _ = self._bounds(model, lower, upper, params, spec=margin_spec(y, num_classes))
            return -margin_lower  # z_hat_y = 0, z_hat_j = -(lower bound of z_y - z_j)
        lo, hi = self._bounds(model, lower, upper, params)
        return worst_case_logits(lo, hi, y)

    def nll(self, model, params, x, y, eps=0.0, generator=None):
        if self.lam != 1.0 and eps != 0.0 and self.effective_bound == "ibp" and not self.margins:
            joint = self._joint_ibp(model, params, x, y, eps)
            if joint is not None:
                return joint
        logits = forward(model, params, x)
        clean = cross_entropy(logits, y)
        if self.lam == 1.0 or eps == 0.0:
            return clean  # zero-width box: worst case == clean
        robust = cross_entropy(self.worst_case_logits(model, params, x, y, eps, logits.shape[-1]), y)
        return mix_losses(clean, robust, self.lam, self.mix)

    def _joint_ibp(self, model, params, x, y, eps: float) -> Tensor | None:
        """The IBP loss with the clean pass and the interval pass sharing each layer's matmul
        (:func:`certbnn.bounds.engine.point_and_ibp_eps`: an MLP's first-layer operands of the
        eps-box are built once per batch and eps, e.g. for all of HMC's leapfrog steps); None for
        models only the general path handles (then ``nll`` runs ``forward`` and ``compute_bounds``)."""
        from certbnn.bounds import worst_case_logits
        from certbnn.bounds.engine import point_and_ibp_eps
        from certbnn.errors import UnsupportedLayerError

        try:
            logits, lo, hi = point_and_ibp_eps(model, x, eps, params=params)
        except UnsupportedLayerError:
            return None
        clean, robust = cross_entropy(logits, y), cross_entropy(worst_case_logits(lo, hi, y), y)
        return mix_losses(clean, robust, self.lam, self.mix)


@dataclass(frozen=True)
class Adversarial:
    """Empirical robust training: the loss at an FGSM or PGD point of the true label,
    mixed with the clean loss like :class:`IntervalRobust`. With sampled params
    the attack maximises the mean loss over samples (one adversarial input per
    example)."""

    attack: str = "pgd"
    lam: float = 0.25
    mix: str = "prob"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    name: str = "adversarial"

    SETTING_RANGES: ClassVar[dict[str, Range]] = {
        "attack": one_of("fgsm", "pgd"),
        "lam": UNIT,
        "mix": one_of(*_MIXES),
        "steps": at_least(1),
        "step_size": positive(),
    }
    SETTING_LABELS: ClassVar[dict[str, str]] = LAM_LABEL

    def __post_init__(self) -> None:
        _check_mix(self.lam, self.mix)
        if self.attack not in ("fgsm", "pgd"):
            raise ConfigError(f"adversarial attack must be fgsm or pgd, got {self.attack!r}")

    def uses_attack(self, eps: float) -> bool:
        return self.lam != 1.0 and eps != 0.0

    def adversarial_inputs(self, model, params, x, y, eps: float, generator=None) -> Tensor:
        """Detached attack inputs (B, ...) maximising the mean loss over the params' samples."""
        fixed = {k: v.detach() for k, v in params.items()}

        def loss_of_input(x_in: Tensor) -> Tensor:
            loss = cross_entropy(forward(model, fixed, x_in), y)
            return loss.mean(0) if loss.dim() > 1 else loss

        if self.attack == "fgsm":
            return fgsm(loss_of_input, x, eps)
        return pgd(
            loss_of_input,
            x,
            eps,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            generator=generator,
        )

    def nll_at(self, model, params, x, x_adv, y) -> Tensor:
        """The mixed loss with the attack's inputs given (no gradient flows through the attack)."""
        clean = cross_entropy(forward(model, params, x), y)
        return mix_losses(clean, cross_entropy(forward(model, params, x_adv), y), self.lam, self.mix)

    def nll(self, model, params, x, y, eps=0.0, generator=None):
        if not self.uses_attack(eps):
            return cross_entropy(forward(model, params, x), y)
        return self.nll_at(model, params, x, self.adversarial_inputs(model, params, x, y, eps, generator), y)


@dataclass(frozen=True)
class BatchNLL:
    """``nll(params, x, y)`` of one likelihood, model, radius and generator: what a method's
    ``step`` differentiates. For adversarial likelihoods :attr:`attack_stage` is true and
    :meth:`adversarial_inputs` / :meth:`nll_at` split the attack (computed once per batch,
    no parameter gradient through it) from the loss, which per-example gradients (VOGN) need."""

    likelihood: Any
    model: Any
    eps: float
    generator: torch.Generator | None = None
    comm: Any = None  # a certbnn.distributed.Communicator: gradients averaged over ranks

    def __call__(self, params, x, y) -> Tensor:
        from certbnn.distributed import average_grads

        return self.likelihood.nll(
            self.model, average_grads(params, self.comm), x, y, self.eps, generator=self.generator
        )

    def local(self) -> BatchNLL:
        """The same loss without the cross-rank gradient averaging (for explicit reductions)."""
        return dataclasses.replace(self, comm=None)

    @property
    def attack_stage(self) -> bool:
        return isinstance(self.likelihood, Adversarial) and self.likelihood.uses_attack(self.eps)

    def adversarial_inputs(self, params, x, y) -> Tensor:
        return self.likelihood.adversarial_inputs(self.model, params, x, y, self.eps, self.generator)

    def nll_at(self, params, x, x_adv, y) -> Tensor:
        return self.likelihood.nll_at(self.model, params, x, x_adv, y)


# name -> (class, fields the name fixes); the user's options are the class's other fields but ``name``
_LIKELIHOODS: dict[str, tuple[type, dict[str, Any]]] = {
    "standard": (Categorical, {}),
    "categorical": (Categorical, {}),
    "gaussian": (GaussianRegression, {}),
    "ibp": (IntervalRobust, {"bound": "ibp"}),
    "crown-ibp": (IntervalRobust, {"bound": "crown-ibp"}),
    "crown": (IntervalRobust, {"bound": "crown"}),
    "fgsm": (Adversarial, {"attack": "fgsm"}),
    "pgd": (Adversarial, {"attack": "pgd"}),
}


def likelihood_names() -> list[str]:
    return sorted(_LIKELIHOODS)


def likelihood_schema(name: str) -> tuple[type, tuple[str, ...]]:
    """(class, fields that are not user options) of likelihood ``name``; ConfigError if unknown."""
    try:
        cls, fixed = _LIKELIHOODS[name]
    except KeyError:
        raise ConfigError(f"unknown likelihood {name!r} (known: {', '.join(likelihood_names())})") from None
    return cls, (*fixed, "name")


def make_likelihood(name: str, **options) -> Likelihood:
    """``standard`` (alias ``categorical``), ``gaussian``, ``ibp``, ``crown-ibp``, ``crown``,
    ``fgsm`` or ``pgd``; ``options`` are checked by name, type and range (one-line ConfigError)."""
    cls, excluded = likelihood_schema(name)
    checked = check_settings(cls, options, where=f"likelihood {name!r}: ", exclude=excluded, what="option")
    return cls(**_LIKELIHOODS[name][1], **checked)
