"""The bound engine over general graphs (DAGs traced by :mod:`certbnn.bounds.graph_trace`).

Same contract as the chain engine (:func:`certbnn.bounds.compute_bounds` dispatches here
for any model that is not a chain of layers), with the same per-layer rules:

* **IBP** runs the nodes in topological order; a node of several inputs (sum,
  concatenation) combines their boxes (:class:`~certbnn.bounds.ops_graph.MergeOp`). A
  spec is folded into the output node (through trailing identities) as in a chain.
* **CROWN** back-substitutes from the output (or, for ``"crown"``'s intermediate bounds,
  from the input of a nonlinear node) in reverse topological order: every node passes
  its coefficients to its inputs, and a node read by several others (a residual branch
  point, the input) receives the **sum** of their coefficients. With ``tol="sound"``
  each such sum adds its rounding error ``gamma_1 (|A_1| + |A_2|) max|x|`` (``x`` over
  the node's IBP box) to the bias, besides the per-step errors of the chain engine.
* Weight boxes, stacked samples (``S``) and sample chunks work as in the chain engine.

On a chain (an ``nn.Sequential``) the graph engine gives the chain engine's bounds:
same ops, same order (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from certbnn.bounds.base import BoundOp, Box, interval_spec, interval_spec_sound
from certbnn.bounds.graph_trace import INPUT, GraphPlan, cached_trace, expected_input_rank
from certbnn.bounds.ops_graph import MergeOp
from certbnn.bounds.params import resolve_tensors, sample_slices
from certbnn.bounds.rounding import up as round_up
from certbnn.bounds.shared import (
    CPU_CHUNK_BYTES,
    CROWN_MAX_ELEMENTS,
    acc,
    add_step_bias,
    concretize,
    finish,
    outward_radii,
    prepare_spec,
    step_error,
)
from certbnn.bounds.specs import known_true, widen
from certbnn.bounds.structure import check_global_hooks
from certbnn.errors import ConfigError, UnsupportedLayerError

ParamDict = Mapping[str, Tensor]
BoxDict = Mapping[str, tuple[Tensor, Tensor]]


@dataclass
class GraphOps:
    """Bound ops of one traced DAG (``inputs[i]``: node indices, ``INPUT`` = the model input)."""

    ops: list[BoundOp]
    inputs: list[tuple[int, ...]]
    plan: GraphPlan

    @property
    def out_shape(self) -> torch.Size:
        return self.plan.nodes[-1].shape


def build_graph_ops(
    model: nn.Module, plan: GraphPlan, params: ParamDict | None, param_bounds: BoxDict | None, dtype: torch.dtype | None
) -> tuple[GraphOps, int | None]:
    """One op per node with resolved tensors (canonical names, as the chain engine); and ``S``."""
    tensors, S = resolve_tensors(model, [(n.name, n.module) for n in plan.nodes], params, param_bounds, dtype)
    ops = [n.rule(n.module, n.name, t) for n, t in zip(plan.nodes, tensors)]
    return GraphOps(ops, [n.inputs for n in plan.nodes], plan), S


def _ancestors(g: GraphOps) -> list[set[int]]:
    anc: list[set[int]] = []
    for ins in g.inputs:
        a: set[int] = set()
        for j in ins:
            if j != INPUT:
                a |= anc[j] | {j}
        anc.append(a)
    return anc


def _ibp_exact(g: GraphOps, nodes: set[int]) -> bool:
    """IBP is exact on an affine chain with at most one mixing op (no merges: branches correlate)."""
    ops = [g.ops[i] for i in nodes]
    return all(op.is_linear and not isinstance(op, MergeOp) for op in ops) and sum(op.mixing for op in ops) <= 1


def _fold_node(g: GraphOps) -> int:
    """The node a spec folds into: the output, or the last op before trailing identities."""
    i = len(g.ops) - 1
    while i >= 0 and g.ops[i].passthrough and len(g.inputs[i]) == 1 and g.inputs[i][0] != INPUT:
        i = g.inputs[i][0]
    return i


def forward_intervals(
    g: GraphOps,
    lower: Tensor,
    upper: Tensor,
    method: str,
    spec: Tensor | None,
    S: int | None,
    collect: list | None = None,
    sound: bool = False,
) -> tuple[Box, dict[int, Box]]:
    """IBP through the DAG (``spec`` folded into :func:`_fold_node`); sets every op's input shape(s)
    and, where needed, input bounds (tightened by CROWN for ``"crown"``). Returns the output box and
    the boxes of the nodes (``INPUT`` included) that CROWN needs."""
    boxes: dict[int, Box] = {INPUT: (lower, upper)}
    fold = _fold_node(g) if spec is not None else -2
    anc = _ancestors(g) if method == "crown" else None
    keep_all = method != "ibp" or sound
    last_use = {j: i for i, ins in enumerate(g.inputs) for j in ins}
    for i, (op, ins) in enumerate(zip(g.ops, g.inputs)):
        op.sound = sound
        if isinstance(op, MergeOp):
            ins_boxes = [boxes[j] for j in ins]
            op.in_shapes = [b[0].shape[2:] for b in ins_boxes]
            out = op.ibp_sound_n(ins_boxes) if sound else op.ibp_n(ins_boxes)
        else:
            j = ins[0]
            l, u = boxes[j]
            op.in_shape = l.shape[2:]
            if op.needs_input_bounds:
                if anc is not None and j != INPUT and not _ibp_exact(g, anc[j] | {j}):
                    cl, cu = _crown_intermediate(g, j, op, lower, upper, S, boxes, sound)
                    l, u = torch.maximum(l, cl), torch.minimum(u, cu)
                    boxes[j] = (l, u)
                op.input_bounds = (l, u)
            if sound:
                op.sound_box = (l, u)
            if i == fold:
                out_numel = g.plan.nodes[i].shape.numel()
                if spec.shape[-1] != out_numel:
                    raise ConfigError(f"spec has {spec.shape[-1]} columns but the model has {out_numel} outputs")
                return (op.ibp_spec_sound(l, u, spec) if sound else op.ibp_spec(l, u, spec)), boxes
            out = op.ibp_sound(l, u) if sound else op.ibp(l, u)
        boxes[i] = out
        if collect is not None:
            collect.append((op.name, *out))
        if not keep_all:
            for j in ins:
                if j != INPUT and last_use.get(j) == i:
                    boxes.pop(j, None)
    lo, up = boxes[len(g.ops) - 1]
    if spec is None:
        return (lo, up), boxes
    if spec.shape[-1] != lo[0, 0].numel():
        raise ConfigError(f"spec has {spec.shape[-1]} columns but the model has {lo[0, 0].numel()} outputs")
    return (interval_spec_sound(lo, up, spec) if sound else interval_spec(lo, up, spec)), boxes


def _crown_intermediate(
    g: GraphOps,
    j: int,
    target: BoundOp,
    lower: Tensor,
    upper: Tensor,
    S: int | None,
    boxes: dict[int, Box],
    sound: bool,
) -> Box:
    """CROWN bounds of node ``j``'s output (the input of ``target``) over the input box."""
    feat = g.plan.nodes[j].shape
    n = feat.numel()
    widest = max([lower[0, 0].numel()] + [g.plan.nodes[i].shape.numel() for i in _ancestors(g)[j]])
    need = (S or 1) * lower.shape[1] * n * widest
    if need > CROWN_MAX_ELEMENTS:
        raise ConfigError(
            f"method='crown' needs ~{need / 2**28:.1f} GiB (float32) of coefficients for the input of layer "
            f"{target.label()}; use method='crown-ibp' (IBP intermediate bounds)"
        )
    eye = torch.eye(n, dtype=lower.dtype, device=lower.device).view(1, 1, n, *feat)
    lo, up = backward_pass(g, j, eye, boxes, sound)
    return lo.view(*lo.shape[:2], *feat), up.view(*up.shape[:2], *feat)


def backward_pass(g: GraphOps, target: int, A0: Tensor, boxes: dict[int, Box], sound: bool = False) -> Box:
    """Back-substitute ``A0 @ output(target)`` through the DAG to the input box; ``(S, B, K)`` bounds.

    Coefficients reaching a node from several users are summed; ``sound``: with the rounding error
    of every step (as the chain engine) and of every sum."""
    A_lo: dict[int, Tensor] = {target: A0}
    A_up: dict[int, Tensor] = {target: A0}
    b_lo: Tensor | None = None
    b_up: Tensor | None = None

    def merge_error(j: int, *As: Tensor) -> Tensor:
        lo_j, up_j = boxes[j]
        m = torch.maximum(lo_j.abs(), up_j.abs())
        err = None
        for A in As:
            e = step_error(A, m, 1, m)
            err = e if err is None else round_up(err + e)
        return err

    def give(j: int, al: Tensor, au: Tensor) -> None:
        nonlocal b_lo, b_up
        if j not in A_lo:
            A_lo[j], A_up[j] = al, au
            return
        old_l, old_u = A_lo[j], A_up[j]
        if sound:
            e_lo = merge_error(j, old_l, al)
            e_up = e_lo if (old_u is old_l and au is al) else merge_error(j, old_u, au)
            b_lo, b_up = acc(b_lo, -e_lo, False), acc(b_up, e_up, True)
        new_l = old_l + al
        A_lo[j] = new_l
        A_up[j] = new_l if (old_u is old_l and au is al) else old_u + au

    for i in range(target, -1, -1):
        if i not in A_lo:
            continue
        al, au = A_lo.pop(i), A_up.pop(i)
        op, ins = g.ops[i], g.inputs[i]
        if isinstance(op, MergeOp):
            parts_lo = op.backward_n(al)
            parts_up = parts_lo if au is al else op.backward_n(au)
            for j, pl, pu in zip(ins, parts_lo, parts_up):
                give(j, pl, pu)
            continue
        nl, bl, nu, bu = op.crown_backward(al, au)
        b_lo, b_up = add_step_bias(op, al, au, bl, bu, b_lo, b_up, sound)
        give(ins[0], nl, nu)
    lower, upper = boxes[INPUT]
    if INPUT not in A_lo:  # the output does not depend on the input
        zero = lower.new_zeros(1, 1, A0.shape[2], *lower.shape[2:])
        A_lo[INPUT] = A_up[INPUT] = zero
    return concretize(A_lo[INPUT], A_up[INPUT], b_lo, b_up, lower, upper, sound)


def graph_bounds(
    g: GraphOps,
    l: Tensor,
    u: Tensor,
    method: str,
    spec: Tensor | None,
    S: int | None,
    intersect_ibp: bool,
    sound: bool = False,
) -> Box:
    """Bounds ``(S', B, ...)`` of prepared inputs ``(Sx, B, ...)`` (as the chain engine's ``_bounds``)."""
    if sound:
        outward_radii(g.ops)
    (ibp_lo, ibp_up), boxes = forward_intervals(g, l, u, method, spec, S, sound=sound)
    if method == "ibp":
        return ibp_lo, ibp_up
    out_feat = g.out_shape
    if spec is None:
        n = out_feat.numel()
        A0 = torch.eye(n, dtype=l.dtype, device=l.device).view(1, 1, n, *out_feat)
    else:
        A0 = spec.view(1, -1 if spec.dim() == 3 else 1, spec.shape[-2], *out_feat)
    lo, up = backward_pass(g, len(g.ops) - 1, A0, boxes, sound)
    if spec is None:
        lo, up = lo.view(*lo.shape[:2], *out_feat), up.view(*up.shape[:2], *out_feat)
    if intersect_ibp:
        lo, up = torch.maximum(lo, ibp_lo), torch.minimum(up, ibp_up)
    return lo, up


def _sample_count(model: nn.Module, params: ParamDict | None, param_bounds: BoxDict | None) -> int | None:
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    given = [*(params or {}).items(), *((k, v[0]) for k, v in (param_bounds or {}).items())]
    for k, v in given:
        v = torch.as_tensor(v)
        if k in own and v.dim() == own[k].dim() + 1:
            return v.shape[0]
    return None


def plan_for(
    model: nn.Module,
    lower: Tensor,
    params: ParamDict | None,
    param_bounds: BoxDict | None,
    input_has_samples: bool | None,
) -> tuple[GraphPlan, bool]:
    """Trace ``model`` for the input box ``lower``; decide whether its leading dim holds samples
    (as the chain engine: from the rank the first rank-fixing op expects)."""
    check_global_hooks(model)
    lower = torch.as_tensor(lower)
    if input_has_samples is None and lower.dim() >= 3 and _sample_count(model, params, param_bounds) is not None:
        try:
            plan = cached_trace(model, tuple(lower.shape[2:]))
            if expected_input_rank(plan) == lower.dim() - 2:
                return plan, True
        except UnsupportedLayerError:
            pass
    sampled = bool(input_has_samples)
    if lower.dim() < (3 if sampled else 2):
        raise ConfigError(f"lower/upper of shape {tuple(lower.shape)}: expected ({'S, ' if sampled else ''}B, *in)")
    return cached_trace(model, tuple(lower.shape[2 if sampled else 1 :])), sampled


def _prepare(lower: Tensor, upper: Tensor, dtype: torch.dtype, S: int | None, sampled: bool) -> tuple[Tensor, Tensor]:
    lower, upper = torch.as_tensor(lower).to(dtype), torch.as_tensor(upper).to(dtype)
    if lower.shape != upper.shape:
        raise ConfigError(f"lower {tuple(lower.shape)} and upper {tuple(upper.shape)} differ in shape")
    if known_true((lower > upper).any()):
        raise ConfigError("input box has lower > upper somewhere")
    if sampled:
        if S is not None and lower.shape[0] not in (1, S):
            raise ConfigError(f"input sample dim {lower.shape[0]} does not match the params' S = {S}")
        return lower, upper
    return lower.unsqueeze(0), upper.unsqueeze(0)


def _auto_chunk(g: GraphOps, l: Tensor, S: int) -> int:
    """Samples per pass (as the chain engine's): all off-CPU; on CPU as many as keep the widest
    activation of the batch plus the samples' weights within ``CPU_CHUNK_BYTES``."""
    if l.device.type != "cpu":
        return S
    widest = max([l[0, 0].numel()] + [n.shape.numel() for n in g.plan.nodes])
    per_sample = sum(t.numel() // S for op in g.ops for k, t in op.t.values.items() if k in op.t.sampled)
    per_sample += l.shape[1] * widest
    return max(1, min(S, CPU_CHUNK_BYTES // (per_sample * l.element_size())))


def compute_graph(
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
    """:func:`certbnn.bounds.compute_bounds` for a traced graph (arguments already checked)."""
    plan, x_sampled = plan_for(model, lower, params, param_bounds, input_has_samples)
    g, S = build_graph_ops(model, plan, params, param_bounds, dtype)
    l, u = _prepare(lower, upper, dtype, S, x_sampled)
    if x_sampled and S is None:
        S = l.shape[0]
    spec_t = prepare_spec(spec, l.shape[1], l.dtype)
    chunk = S
    if S is not None and S > 1:
        chunk = _auto_chunk(g, l, S) if sample_chunk is None else max(1, int(sample_chunk))
    if S is None or chunk >= S:
        lo, up = graph_bounds(g, l, u, method, spec_t, S, intersect_ibp, sound)
    else:
        parts = []
        for i in range(0, S, chunk):
            p, pb = sample_slices(model, params, param_bounds, i, i + chunk)
            g_i, S_i = build_graph_ops(model, plan, p, pb, dtype)
            li, ui = (l[i : i + chunk], u[i : i + chunk]) if x_sampled and l.shape[0] > 1 else (l, u)
            n = min(chunk, S - i)
            parts.append(finish(*graph_bounds(g_i, li, ui, method, spec_t, S_i or n, intersect_ibp, sound), True, n))
        lo, up = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
    lo, up = finish(lo, up, x_sampled or S is not None, S)
    return widen(lo, up, *rt) if rt is not None else (lo, up)


def graph_interval_forward(
    model: nn.Module,
    lower: Tensor,
    upper: Tensor,
    params: ParamDict | None,
    param_bounds: BoxDict | None,
    dtype: torch.dtype,
    input_has_samples: bool | None,
) -> list[tuple[str, Tensor, Tensor]]:
    """:func:`certbnn.bounds.interval_forward` for a traced graph: IBP bounds of every node."""
    plan, x_sampled = plan_for(model, lower, params, param_bounds, input_has_samples)
    g, S = build_graph_ops(model, plan, params, param_bounds, dtype)
    l, u = _prepare(lower, upper, dtype, S, x_sampled)
    if x_sampled and S is None:
        S = l.shape[0]
    out: list[tuple[str, Tensor, Tensor]] = []
    forward_intervals(g, l, u, "ibp", None, S, collect=out)
    return [(n, *finish(a, b, x_sampled or S is not None, S)) for n, a, b in out]
