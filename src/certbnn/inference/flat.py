"""Flat state: a method's per-parameter dicts as views into ONE contiguous buffer.

The fused steps (BBB, the point estimates, NoisyAdam, SWAG, SG-HMC) update a whole state
with a handful of vectorised calls over one buffer instead of a few kernels per parameter.
A state keeps its documented layout -- dicts ``name -> tensor`` -- whose tensors are views
of the buffer, so :func:`~certbnn.inference.base.flatten_state` checkpoints it unchanged and a
restored state (separate tensors) is packed once, on its first step, into the same layout
(same element positions, hence bit-identical continuation). The steps update the buffers in
place (the state passed to ``step`` is donated: :mod:`certbnn.inference.base`); a state that is
not laid out so (fresh from ``init``, restored) is packed into new buffers, leaving its tensors as
they were.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor

from certbnn.priors import GaussianPrior

__all__ = [
    "FlatLayout",
    "Precision",
    "adam_flat_",
    "flat_data_gradient",
    "prior_flat",
    "prior_precision_flat",
    "randn_flat",
]


class FlatLayout:
    """Names, shapes and offsets of a parameter dict laid end to end (``numel`` in all)."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.names = tuple(params)
        self.shapes = tuple(tuple(t.shape) for t in params.values())
        self.offsets: list[int] = []
        total = 0
        for t in params.values():
            self.offsets.append(total)
            total += t.numel()
        self.numel = total

    def backing(self, params: Mapping[str, Tensor]) -> Tensor | None:
        """The ``(numel,)`` buffer whose views ``params`` are, or None if they are not laid out so."""
        tensors = list(params.values())
        first = tensors[0]
        base = first.storage_offset()
        storage = first.untyped_storage()
        ptr = storage.data_ptr()
        for t, offset, shape in zip(tensors, self.offsets, self.shapes):
            if (
                t.untyped_storage().data_ptr() != ptr
                or t.storage_offset() != base + offset
                or tuple(t.shape) != shape
                or not t.is_contiguous()
                or t.dtype != first.dtype
            ):
                return None
        if storage.nbytes() < (base + self.numel) * first.element_size():
            return None
        return first.detach().as_strided((self.numel,), (1,), base)

    def pack(self, params: Mapping[str, Tensor]) -> Tensor:
        """The flat ``(numel,)`` buffer of ``params``: its backing buffer (no copy) or a packed copy."""
        flat = self.backing(params)
        if flat is None:
            flat = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        return flat

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """``name -> view`` of a ``(*lead, numel)`` buffer, each ``(*lead, *shape)``."""
        lead = flat.shape[:-1]
        return {
            n: flat[..., o : o + math.prod(s)].view(*lead, *s) for n, o, s in zip(self.names, self.offsets, self.shapes)
        }


_PRIORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prior_flat(prior: GaussianPrior, layout: FlatLayout, like: Tensor) -> tuple[Tensor | None, Tensor, float]:
    """``(mean or None when all zero, 1 / std^2, sum log std)`` of ``prior`` as flat buffers on
    ``like``'s device and dtype (cached per prior object)."""
    key = (layout.names, layout.shapes, like.dtype, like.device)
    cache = _PRIORS.setdefault(prior, {})
    if key not in cache:
        mean, std = prior.mean(), prior.std()
        m = torch.cat([mean[n].reshape(-1) for n in layout.names]).to(like)
        s = torch.cat([std[n].reshape(-1) for n in layout.names]).to(like)
        cache[key] = (None if not bool(m.any()) else m, s.pow(-2), float(s.double().log().sum()))
    return cache[key]


class Precision:
    """A flat ``(P,)`` precision (``1 / std^2``) with, when it is constant on each parameter (the usual
    per-layer prior), those constants: then the products below take one pass per parameter with a
    scalar factor instead of reading the precision buffer and writing a temporary."""

    def __init__(self, values: Tensor, layout: FlatLayout) -> None:
        self.values = values
        spans = []
        for offset, shape in zip(layout.offsets, layout.shapes):
            block = values[offset : offset + math.prod(shape)]
            if block.numel() and not bool((block == block[0]).all()):
                spans = None
                break
            spans.append((offset, block.numel(), float(block[0]) if block.numel() else 0.0))
        self.spans: list[tuple[int, int, float]] | None = spans

    def add_scaled_(self, out: Tensor, x: Tensor | None, alpha: float) -> Tensor:
        """``out += alpha * precision * x`` in place (``out``, ``x`` ``(P,)``; ``x = None`` means all
        ones: ``out += alpha * precision``); returns ``out``."""
        if self.spans is None:
            return out.add_(self.values, alpha=alpha) if x is None else out.addcmul_(x, self.values, value=alpha)
        for offset, n, v in self.spans:
            if x is None:
                out[offset : offset + n].add_(alpha * v)
            else:
                out[offset : offset + n].add_(x[offset : offset + n], alpha=alpha * v)
        return out

    def shifted(self, x: Tensor, alpha: float) -> Tensor:
        """``x + alpha * precision`` (``x`` ``(P,)``) in a new buffer, one pass."""
        if self.spans is None:
            return torch.add(x, self.values, alpha=alpha)
        out = torch.empty_like(x)
        for offset, n, v in self.spans:
            torch.add(x[offset : offset + n], alpha * v, out=out[offset : offset + n])
        return out

    def quadratic(self, *xs: Tensor) -> Tensor:
        """``sum_i sum_j precision_j x_ij^2`` (0-dim) for ``(P,)`` vectors ``xs``."""
        if self.spans is None:
            return sum(torch.dot(x * x, self.values) for x in xs)
        terms = torch.stack([torch.dot(x[o : o + n], x[o : o + n]) for x in xs for o, n, _ in self.spans])
        weights = torch.tensor([v for _ in xs for _, _, v in self.spans], dtype=terms.dtype, device=terms.device)
        return torch.dot(terms, weights)


def prior_precision_flat(prior: GaussianPrior, layout: FlatLayout, like: Tensor) -> Precision:
    """The :class:`Precision` of :func:`prior_flat`'s ``1 / std^2`` (cached with it)."""
    key = ("precision", layout.names, layout.shapes, like.dtype, like.device)
    cache = _PRIORS.setdefault(prior, {})
    if key not in cache:
        cache[key] = Precision(prior_flat(prior, layout, like)[1], layout)
    return cache[key]


def flat_data_gradient(layout: FlatLayout, weights: Tensor, batch: tuple[Tensor, Tensor], nll) -> tuple[Tensor, Tensor]:
    """``(d mean_batch nll / d weights, mean nll)`` at the flat ``(S, numel)`` weights (S samples,
    the likelihood called once on their stacked views); the gradient is one ``(S, numel)``
    buffer. (Each parameter is its own leaf: slicing one flat leaf would make autograd
    zero-fill a full-size buffer per parameter.)"""
    x, y = batch
    leaves = [v.detach().requires_grad_(True) for v in layout.views(weights).values()]
    with torch.enable_grad():
        data_term = nll(dict(zip(layout.names, leaves)), x, y).mean()
        grads = torch.autograd.grad(data_term, leaves, allow_unused=True)
    lead = weights.shape[:-1]
    parts = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    return torch.cat([g.reshape(*lead, -1) for g in parts], -1), data_term.detach()


def randn_flat(layout: FlatLayout, num_samples: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``(num_samples, numel)`` standard normal noise, drawn parameter by parameter as
    ``randn((num_samples, *shape))`` (the draws of :func:`~certbnn.posterior.paramdict.sample_diag_gaussian`,
    in the same order), on the generator's device and moved to ``like``'s."""
    noise = like.new_empty((num_samples, layout.numel))
    device = generator.device if generator is not None else like.device
    for block in layout.views(noise).values():
        if num_samples == 1 and device == like.device:
            torch.randn(block.shape, generator=generator, dtype=like.dtype, device=device, out=block)
        else:
            block.copy_(torch.randn(block.shape, generator=generator, dtype=like.dtype, device=device))
    return noise


def adam_flat_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """One bias-corrected Adam step number ``step`` on flat buffers, IN PLACE on ``params``,
    ``exp_avg`` and ``exp_avg_sq`` (the steps' state is donated, see
    :mod:`certbnn.inference.base`); ``grads`` may be overwritten. Same equations as
    :func:`certbnn.inference.sgd.adam_update`: ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``theta <- theta - (lr / c1) m / (sqrt(v / c2) + eps)`` with ``c_i = 1 - b_i^step``."""
    beta1, beta2 = betas
    fused = getattr(torch, "_fused_adam_", None)
    if fused is not None and all(p.device.type in ("cpu", "cuda") for p in params):
        steps = [torch.tensor(float(step), device=p.device) for p in params]
        fused(
            params,
            grads,
            exp_avg,
            exp_avg_sq,
            [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
        return
    correction1, correction2 = 1.0 - beta1**step, 1.0 - beta2**step
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        p.addcdiv_(m, (v / correction2).sqrt_().add_(eps), value=-lr / correction1)
