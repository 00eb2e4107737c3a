"""The bound engine: IBP forward pass, CROWN backward pass, and their drivers."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from certbnn.bounds import ops_activation, ops_affine, ops_linear, ops_pool  # noqa: F401  (register rules)
from certbnn.bounds.base import BoundOp, Box, ElementwiseOp, interval_spec, interval_spec_sound
from certbnn.bounds.graph import compute_graph, graph_interval_forward
from certbnn.bounds.ops_affine import BoundFlatten, BoundIdentity, ChannelAffineOp
from certbnn.bounds.ops_linear import BoundLinear, linear_ibp_from_operands, point_box_operands
from certbnn.bounds.params import resolve_tensors, sample_slices
from certbnn.bounds.rounding import cast_down, cast_up, check_dtype, plain_arithmetic
from certbnn.bounds.shared import CPU_CHUNK_BYTES, CROWN_MAX_ELEMENTS, add_step_bias, concretize
from certbnn.bounds.shared import finish as _finish
from certbnn.bounds.shared import outward_radii as _outward_radii
from certbnn.bounds.shared import prepare_spec as _prepare_spec
from certbnn.bounds.specs import known_true, resolve_tol, widen
from certbnn.bounds.structure import is_chain, model_layers
from certbnn.denormals import _this_thread_flushes
from certbnn.errors import ConfigError

METHODS = ("ibp", "crown", "crown-ibp")
ParamDict = Mapping[str, Tensor]
BoxDict = Mapping[str, tuple[Tensor, Tensor]]


class BoundsFallbackWarning(UserWarning):
    """A requested method could not handle the configuration; a sound fallback was used."""


def build_ops(
    model: nn.Module, params: ParamDict | None, param_bounds: BoxDict | None, dtype: torch.dtype | None
) -> tuple[list[BoundOp], int | None]:
    """One bound op per layer call of ``model(x)`` (a shared module once per use), with
    resolved tensors; and the sample count S. Raises :class:`UnsupportedLayerError`
    where the ops would not compute exactly ``model(x)`` (see :mod:`certbnn.bounds.structure`)."""
    layers = model_layers(model)
    tensors, S = resolve_tensors(model, [(n, m) for n, m, _ in layers], params, param_bounds, dtype)
    ops = [rule(m, n, t) for (n, m, rule), t in zip(layers, tensors)]
    return ops, S


def _expected_rank(ops: list[BoundOp]) -> int | None:
    for op in ops:
        if op.input_rank is not None:
            return op.input_rank
        if not isinstance(op, (ElementwiseOp, ChannelAffineOp, BoundIdentity)):
            return None
    return None


def _compute_dtype(lower: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` if given, else the input box's dtype (parameters are cast to it)."""
    if dtype is not None:
        return dtype
    d = torch.as_tensor(lower).dtype
    if not d.is_floating_point:
        raise ConfigError(f"lower/upper must be floating point, got {d}")
    return d


def _prepare_input(
    ops: list[BoundOp],
    lower: Tensor,
    upper: Tensor,
    S: int | None,
    dtype: torch.dtype | None,
    input_has_samples: bool | None,
    check_order: bool = True,
) -> tuple[Tensor, Tensor, bool]:
    lower, upper = torch.as_tensor(lower), torch.as_tensor(upper)
    if dtype is not None:
        lower, upper = lower.to(dtype), upper.to(dtype)
    if lower.shape != upper.shape:
        raise ConfigError(f"lower {tuple(lower.shape)} and upper {tuple(upper.shape)} differ in shape")
    if not lower.is_floating_point() or lower.dtype != upper.dtype:
        raise ConfigError(f"lower/upper must share one floating dtype, got {lower.dtype} and {upper.dtype}")
    if check_order and known_true((lower > upper).any()):
        raise ConfigError("input box has lower > upper somewhere")
    if input_has_samples is None:
        rank = _expected_rank(ops)
        input_has_samples = S is not None and rank is not None and lower.dim() == rank + 2
    if input_has_samples:
        if S is not None and lower.shape[0] not in (1, S):
            raise ConfigError(f"input sample dim {lower.shape[0]} does not match the params' S = {S}")
        return lower, upper, True
    return lower.unsqueeze(0), upper.unsqueeze(0), False


def crown_backward_pass(ops: list[BoundOp], A0: Tensor, lower: Tensor, upper: Tensor, sound: bool = False) -> Box:
    """Back-substitute ``A0 @ output(ops)`` to the input box ``[lower, upper]``; return ``(S, B, K)`` bounds.

    ``sound``: every step's rounding error (:func:`_step_error`, from the op's
    ``sound_backward_terms`` and its stored input box ``op.sound_box``) is
    subtracted from the lower bias and added to the upper one, outward-rounded."""
    A_lo = A_up = A0
    b_lo = b_up = None
    for op in reversed(ops):
        A_lo_new, bl, A_up_new, bu = op.crown_backward(A_lo, A_up)
        b_lo, b_up = add_step_bias(op, A_lo, A_up, bl, bu, b_lo, b_up, sound)
        A_lo, A_up = A_lo_new, A_up_new
    return concretize(A_lo, A_up, b_lo, b_up, lower, upper, sound)


def _ibp_exact(prefix: list[BoundOp]) -> bool:
    """IBP is already exact on an affine chain with at most one mixing op."""
    return all(op.is_linear for op in prefix) and sum(op.mixing for op in prefix) <= 1


def _crown_intermediate(
    prefix: list[BoundOp],
    target: BoundOp,
    lower: Tensor,
    upper: Tensor,
    feat: torch.Size,
    S: int | None,
    sound: bool = False,
) -> Box:
    n = feat.numel()
    widest = max([lower[0, 0].numel()] + [op.in_shape.numel() for op in prefix if op.in_shape is not None])
    need = (S or 1) * lower.shape[1] * n * widest
    if need > CROWN_MAX_ELEMENTS:
        raise ConfigError(
            f"method='crown' needs ~{need / 2**28:.1f} GiB (float32) of coefficients for the input of layer "
            f"{target.label()}; use method='crown-ibp' (IBP intermediate bounds)"
        )
    eye = torch.eye(n, dtype=lower.dtype, device=lower.device).view(1, 1, n, *feat)
    lo, up = crown_backward_pass(prefix, eye, lower, upper, sound)
    return lo.view(*lo.shape[:2], *feat), up.view(*up.shape[:2], *feat)


def _out_shape(op: BoundOp, lower: Tensor) -> torch.Size:
    """Feature shape of ``op``'s output for inputs shaped like ``lower`` (one-example probe)."""
    with torch.no_grad():
        return op.forward(lower.new_zeros(1, 1, *lower.shape[2:])).shape[2:]


def _forward_intervals(
    ops: list[BoundOp],
    lower: Tensor,
    upper: Tensor,
    method: str,
    spec: Tensor | None,
    S: int | None,
    collect: list | None = None,
    sound: bool = False,
) -> Box:
    """IBP through ``ops`` (``spec`` folded into the last real op), storing each op's
    input shape and, where needed, input bounds (tightened by CROWN for ``"crown"``).
    ``sound``: the ops' ``*_sound`` rules, and every op's input box in ``op.sound_box``."""
    last = max((i for i, op in enumerate(ops) if not op.passthrough), default=-1)
    l, u = lower, upper
    for i, op in enumerate(ops):
        op.in_shape = l.shape[2:]
        op.sound = sound
        if op.needs_input_bounds:
            if method == "crown" and not _ibp_exact(ops[:i]):
                cl, cu = _crown_intermediate(ops[:i], op, lower, upper, l.shape[2:], S, sound)
                l, u = torch.maximum(l, cl), torch.minimum(u, cu)
            op.input_bounds = (l, u)
        if sound:
            op.sound_box = (l, u)
        if i == last and spec is not None:
            out_numel = _out_shape(op, l).numel()
            if spec.shape[-1] != out_numel:
                raise ConfigError(f"spec has {spec.shape[-1]} columns but the model has {out_numel} outputs")
            return op.ibp_spec_sound(l, u, spec) if sound else op.ibp_spec(l, u, spec)
        l, u = op.ibp_sound(l, u) if sound else op.ibp(l, u)
        if collect is not None:
            collect.append((op.name, l, u))
    if spec is None:
        return l, u
    return interval_spec_sound(l, u, spec) if sound else interval_spec(l, u, spec)


def point_and_ibp(
    model: nn.Module, x: Tensor, lower: Tensor, upper: Tensor, params: ParamDict | None = None, check_order: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``(model(x), lower_bound, upper_bound)``: the forward pass at ``x`` and plain IBP over
    ``[lower, upper]`` (``tol=None``) in ONE pass through the layers, for training losses.

    Shapes as :func:`compute_bounds` (``x``, ``lower``, ``upper`` ``(B, *in)``; outputs
    ``([S,] B, *out)``). Ops with an ``ibp_with_point`` rule (Linear, Conv2d) map the point
    and the box centre with one matmul / convolution on the stacked batch; the others run
    ``forward`` and ``ibp``. Equal to :func:`certbnn.functional.forward` and
    ``compute_bounds(method="ibp")`` up to float rounding (the same products, summed in
    one GEMM). Raises :class:`UnsupportedLayerError` for models the layer engine cannot bound.
    ``check_order=False`` skips the ``lower <= upper`` check (a pass over the box) for callers that
    build the box so.
    """
    dtype = _compute_dtype(lower, None)
    ops, S = build_ops(model, params, None, dtype)
    l, u, _ = _prepare_input(ops, lower, upper, S, dtype, False, check_order)
    return _point_and_ibp_ops(ops, S, x.to(dtype).unsqueeze(0), l, u)


def _point_and_ibp_ops(
    ops: list[BoundOp], S: int | None, p: Tensor, l: Tensor, u: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The layer loop of :func:`point_and_ibp` from prepared ``(1, B, ...)`` inputs."""
    for op in ops:
        op.in_shape, op.sound = l.shape[2:], False
        joint = getattr(op, "ibp_with_point", None)
        if joint is not None:
            p, l, u = joint(p, l, u)
        else:
            p, (l, u) = op.forward(p), op.ibp(l, u)
    sampled = S is not None
    return (p if sampled else p[0]), *_finish(l, u, sampled, S)


@dataclass
class _HeldBatch:
    ref: weakref.ref  # the batch's root tensor
    key: tuple  # (version, eps, dtype, device, flush-to-zero)
    budget: int  # bytes the entries may take: 3x the root's storage
    entries: dict = field(default_factory=dict)
    size: int = 0


class OperandMemo:
    """First-layer operands of :func:`point_and_ibp_eps` for ONE batch, reused while it is unchanged.

    A batch is the root tensor of ``x`` (``x`` itself or the tensor it views: the chunks of one
    full batch share it), held by weak reference (its entries go when it does). An entry, the
    :func:`~certbnn.bounds.ops_linear.point_box_operands` ``(X, r)`` of one chunk (storage offset,
    shape, strides and the layer's input shape), is served only while the root's version counter
    (bumped by every in-place write through torch), eps, dtype, device and the calling thread's
    flush-to-zero mode are those it was built under; a call with anything else drops every
    entry first. Entries take at most 3x the root's storage (then they are dropped and refilled).
    Not memoised: inputs requiring grad, inference tensors (no version counter), tensor
    subclasses, eps other than an int or float >= 0. Not detected: writes torch does not see
    (through ``.data``, a shared numpy array, DLPack). Not locked: concurrent callers can only
    cause misses (an entry is served only from the batch record it was stored under)."""

    def __init__(self) -> None:
        self._held: _HeldBatch | None = None

    def clear(self) -> None:
        """Drop every entry."""
        self._held = None

    def __len__(self) -> int:
        held = self._held
        return 0 if held is None else len(held.entries)

    @staticmethod
    def key(x: Tensor, eps: float) -> tuple | None:
        """``(root, batch key, chunk key)`` of ``x`` at ``eps``, or None where not memoised."""
        if type(x) is not Tensor or x.requires_grad or x.is_inference() or type(eps) not in (int, float):
            return None
        if not eps >= 0:
            return None
        root = x if x._base is None else x._base
        batch = (root._version, eps, x.dtype, x.device, _this_thread_flushes())
        return root, batch, (x.storage_offset(), tuple(x.shape), x.stride())

    def get(self, key: tuple, shape: torch.Size) -> tuple[Tensor, Tensor] | None:
        """The operands stored under ``key`` for layer input ``shape``; None (and every entry of
        another batch key dropped) if none."""
        root, batch, chunk = key
        held = self._held
        if held is None or held.ref() is not root or held.key != batch:
            self._held = None
            return None
        return held.entries.get((chunk, tuple(shape)))

    def put(self, key: tuple, shape: torch.Size, operands: tuple[Tensor, Tensor]) -> None:
        root, batch, chunk = key
        held = self._held
        size = sum(t.numel() * t.element_size() for t in operands)
        if held is None or held.ref() is not root or held.key != batch or held.size + size > held.budget:
            budget = 3 * root.untyped_storage().nbytes()
            held = _HeldBatch(weakref.ref(root, self._release), batch, budget)
            self._held = held
        if size <= held.budget:
            held.entries[(chunk, tuple(shape))] = operands
            held.size += size

    def _release(self, ref: weakref.ref) -> None:
        held = self._held
        if held is not None and held.ref is ref:
            self._held = None


OPERAND_MEMO = OperandMemo()
"""The memo of :func:`point_and_ibp_eps` (one batch, process-wide)."""

_RESHAPES = (BoundFlatten, BoundIdentity)


def point_and_ibp_eps(
    model: nn.Module, x: Tensor, eps: float, params: ParamDict | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`point_and_ibp` over the eps-box ``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]`` (order
    check only for ``eps`` not >= 0), bit for bit, for losses that evaluate one batch at one radius
    many times (full-batch HMC: every leapfrog step, chunk by chunk). Where the first weight layer
    is a Linear with one point weight matrix after reshapes only (an MLP), its operands (the point
    stacked on the box centre, the box radius) come from :data:`OPERAND_MEMO`, built on the first
    call for the batch and eps: no box, centre or radius is recomputed while they are unchanged."""
    if not (x.is_floating_point() and type(eps) in (int, float) and eps >= 0):  # box dtype != x's, or eps < 0
        lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        return point_and_ibp(model, x, lower, upper, params=params, check_order=not eps >= 0)
    ops, S = build_ops(model, params, None, x.dtype)
    k = next((i for i, op in enumerate(ops) if type(op) not in _RESHAPES), len(ops))
    matrix = ops[k].point_matrix() if k < len(ops) and type(ops[k]) is BoundLinear else None
    key = OPERAND_MEMO.key(x, eps) if matrix is not None and matrix[0].dtype == x.dtype else None
    p = x.unsqueeze(0)
    if key is not None:
        for op in ops[:k]:  # reshapes: their outputs are views
            op.in_shape, op.sound = p.shape[2:], False
            p = op.forward(p)
    if key is None or p.dim() != 3:
        lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        l, u, _ = _prepare_input(ops, lower, upper, S, x.dtype, False, False)
        return _point_and_ibp_ops(ops, S, x.unsqueeze(0), l, u)
    operands = OPERAND_MEMO.get(key, p.shape)
    if operands is None:
        l, u = (x - eps).clamp(0.0, 1.0).unsqueeze(0), (x + eps).clamp(0.0, 1.0).unsqueeze(0)
        for op in ops[:k]:
            l, u = op.ibp(l, u)
        operands = point_box_operands(p[0], l[0], u[0])
        OPERAND_MEMO.put(key, p.shape, operands)
    ops[k].in_shape, ops[k].sound = p.shape[2:], False
    p, l, u = linear_ibp_from_operands(operands, *matrix)
    return _point_and_ibp_ops(ops[k + 1 :], S, p, l, u)


def _auto_chunk(model: nn.Module, ops: list[BoundOp], l: Tensor, S: int) -> int:
    """Samples per pass: all of them off-CPU; on CPU as many as keep one layer's
    activations plus the samples' weights within ``CPU_CHUNK_BYTES`` (measured
    faster than one huge pass, which is memory-bound; see docs/bounds.md)."""
    if l.device.type != "cpu":
        return S
    x = torch.zeros(1, *l.shape[2:], dtype=l.dtype)
    widest = x.numel()
    with torch.no_grad():
        for module in (op.module for op in ops):
            first = next(iter(module.parameters()), None)
            try:  # shapes only: the module's own (unsampled) tensors, one example
                x = module(x if first is None else x.to(first.dtype))
            except (RuntimeError, TypeError, ValueError):
                return S
            widest = max(widest, x.numel())
    per_sample = sum(t.numel() // S for op in ops for k, t in op.t.values.items() if k in op.t.sampled)
    per_sample += l.shape[1] * widest
    return max(1, min(S, CPU_CHUNK_BYTES // (per_sample * l.element_size())))


def _bounds(
    ops: list[BoundOp],
    l: Tensor,
    u: Tensor,
    method: str,
    spec: Tensor | None,
    S: int | None,
    intersect_ibp: bool,
    sound: bool = False,
) -> Box:
    """Bounds ``(S', B, ...)`` of prepared inputs ``(Sx, B, ...)`` (``S'`` in ``{1, S}``)."""
    if sound:
        _outward_radii(ops)
    ibp_lo, ibp_up = _forward_intervals(ops, l, u, method, spec, S, sound=sound)
    if method == "ibp":
        return ibp_lo, ibp_up
    real = [op for op in ops if not op.passthrough]
    out_feat = _out_shape(real[-1], l.new_zeros(1, 1, *real[-1].in_shape)) if real else l.shape[2:]
    if spec is None:
        n = out_feat.numel()
        A0 = torch.eye(n, dtype=l.dtype, device=l.device).view(1, 1, n, *out_feat)
    else:
        A0 = spec.view(1, -1 if spec.dim() == 3 else 1, spec.shape[-2], *out_feat)
    lo, up = crown_backward_pass(ops, A0, l, u, sound)
    if spec is None:
        lo, up = lo.view(*lo.shape[:2], *out_feat), up.view(*up.shape[:2], *out_feat)
    if intersect_ibp:
        lo, up = torch.maximum(lo, ibp_lo), torch.minimum(up, ibp_up)
    return lo, up


def _sound_inputs(
    model: nn.Module,
    lower: Tensor,
    upper: Tensor,
    params: ParamDict | None,
    param_bounds: BoxDict | None,
    spec: Tensor | None,
    dtype: torch.dtype,
):
    """``tol="sound"``: the input box and weight boxes cast to ``dtype`` outward; point
    parameters and the spec must be exactly representable in ``dtype`` (else refused)."""
    check_dtype(dtype)
    lower, upper = torch.as_tensor(lower), torch.as_tensor(upper)
    if lower.is_floating_point() and upper.is_floating_point():
        lower, upper = cast_down(lower, dtype), cast_up(upper, dtype)

    def exact(name: str, t: Tensor) -> None:
        t = torch.as_tensor(t)
        if t.is_floating_point() and t.dtype != dtype and torch.finfo(t.dtype).bits > torch.finfo(dtype).bits:
            if not torch.equal(t.to(dtype).to(t.dtype), t):
                raise ConfigError(
                    f"tol='sound': {name} ({t.dtype}) is not exactly representable in {dtype}; pass dtype={t.dtype}"
                )

    given = dict(params or {})
    for k, t in [*model.named_parameters(), *model.named_buffers()]:
        if k not in given and (param_bounds is None or k not in param_bounds):
            exact(f"parameter '{k}'", t.detach())
    for k, t in given.items():
        exact(f"params entry '{k}'", t.detach() if isinstance(t, Tensor) else t)
    if spec is not None:
        exact("spec", spec)
    if param_bounds:
        param_bounds = {
            k: (
                cast_down(torch.as_tensor(a), dtype) if torch.as_tensor(a).is_floating_point() else a,
                cast_up(torch.as_tensor(b), dtype) if torch.as_tensor(b).is_floating_point() else b,
            )
            for k, (a, b) in param_bounds.items()
        }
    return lower, upper, param_bounds


def compute_bounds(
    model: nn.Module,
    lower: Tensor,
    upper: Tensor,
    method: str = "ibp",
    params: ParamDict | None = None,
    param_bounds: BoxDict | None = None,
    spec: Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    tol: float | tuple[float, float] | str | None = None,
    intersect_ibp: bool = True,
    input_has_samples: bool | None = None,
    sample_chunk: int | None = None,
) -> Box:
    """Sound lower/upper bounds of ``model(x)`` (or ``spec @ model(x)``) over ``x`` in ``[lower, upper]``.

    See the package docstring (:mod:`certbnn.bounds`) for the full contract.
    Shapes: ``lower``/``upper`` ``(B, *in)`` (or ``(S, B, *in)``); result
    ``([S,] B, *out)`` without spec, ``([S,] B, K_spec)`` with one; the leading
    ``S`` is present iff some parameter (or the input) carries samples.
    ``sample_chunk``: samples bounded per batched pass (None: all on GPU, a
    cache-sized chunk on CPU; results are identical whatever the chunk).
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got '{method}'")
    if param_bounds and method != "ibp":
        warnings.warn(
            f"method='{method}' does not support param_bounds (weight intervals); using IBP",
            BoundsFallbackWarning,
            stacklevel=2,
        )
        method = "ibp"
    dtype = _compute_dtype(lower, dtype)
    sound = isinstance(tol, str) and tol == "sound"
    with plain_arithmetic() if sound else contextlib.nullcontext():
        if sound:  # _sound_inputs rounds outward too
            lower, upper, param_bounds = _sound_inputs(model, lower, upper, params, param_bounds, spec, dtype)
        rt = None if sound else resolve_tol(tol, dtype)
        return _compute(
            model,
            lower,
            upper,
            method,
            params,
            param_bounds,
            spec,
            dtype,
            rt,
            intersect_ibp,
            input_has_samples,
            sample_chunk,
            sound,
        )


def _compute(
    model: nn.Module,
    lower: Tensor,
    upper: Tensor,
    method: str,
    params: ParamDict | None,
    param_bounds: BoxDict | None,
    spec: Tensor | None,
    dtype: torch.dtype,
    rt: tuple[float, float] | None,
    intersect_ibp: bool,
    input_has_samples: bool | None,
    sample_chunk: int | None,
    sound: bool,
) -> Box:
    if not is_chain(model):  # custom forward code: the graph engine traces it
        return compute_graph(
            model,
            lower,
            upper,
            method,
            params,
            param_bounds,
            spec,
            dtype,
            rt,
            intersect_ibp,
            input_has_samples,
            sample_chunk,
            sound,
        )
    ops, S = build_ops(model, params, param_bounds, dtype)
    l, u, x_sampled = _prepare_input(ops, lower, upper, S, dtype, input_has_samples)
    if x_sampled and S is None:
        S = l.shape[0]
    spec_t = _prepare_spec(spec, l.shape[1], l.dtype)
    chunk = S
    if S is not None and S > 1:
        chunk = _auto_chunk(model, ops, l, S) if sample_chunk is None else max(1, int(sample_chunk))
    if S is None or chunk >= S:
        lo, up = _bounds(ops, l, u, method, spec_t, S, intersect_ibp, sound)
    else:
        parts = []
        for i in range(0, S, chunk):
            p, pb = sample_slices(model, params, param_bounds, i, i + chunk)
            ops_i, S_i = build_ops(model, p, pb, dtype)
            li, ui = (l[i : i + chunk], u[i : i + chunk]) if x_sampled and l.shape[0] > 1 else (l, u)
            n = min(chunk, S - i)
            lo_i, up_i = _finish(*_bounds(ops_i, li, ui, method, spec_t, S_i or n, intersect_ibp, sound), True, n)
            parts.append((lo_i, up_i))
        lo, up = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
    lo, up = _finish(lo, up, x_sampled or S is not None, S)
    return widen(lo, up, *rt) if rt is not None else (lo, up)


def interval_forward(
    model: nn.Module,
    lower: Tensor,
    upper: Tensor,
    params: ParamDict | None = None,
    param_bounds: BoxDict | None = None,
    *,
    dtype: torch.dtype | None = None,
    input_has_samples: bool | None = None,
) -> list[tuple[str, Tensor, Tensor]]:
    """IBP bounds of every layer's output: ``[(layer_name, lower, upper), ...]`` in order (for a
    traced graph, every node's: modules by qualified name, functions by fx node name)."""
    dtype = _compute_dtype(lower, dtype)
    if not is_chain(model):
        return graph_interval_forward(model, lower, upper, params, param_bounds, dtype, input_has_samples)
    ops, S = build_ops(model, params, param_bounds, dtype)
    l, u, x_sampled = _prepare_input(ops, lower, upper, S, dtype, input_has_samples)
    if x_sampled and S is None:
        S = l.shape[0]
    out: list[tuple[str, Tensor, Tensor]] = []
    _forward_intervals(ops, l, u, "ibp", None, S, collect=out)
    return [(n, *_finish(a, b, x_sampled or S is not None, S)) for n, a, b in out]
