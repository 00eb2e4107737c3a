"""Bound rules of the operations that general graphs add: sums and concatenations of
branches, reshapes, constant affine maps and means (global average pooling).

Each operation is a small ``nn.Module`` that computes it (the graph tracer of
:mod:`certbnn.bounds.graph_trace` builds one per traced call, e.g. ``x + y`` becomes
:class:`Add`, ``x.view(B, -1)`` a :class:`Reshape`, ``torch.relu`` an ``nn.ReLU``), with
its rule registered like every other layer's. :class:`Add` and :class:`Cat` take
several inputs: their rules are :class:`MergeOp`\\ s, which the graph engine calls with
one box (IBP) and returns one coefficient pair per input (CROWN).

* :class:`Add` (``a + b``, ``a - b`` of two traced tensors of one shape): IBP adds the
  end points; CROWN passes ``A`` (``-A``) to each input. Exact in floating point but
  for the IBP sum, rounded outward with ``tol="sound"``.
* :class:`Cat`: concatenates boxes; CROWN splits ``A``. Exact.
* :class:`Reshape` (``view``/``reshape``/``flatten`` keeping the batch dim): exact.
* :class:`ConstAffine` (``x * c``, ``x / c``, ``x + c``, ``x - c``, ``c - x``, ``-x`` with a number or a
  tensor of the model, e.g. a buffer or parameter, that broadcasts over the batch):
  IBP through the end points, CROWN ``A J``, bias ``A c``; sound mode rounds outward and
  adds the step's rounding error (as :class:`~certbnn.layers.Normalize`).
* :class:`Mean` (``x.mean(dims)`` over feature dims) and ``nn.AdaptiveAvgPool2d(1)``:
  a nonnegative linear map; sound mode adds the Higham bound of the sum and division.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from certbnn.bounds.base import BoundOp, Box, LinearOp, sum_features
from certbnn.bounds.registry import register_bound
from certbnn.bounds.rounding import dot_error, dot_upper, down, up
from certbnn.errors import UnsupportedLayerError

Number = float | int
_APPLY = {
    "mul": lambda x, c: x * c,
    "div": lambda x, c: x / c,
    "add": lambda x, c: x + c,
    "sub": lambda x, c: x - c,
    "rsub": lambda x, c: c - x,
}


# ------------------------------------------------------------------ the operations as modules
class Add(nn.Module):
    """``a + b`` (``sign=1``) or ``a - b`` (``sign=-1``) of two tensors of the same shape."""

    def __init__(self, sign: int = 1) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b if self.sign > 0 else a - b


class Cat(nn.Module):
    """``torch.cat(xs, dim)`` with ``dim >= 1`` (dims counted with the batch dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, self.dim)


class Reshape(nn.Module):
    """``x.reshape(B, *shape)``: a batch-preserving view/reshape/flatten."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


class ConstAffine(nn.Module):
    """One of ``x * c`` (``kind="mul"``), ``x / c`` (``"div"``), ``x + c`` (``"add"``), ``x - c``
    (``"sub"``), ``c - x`` (``"rsub"``) with a constant ``c``: a number, or a tensor (a parameter or
    buffer of the model, kept as a buffer here so that ``params`` can replace it) that
    broadcasts against ``(B, *features)`` without a batch dim of its own (``drop_batch``:
    its leading dim is a broadcast 1 that is dropped)."""

    KINDS = ("mul", "div", "add", "sub", "rsub")

    def __init__(self, kind: str, const: Number | Tensor, drop_batch: bool = False) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(kind)
        self.kind, self.drop_batch = kind, drop_batch
        if isinstance(const, Tensor):
            self._buffers["const"] = const  # the model's own tensor: same object, same canonical name
            self.number = None
        else:
            self.number = float(const)

    def forward(self, x: Tensor) -> Tensor:
        c = self.number if self.number is not None else self._buffers["const"]
        return _APPLY[self.kind](x, c)


class Mean(nn.Module):
    """``x.mean(dims, keepdim)`` over feature dims (``dims`` counted with the batch dim, all >= 1)."""

    def __init__(self, dims: tuple[int, ...], keepdim: bool = False) -> None:
        super().__init__()
        self.dims, self.keepdim = tuple(dims), keepdim

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(self.dims, keepdim=self.keepdim)


# ------------------------------------------------------------------ multi-input rules
class MergeOp(BoundOp):
    """An op of several inputs (:attr:`arity`), linear and exact in CROWN: ``y = sum_k J_k x_k``.

    The graph engine sets :attr:`in_shapes` and calls :meth:`forward_n`, :meth:`ibp_n` /
    :meth:`ibp_sound_n` and :meth:`backward_n` instead of the single-input methods.
    """

    arity: ClassVar[int] = 2
    in_shapes: list[torch.Size]

    def forward_n(self, xs: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def ibp_n(self, boxes: list[Box]) -> Box:
        raise NotImplementedError

    def ibp_sound_n(self, boxes: list[Box]) -> Box:
        raise self.refuse_sound("IBP")

    def backward_n(self, A: Tensor) -> list[Tensor]:
        """``[A J_1, A J_2, ...]`` (computed exactly in floating point: copies, negations, slices)."""
        raise NotImplementedError


@register_bound(Add)
class BoundAdd(MergeOp):
    """``a + b`` / ``a - b``."""

    def forward_n(self, xs: list[Tensor]) -> Tensor:
        return self.module(*xs)

    def ibp_n(self, boxes: list[Box]) -> Box:
        (l0, u0), (l1, u1) = boxes
        return (l0 + l1, u0 + u1) if self.module.sign > 0 else (l0 - u1, u0 - l1)

    def ibp_sound_n(self, boxes: list[Box]) -> Box:
        lo, hi = self.ibp_n(boxes)
        return down(lo), up(hi)

    def backward_n(self, A: Tensor) -> list[Tensor]:
        return [A, A if self.module.sign > 0 else -A]


@register_bound(Cat)
class BoundCat(MergeOp):
    """Concatenation along a feature dim."""

    arity = 0  # any number of inputs

    def forward_n(self, xs: list[Tensor]) -> Tensor:
        S = max(x.shape[0] for x in xs)  # inputs with and without samples: broadcast the leading dim
        xs = [x.expand(S, *x.shape[1:]) for x in xs]
        return torch.cat(xs, self.module.dim + 1)  # (S, B, *f): one more leading dim than the model's

    def ibp_n(self, boxes: list[Box]) -> Box:
        return self.forward_n([b[0] for b in boxes]), self.forward_n([b[1] for b in boxes])

    ibp_sound_n = ibp_n

    def backward_n(self, A: Tensor) -> list[Tensor]:
        sizes = [s[self.module.dim - 1] for s in self.in_shapes]
        return list(torch.split(A, sizes, dim=self.module.dim + 2))  # A is (Sa, Ba, K, *f)


# ------------------------------------------------------------------ single-input rules
@register_bound(Reshape)
class BoundReshape(LinearOp):
    """A batch-preserving reshape (exact)."""

    mixing = False

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:2], *self.module.shape)

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        return self.forward(lower), self.forward(upper)

    ibp_sound = ibp

    def sound_backward_terms(self, m_in: Tensor) -> None:
        return None

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        assert self.in_shape is not None
        return A.reshape(*A.shape[:3], *self.in_shape), None


@register_bound(ConstAffine)
class BoundConstAffine(LinearOp):
    """``x * c``, ``x / c``, ``x + c``, ``c - x``; ``c`` a number or a (possibly sampled) tensor."""

    mixing = False

    def _const(self, feat_rank: int, n_lead: int) -> Number | Tensor:
        m: ConstAffine = self.module  # type: ignore[assignment]
        if m.number is not None:
            return m.number
        c = self.t.values["const"]
        sampled = self.sampled("const")
        if m.drop_batch:
            c = c.squeeze(1 if sampled else 0)
        if feat_rank < c.dim() - sampled:
            raise UnsupportedLayerError(
                f"operation {self.label()}: constant of shape {tuple(c.shape)} has more "
                "dims than the tensor it is applied to"
            )
        if sampled:  # (S, *cf) -> (S, 1.., *cf) against (S, B, [K,] *f)
            c = c.view(c.shape[0], *(1,) * (n_lead - 1 + feat_rank - (c.dim() - 1)), *c.shape[1:])
        return c

    def _apply(self, x: Tensor, n_lead: int) -> Tensor:
        c = self._const(x.dim() - n_lead, n_lead)
        return _APPLY[self.module.kind](x, c)

    def forward(self, x: Tensor) -> Tensor:
        return self._apply(x, 2)

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        a, b = self._apply(lower, 2), self._apply(upper, 2)
        if self.module.kind in ("add", "sub"):
            return a, b
        if self.module.kind == "rsub":
            return b, a
        return torch.minimum(a, b), torch.maximum(a, b)

    def ibp_sound(self, lower: Tensor, upper: Tensor) -> Box:
        """One rounding per end point, moved outward (monotone in ``x`` for either sign of ``c``)."""
        lo, hi = self.ibp(lower, upper)
        return down(lo), up(hi)

    def sound_backward_terms(self, m_in: Tensor) -> tuple[Tensor, int]:
        """``|J| m + |o|`` with ``J`` = ``c``, ``1/c`` or ``-1`` and ``o`` = ``c`` or 0; ``A J`` is one
        rounded product or quotient, ``A o`` a sum over the features (n = numel + 2)."""
        kind, n = self.module.kind, m_in[0, 0].numel() + 2
        c = self._const(m_in.dim() - 2, 2)
        c_abs = abs(c) if not isinstance(c, Tensor) else c.abs()
        if kind == "mul":
            return up(m_in * c_abs), n
        if kind == "div":
            return up(m_in / c_abs), n
        return up(m_in + c_abs), n

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        kind = self.module.kind
        c = self._const(A.dim() - 3, 3)
        if kind == "mul":
            return A * c, None
        if kind == "div":
            return A / c, None
        bias = sum_features(A * c) if isinstance(c, Tensor) else sum_features(A) * c
        return (-A if kind == "rsub" else A), (-bias if kind == "sub" else bias)


@register_bound(Mean)
class BoundMean(LinearOp):
    """Mean over feature dims (a nonnegative linear map)."""

    def _dims(self) -> tuple[tuple[int, ...], bool]:
        return tuple(d + 1 if d > 0 else d for d in self.module.dims), self.module.keepdim

    def forward(self, x: Tensor) -> Tensor:
        dims, keep = self._dims()
        return x.mean(dims, keepdim=keep)

    def ibp(self, lower: Tensor, upper: Tensor) -> Box:
        return self.forward(lower), self.forward(upper)

    def _count(self) -> int:
        assert self.in_shape is not None
        dims, _ = self._dims()
        rank = len(self.in_shape) + 2
        return math.prod(self.in_shape[(d % rank) - 2] for d in dims)

    def ibp_sound(self, lower: Tensor, upper: Tensor) -> Box:
        """A sum of ``count`` terms then a division (or a product with a rounded ``1/count``)."""
        n = self._count() + 2
        return (
            down(self.forward(lower) - dot_error(self.forward(lower.abs()), n)),
            up(self.forward(upper) + dot_error(self.forward(upper.abs()), n)),
        )

    def sound_backward_terms(self, m_in: Tensor) -> tuple[Tensor, int]:
        v = dot_upper(self.forward(m_in), self._count() + 2)
        return v, v[0, 0].numel() + 2

    def backward_linear(self, A: Tensor) -> tuple[Tensor, Tensor | None]:
        assert self.in_shape is not None
        dims, keep = self._dims()
        rank = len(self.in_shape) + 2
        a_dims = sorted(d % rank + 1 for d in dims)  # the same dims of A (Sa, Ba, K, *f)
        if not keep:
            for d in a_dims:
                A = A.unsqueeze(d)
        return (A / self._count()).expand(*A.shape[:3], *self.in_shape), None


@register_bound(nn.AdaptiveAvgPool2d)
class BoundAdaptiveAvgPool2d(BoundMean):
    """``nn.AdaptiveAvgPool2d(1)``: global average pooling (other output sizes are refused)."""

    input_rank = 3

    def __init__(self, module: nn.Module, name: str, tensors) -> None:
        super().__init__(module, name, tensors)
        size = module.output_size
        if tuple(size) if isinstance(size, (tuple, list)) else (size, size) != (1, 1):
            raise UnsupportedLayerError(
                f"layer {self.label()}: output_size={size} is not supported, only 1 (global average pooling)"
            )

    def _dims(self) -> tuple[tuple[int, ...], bool]:
        return (-2, -1), True
