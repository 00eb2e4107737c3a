"""Batch means of gradients and of squared per-example gradients without per-example gradient tensors.

For stacked weights ``w`` (``S, *shape``) and a batch of ``B`` examples,
:func:`analytic_moments` returns, per parameter name, ``mean_{k,i} g_ki`` and ``mean_{k,i} g_ki^2``
(``g_ki`` = gradient of ``nll(w_k; x_i, y_i)``) and the values ``(S, B)``: the statistics VOGN
needs, equal to those of ``torch.func.vmap`` per-example gradients up to float rounding.

How: the likelihood runs once per sample under a :class:`~torch.overrides.TorchFunctionMode`
that follows every tensor derived from a weight by an elementwise map of known derivative
(``abs``, a scalar or broadcast factor, a cast: ``A = f(W)``, ``dA/dW = factor``) to the
operation that combines it with the data (a *use*):

* ``F.linear(x, A, b)`` with one row per example: the per-example gradient of ``W`` is
  ``factor * (g_i x_i^T)`` (``g`` = gradient of the summed loss w.r.t. the use's output, one
  row per example because examples are independent in the loss); a weight used on several
  paths (clean pass, IBP centre ``c``, IBP radius ``r`` through ``|W|``) has
  ``sum_p factor_p (g_pi x_pi^T)``, and its square summed over ``i`` is
  ``sum_{p,q} factor_p factor_q ((g_p g_q)^T (x_p x_q))``: one batched matmul of ``P (P + 3) / 2``
  products of the layer's size, never ``B`` copies of the weight;
* ``F.conv2d`` (per-example gradients by unfold, as BackPACK does: ``B`` copies of the small
  kernel), ``torch.einsum`` with a batch letter (the IBP margin fold ``spec_b W``), and the
  bias of ``F.linear``/``F.conv2d`` are materialised per example (small tensors).

``g`` is read from a zero "probe" added to every use's output (so in-place updates of the output
do not change it); the weights themselves never require grad, so the backward pass stops at the
activations. Anything else that touches a weight (CROWN's ``A W``, BatchNorm's affine, indexing,
an in-place update, rows that are not one per example, a use input modified in place later)
makes the attempt *unsupported*: :func:`analytic_moments` returns ``None`` and the reason, and
the caller falls back to exact per-example gradients. Adversarial likelihoods (``attack_stage``)
are attacked once outside, against the stacked weights, as in the vmap path.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

Params = dict[str, Tensor]
Moments = tuple[Params, Params, Tensor]

__all__ = ["Moments", "analytic_moments"]

# Tensor queries that neither read values nor build a gradient path.
_METADATA = frozenset(
    {
        "dim",
        "numel",
        "size",
        "is_floating_point",
        "is_complex",
        "element_size",
        "is_contiguous",
        "stride",
        "nelement",
        "ndimension",
        "get_device",
        "data_ptr",
        "__len__",
        "storage_offset",
    }
)
_PROPERTIES = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "requires_grad",
        "is_leaf",
        "ndim",
        "layout",
        "is_cuda",
        "is_sparse",
        "is_meta",
        "is_quantized",
        "is_nested",
        "grad_fn",
        "itemsize",
        "nbytes",
        "names",
        "_version",
        "is_cpu",
        "is_mps",
        "is_xla",
    }
)
_CASTS = frozenset({"to", "as_tensor", "contiguous", "clone", "float", "double", "type_as"})
_ROW_PRESERVING = frozenset({"flatten", "reshape", "view", "contiguous", "pad", "clone"})
_SCALINGS = frozenset({"mul", "__mul__", "__rmul__", "multiply"})
_DIVISIONS = frozenset({"div", "__truediv__", "true_divide", "divide"})


class Unsupported(Exception):
    """The recorded computation is outside what the analytic sums handle exactly."""


@dataclass
class _Derived:
    """A tensor ``A = f(W)`` of the weight ``name`` with elementwise derivative ``scale * tensor``
    (``tensor`` None means ones)."""

    name: str
    scale: float = 1.0
    tensor: Tensor | None = None

    def times(self, scale: float = 1.0, tensor: Tensor | None = None) -> _Derived:
        if tensor is None:
            return _Derived(self.name, self.scale * scale, self.tensor)
        return _Derived(self.name, self.scale * scale, tensor if self.tensor is None else self.tensor * tensor)

    def apply(self, t: Tensor) -> Tensor:
        """``dA/dW * t`` (``t`` broadcasting against the weight's shape)."""
        t = t if self.scale == 1.0 else t * self.scale
        return t if self.tensor is None else t * self.tensor


@dataclass
class _Use:
    """One use of a weight-derived tensor; ``probe.grad`` is the gradient w.r.t. its output."""

    kind: str  # "linear", "conv" or "dense" (already a per-example gradient function)
    probe: Tensor
    weight: _Derived | None = None
    bias: _Derived | None = None
    x: Tensor | None = None
    version: int = 0
    conv: dict[str, Any] = field(default_factory=dict)
    dense: Any = None  # callable(gY) -> (B, *shape) for kind "dense"


def _tensors(args: Any, kwargs: dict) -> list[Tensor]:
    out: list[Tensor] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, Tensor))
    return out


class WeightUseRecorder(TorchFunctionMode):
    """Records the uses of ``weights`` (name -> tensor, not requiring grad) in one forward pass
    over a batch of ``batch_size`` examples; see the module doc. ``failure`` says why the pass
    is not analysable (None if it is)."""

    def __init__(self, weights: Params, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.shapes = {name: w.shape for name, w in weights.items()}
        # strong references: an id stays unique while the recorder lives
        self.tracked: dict[int, tuple[Tensor, _Derived]] = {id(w): (w, _Derived(name)) for name, w in weights.items()}
        self.uses: list[_Use] = []
        self.failure: str | None = None
        # id -> (tensor, m): tensors whose outermost non-trivial dim holds m blocks of the batch
        # (torch.cat of m batches, e.g. the clean and the IBP centre pass sharing one matmul)
        self.blocks: dict[int, tuple[Tensor, int]] = {}

    def _row_dim(self, t: Tensor, rows: int) -> int | None:
        """The dim of ``t`` of size ``rows`` with only size-1 dims before it, else None."""
        for d, n in enumerate(t.shape):
            if n == rows:
                return d
            if n != 1:
                return None
        return None

    def _note_blocks(self, func, name: str, args, kwargs, out: Any) -> None:
        if not isinstance(out, Tensor) or not args:
            return
        B = self.batch_size
        if func is torch.cat:
            pieces, dim = args[0], (args[1] if len(args) > 1 else kwargs.get("dim", 0))
            if not isinstance(pieces, (list, tuple)) or len(pieces) < 2 or not isinstance(dim, int):
                return
            dim = dim % out.dim()
            same_rows = all(p.dim() == out.dim() and p.shape[dim] == B for p in pieces)
            if same_rows and self._row_dim(out, len(pieces) * B) == dim:
                self.blocks[id(out)] = (out, len(pieces))
        elif name in _ROW_PRESERVING and isinstance(args[0], Tensor):
            entry = self.blocks.get(id(args[0]))
            if entry is not None and entry[0] is args[0]:
                m = entry[1]
                if self._row_dim(args[0], m * B) is not None and self._row_dim(out, m * B) is not None:
                    self.blocks[id(out)] = (out, m)

    def _blocks_of(self, x: Tensor, lead: tuple[int, ...]) -> int:
        """How many batches the rows ``lead`` of the use input ``x`` hold (1 for one row per example)."""
        B = self.batch_size
        if math.prod(lead) == B and all(d in (1, B) for d in lead):
            return 1
        entry = self.blocks.get(id(x))
        if entry is not None and entry[0] is x and math.prod(lead) == entry[1] * B and entry[1] * B in lead:
            return entry[1]
        raise Unsupported(f"a weight applied to rows {lead}, not one row per example of {B}")

    def _info(self, t: Tensor) -> _Derived | None:
        entry = self.tracked.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def _track(self, out: Any, info: _Derived) -> Any:
        if not isinstance(out, Tensor) or out.shape != self.shapes[info.name]:
            raise Unsupported(f"a weight-derived tensor of shape {tuple(getattr(out, 'shape', ()))}")
        self.tracked[id(out)] = (out, info)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.failure is not None or not torch.is_grad_enabled():
            return func(*args, **kwargs)  # no gradient flows through a no-grad computation
        hits = [(t, info) for t in _tensors(args, kwargs) if (info := self._info(t)) is not None]
        name = getattr(func, "__name__", "")
        if not hits:
            out = func(*args, **kwargs)
            self._note_blocks(func, name, args, kwargs, out)
            return out
        if name == "__get__":
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            if prop in _PROPERTIES:
                return func(*args, **kwargs)
            name = f"property {prop}"
        elif name in _METADATA:
            return func(*args, **kwargs)
        try:
            return self._dispatch(func, name, args, kwargs, hits)
        except Unsupported as exc:
            self.failure = str(exc)
            return func(*args, **kwargs)

    def _dispatch(self, func, name: str, args, kwargs, hits: list[tuple[Tensor, _Derived]]) -> Any:
        if func is F.linear:
            return self._linear(func, args, kwargs)
        if func is F.conv2d:
            return self._conv(func, args, kwargs)
        if func is torch.einsum:
            return self._einsum(func, args, kwargs)
        if len(hits) != 1:
            raise Unsupported(f"{name} of two weight-derived tensors")
        t, info = hits[0]
        if name == "detach":
            return func(*args, **kwargs)  # no gradient: an untracked constant
        if name in _CASTS:
            out = func(*args, **kwargs)
            tensor = None if info.tensor is None else info.tensor.to(out.dtype)
            return out if out is t else self._track(out, _Derived(info.name, info.scale, tensor))
        if name in ("abs", "absolute"):
            out = func(*args, **kwargs)
            return self._track(out, info.times(tensor=torch.sign(t)))
        if name in ("neg", "__neg__", "negative"):
            return self._track(func(*args, **kwargs), info.times(-1.0))
        if name in _SCALINGS | _DIVISIONS and len(args) == 2 and not kwargs:
            other = args[1] if args[0] is t else args[0]
            if name in _DIVISIONS and args[0] is not t:
                raise Unsupported(f"{name} by a weight")
            if isinstance(other, Tensor) and other.requires_grad:
                raise Unsupported(f"{name} of a weight by a tensor that requires grad")
            if not isinstance(other, (int, float, Tensor)) or isinstance(other, bool):
                raise Unsupported(f"{name} of a weight by {type(other).__name__}")
            scale = other if name in _SCALINGS else 1.0 / other
            out = func(*args, **kwargs)
            return self._track(out, info.times(tensor=scale) if isinstance(scale, Tensor) else info.times(float(scale)))
        raise Unsupported(f"{name} of a weight")

    def _probe(self, y: Tensor) -> tuple[Tensor, Tensor]:
        probe = torch.zeros_like(y, requires_grad=True)
        return y + probe, probe

    def _bind(self, names: tuple[str, ...], args, kwargs) -> tuple[dict[str, Any], _Derived | None, _Derived | None]:
        if len(args) > len(names) or set(kwargs) - set(names):
            raise Unsupported("unexpected arguments")
        bound = dict(zip(names, args), **kwargs)
        x = bound.get("input")
        if not isinstance(x, Tensor) or self._info(x) is not None:
            raise Unsupported("a weight used as the input of a layer")
        w, b = bound.get("weight"), bound.get("bias")
        return (
            bound,
            self._info(w) if isinstance(w, Tensor) else None,
            self._info(b) if isinstance(b, Tensor) else None,
        )

    def _linear(self, func, args, kwargs) -> Tensor:
        bound, w, b = self._bind(("input", "weight", "bias"), args, kwargs)
        x = bound["input"]
        m = self._blocks_of(x, tuple(x.shape[:-1]))
        y, probe = self._probe(func(*args, **kwargs))
        self.uses.append(_Use("linear", probe, w, b, x.detach().reshape(m, self.batch_size, x.shape[-1]), x._version))
        return y

    def _conv(self, func, args, kwargs) -> Tensor:
        bound, w, b = self._bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs)
        x = bound["input"]
        if x.dim() != 4:
            raise Unsupported(f"conv2d of a {x.dim()}-d input")
        self._blocks_of(x, (x.shape[0],))
        conv = {k: bound.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))}
        conv["kernel"] = tuple(bound["weight"].shape[-2:])
        y, probe = self._probe(func(*args, **kwargs))
        self.uses.append(_Use("conv", probe, w, b, x.detach(), x._version, conv))
        return y

    def _einsum(self, func, args, kwargs) -> Tensor:
        if kwargs or not args or not isinstance(args[0], str):
            raise Unsupported("einsum in a form other than einsum(equation, *operands)")
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        infos = [self._info(t) for t in operands]
        slots = [i for i, info in enumerate(infos) if info is not None]
        if len(slots) != 1:
            raise Unsupported("einsum of several weight-derived tensors")
        y = func(*args)
        grad_eq = _per_example_einsum(args[0], [t.dim() for t in operands], y, slots[0], self.batch_size)
        others = [t.detach() for i, t in enumerate(operands) if i != slots[0]]
        y, probe = self._probe(y)
        self.uses.append(_Use("dense", probe, infos[slots[0]], dense=lambda gy: torch.einsum(grad_eq, *others, gy)))
        return y


def _per_example_einsum(equation: str, ndims: list[int], y: Tensor, slot: int, batch: int) -> str:
    """The einsum equation of the per-example gradient w.r.t. operand ``slot`` of ``equation``:
    ``others..., output -> b + subscripts(slot)``, ``b`` the output's first (batch) letter."""
    eq = equation.replace(" ", "")
    if "->" not in eq:
        raise Unsupported("einsum without an explicit output")
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise Unsupported("einsum operand count")
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    width = max((n - len(term.replace("...", "")) for term, n in zip(terms, ndims) if "..." in term), default=0)
    fill = "".join(free[:width])

    def expand(term: str, n: int) -> str:
        return term.replace("...", fill[width - (n - len(term.replace("...", ""))) :]) if "..." in term else term

    terms = [expand(t, n) for t, n in zip(terms, ndims)]
    out = out.replace("...", fill)
    target = terms[slot]
    if not re.fullmatch(r"[a-zA-Z]*", "".join(terms) + out) or not out or y.dim() != len(out):
        raise Unsupported(f"einsum {equation!r}")
    b = out[0]
    rest = "".join(terms[:slot] + terms[slot + 1 :]) + out
    if (
        y.shape[0] != batch
        or b in target
        or out.count(b) != 1
        or len(set(target)) != len(target)
        or any(c not in rest for c in target)
    ):
        raise Unsupported(f"einsum {equation!r} is not a per-example map of a weight")
    return ",".join(terms[:slot] + terms[slot + 1 :] + [out]) + "->" + b + target


def _conv_per_example(x: Tensor, g: Tensor, shape: torch.Size, conv: dict[str, Any]) -> Tensor:
    """Per-example gradients ``(B, Co, C / groups, kh, kw)`` of a conv2d kernel by unfold."""
    kernel, stride, padding, dilation, groups = (conv[k] for k in ("kernel", "stride", "padding", "dilation", "groups"))
    dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    if isinstance(padding, str):
        if padding == "same":  # torch pads d (k - 1) in total, the odd one at the end
            th, tw = dil[0] * (kernel[0] - 1), dil[1] * (kernel[1] - 1)
            x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
        padding = 0
    B, Co = g.shape[:2]
    cols = F.unfold(x, kernel, dilation=dil, padding=padding, stride=stride)  # (B, C kh kw, L)
    cols = cols.view(B, groups, -1, cols.shape[-1])
    gg = g.reshape(B, groups, Co // groups, -1)
    if gg.shape[-1] != cols.shape[-1]:
        raise Unsupported("conv2d output size does not match its unfolded input")
    return torch.matmul(gg, cols.transpose(-1, -2)).reshape(B, *shape)


class _Sums:
    """Per-weight accumulators: factored linear terms ``(derivative, g, x)`` and dense per-example terms."""

    def __init__(self) -> None:
        self.factored: dict[str, list[tuple[_Derived, Tensor, Tensor]]] = {}
        self.dense: dict[str, Tensor] = {}

    def add_dense(self, info: _Derived, grads: Tensor) -> None:
        grads = info.apply(grads)
        self.dense[info.name] = grads if info.name not in self.dense else self.dense[info.name] + grads

    def moments(self, name: str) -> tuple[Tensor, Tensor]:
        """(sum_i g_i, sum_i g_i^2) of weight ``name``."""
        terms, dense = self.factored.get(name, []), self.dense.get(name)
        if dense is not None:  # materialise every term of this (small) weight
            for d, g, x in terms:
                dense = dense + d.apply(g.unsqueeze(2) * x.unsqueeze(1))
            return dense.sum(0), (dense * dense).sum(0)
        # one GEMM per term and per pair, grouped by the tensor parts of the derivatives
        # (scalars fold into the GEMM's alpha): sum_{p,q} s_p s_q T_p T_q (g_p g_q)^T (x_p x_q)
        total: dict[tuple[int, ...], list] = {}
        square: dict[tuple[int, ...], list] = {}

        def accumulate(groups: dict, tensors: list[Tensor | None], alpha: float, left: Tensor, right: Tensor) -> None:
            present = sorted((t for t in tensors if t is not None), key=id)
            key = tuple(id(t) for t in present)
            if key not in groups:
                groups[key] = [present, torch.mm(left.t(), right).mul_(alpha)]
            else:
                groups[key][1].addmm_(left.t(), right, alpha=alpha)

        for p, (dp, gp, xp) in enumerate(terms):
            accumulate(total, [dp.tensor], dp.scale, gp, xp)
            for q in range(p, len(terms)):
                dq, gq, xq = terms[q]
                accumulate(
                    square, [dp.tensor, dq.tensor], dp.scale * dq.scale * (1.0 if q == p else 2.0), gp * gq, xp * xq
                )
        return _combine(total), _combine(square)


def _combine(groups: dict) -> Tensor:
    out = None
    for tensors, acc in groups.values():
        for t in tensors:
            acc = acc.mul_(t)
        out = acc if out is None else out.add_(acc)
    return out


def _one_sample(weights: Params, x: Tensor, y: Tensor, call) -> tuple[Params, Params, Tensor]:
    """Sums over the batch of g_i and g_i^2 for one point ``weights`` (no sample dim), and the values (B,)."""
    batch = x.shape[0]
    recorder = WeightUseRecorder(weights, batch)
    with recorder:
        values = call(weights)
    if recorder.failure is not None:
        raise Unsupported(recorder.failure)
    if values.shape != (batch,):
        raise Unsupported(f"the likelihood returned shape {tuple(values.shape)} for {batch} examples")
    uses = recorder.uses
    grads = (
        torch.autograd.grad(values.sum(), [u.probe for u in uses], allow_unused=True)
        if uses and values.requires_grad
        else [None] * len(uses)
    )
    sums = _Sums()
    for use, gy in zip(uses, grads):
        if gy is None:
            continue
        if use.x is not None and use.x._version != use.version:
            raise Unsupported("a layer input was modified in place after its use")
        if use.kind == "linear":  # x: (m, B, in), m blocks of the batch
            g = gy.reshape(*use.x.shape[:2], gy.shape[-1])
            if use.weight is not None:
                sums.factored.setdefault(use.weight.name, []).extend(
                    (use.weight, g[k], use.x[k]) for k in range(g.shape[0])
                )
            if use.bias is not None:
                sums.add_dense(use.bias, g.sum(0))
        elif use.kind == "conv":  # rows: m blocks of the batch
            if use.weight is not None:
                shape = recorder.shapes[use.weight.name]
                per_row = _conv_per_example(use.x, gy, shape, use.conv)
                sums.add_dense(use.weight, per_row.view(-1, batch, *shape).sum(0))
            if use.bias is not None:
                sums.add_dense(use.bias, gy.sum((2, 3)).view(-1, batch, gy.shape[1]).sum(0))
        else:
            sums.add_dense(use.weight, use.dense(gy))
    mean, square = {}, {}
    for name, w in weights.items():
        if name in sums.factored or name in sums.dense:
            mean[name], square[name] = sums.moments(name)
        else:  # not used with gradient: zero per-example gradients
            mean[name], square[name] = torch.zeros_like(w), torch.zeros_like(w)
    return mean, square, values.detach()


# model -> {likelihood: reason}: configurations found unsupported, not retried every step
_UNSUPPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache_key(nll: Any) -> tuple[Any, Any] | None:
    model, likelihood = getattr(nll, "model", None), getattr(nll, "likelihood", None)
    try:
        hash(likelihood)
        weakref.ref(model)
    except TypeError:
        return None
    return (model, likelihood) if model is not None and likelihood is not None else None


def analytic_moments(weights: Params, batch: tuple[Tensor, Tensor], nll) -> tuple[Moments | None, str]:
    """``({name: mean_{k,i} g_ki}, {name: mean_{k,i} g_ki^2}, values (S, B))`` for stacked weights
    ``(S, *shape)``, or ``(None, reason)`` where the computation is outside the analytic rules
    (see the module doc). ``nll(params, x, y)`` as in :func:`certbnn.inference.vogn.per_example_grads`."""
    key = _cache_key(nll)
    if key is not None and key[1] in _UNSUPPORTED.get(key[0], {}):
        return None, _UNSUPPORTED[key[0]][key[1]]
    x, y = batch
    stacked = {n: w.detach() for n, w in weights.items()}
    num_samples = next(iter(stacked.values())).shape[0]
    if getattr(nll, "attack_stage", False):  # attack once, against the mean loss over the samples
        x_adv = nll.adversarial_inputs(stacked, x, y).detach()

        def call(w: Params) -> Tensor:
            return nll.nll_at(w, x, x_adv, y)
    else:

        def call(w: Params) -> Tensor:
            return nll(w, x, y)

    means, squares, values = [], [], []
    try:
        for k in range(num_samples):
            m, s, v = _one_sample({n: w[k] for n, w in stacked.items()}, x, y, call)
            means.append(m)
            squares.append(s)
            values.append(v)
    except Unsupported as exc:
        reason = str(exc)
        if key is not None:
            _UNSUPPORTED.setdefault(key[0], {})[key[1]] = reason
        return None, reason
    count = num_samples * x.shape[0]
    mean = {
        n: torch.stack([m[n] for m in means]).sum(0).div_(count) if num_samples > 1 else means[0][n].div_(count)
        for n in stacked
    }
    square = {
        n: torch.stack([q[n] for q in squares]).sum(0).div_(count) if num_samples > 1 else squares[0][n].div_(count)
        for n in stacked
    }
    return (mean, square, torch.stack(values)), ""
