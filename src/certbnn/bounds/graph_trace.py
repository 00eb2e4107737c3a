"""Trace a module's ``forward`` into a DAG of operations that have bound rules.

:func:`trace_graph` runs ``torch.fx`` symbolic tracing through the model's own call path
(``model(x)``: instance ``forward`` and ``_call_impl`` included) and stops at modules
with a registered rule (Linear, Conv2d, activations, pools, BatchNorm, ...: the layers
of :mod:`certbnn.bounds.structure`, with the same checks). Every other traced call
becomes one of the modules of :mod:`certbnn.bounds.ops_graph` or a functional
activation as its module (``torch.relu``/``F.relu``/``x.relu()`` -> ``nn.ReLU``), and the
model is then run on two random probe batches (sizes 2 and 3) to fix the feature shapes
of reshapes and check that they keep the batch dim, and to check that the DAG computes
``model(x)``. Refused with a one-line :class:`~certbnn.errors.UnsupportedLayerError`
naming the operation: code torch.fx cannot trace (data-dependent control flow),
functions and methods without a rule, products or quotients of two traced tensors,
indexing, in-place operations on a tensor another operation reads, arithmetic on the
model's tensors (a posterior could not replace them), sums of tensors that broadcast,
anything that mixes examples of the batch, several outputs, and (as for chains) hooks,
parametrizations, train-mode Dropout/BatchNorm.

Names: a module's node is named by its qualified name (``"layer1.0.conv1"``; a module
called twice gives two nodes of one name), a function's by its fx node name
(``"add_1"``); parameters keep their canonical names (``model.named_parameters()``).
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from certbnn.bounds import ops_activation, ops_affine, ops_linear, ops_pool  # noqa: F401  (register rules)
from certbnn.bounds.base import BoundOp, ElementwiseOp
from certbnn.bounds.ops_affine import BoundIdentity, ChannelAffineOp
from certbnn.bounds.ops_graph import Add, Cat, ConstAffine, Mean, Reshape
from certbnn.bounds.params import tensor_names
from certbnn.bounds.registry import lookup_bound_class, lookup_rule
from certbnn.bounds.structure import check_traced_module, label, leaf_rule
from certbnn.errors import UnsupportedLayerError

INPUT = -1  # index of the model input in NodeSpec.inputs


@dataclass
class NodeSpec:
    """One operation of the DAG: ``module`` computes it, ``rule`` bounds it, ``inputs`` are
    node indices (``INPUT`` for the model input), ``shape`` its output feature shape."""

    name: str
    module: nn.Module
    rule: type[BoundOp]
    inputs: tuple[int, ...]
    shape: torch.Size = field(default_factory=torch.Size)
    is_module: bool = False  # a module of the model (else built from a traced function)


@dataclass
class GraphPlan:
    """The traced DAG of ``model`` for inputs of feature shape ``in_shape`` (topological order)."""

    nodes: list[NodeSpec]  # the output is the last node
    in_shape: torch.Size


class _Root(nn.Module):
    """Wrapper so that the model itself is entered through ``Module.__call__`` (fx calls the
    root's class ``forward`` directly, which would skip an instance ``forward`` and hooks)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: Tensor) -> Tensor:
        return self.m(x)


def _strip(qualified: str) -> str:
    return qualified[2:] if qualified.startswith("m.") else ""


class _Tracer(fx.Tracer):
    """Leaves: modules with a registered rule, and torch.nn's own non-container modules
    (refused later when they have no rule); everything else is traced through."""

    def is_leaf_module(self, m: nn.Module, qualified: str) -> bool:
        if isinstance(m, _Root):
            return False
        return lookup_rule(type(m)) is not None or super().is_leaf_module(m, qualified)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        qualified = self.path_of_module(m)
        name = _strip(qualified)
        if self.is_leaf_module(m, qualified):
            leaf_rule(name, m)  # hooks, overridden call path, train-mode configurations
        elif not isinstance(m, _Root):
            check_traced_module(name, m)
        return super().call_module(m, forward, args, kwargs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _fx_graph(model: nn.Module) -> tuple[fx.Graph, nn.Module]:
    root = _Root(model)
    try:
        graph = _Tracer().trace(root)
    except UnsupportedLayerError:
        raise
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, ... from user code
        raise UnsupportedLayerError(
            f"model {label('', model)} cannot be traced by torch.fx (the bound engine "
            f"needs a static graph): {_first_line(err)}"
        ) from None
    return graph, root


# ------------------------------------------------------------------ probes
def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _map(fn, a: Any) -> Any:
    if isinstance(a, (list, tuple)):
        return type(a)(_map(fn, v) for v in a)
    if isinstance(a, dict):
        return {k: _map(fn, v) for k, v in a.items()}
    return fn(a)


def _run(graph: fx.Graph, root: nn.Module, x: Tensor) -> tuple[dict[fx.Node, Any], Any]:
    """Values of every node on input ``x`` (the fx graph, interpreted), and the output."""
    env: dict[fx.Node, Any] = {}

    def val(a: Any) -> Any:
        return _map(lambda v: env[v] if isinstance(v, fx.Node) else v, a)

    out = None
    for node in graph.nodes:
        args, kwargs = val(node.args), val(node.kwargs)
        if node.op == "placeholder":
            env[node] = x
        elif node.op == "get_attr":
            env[node] = _fetch(root, node.target)
        elif node.op == "call_module":
            env[node] = _fetch(root, node.target)(*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "output":
            out = args[0]
    return env, out


# ------------------------------------------------------------------ translation
class _X:
    """A traced tensor: the output of node ``index`` (``INPUT`` for the model input)."""

    def __init__(self, index: int, node: fx.Node) -> None:
        self.index, self.node = index, node


class _Const:
    """A tensor of the model (a ``get_attr`` node)."""

    def __init__(self, tensor: Tensor, name: str) -> None:
        self.tensor, self.name = tensor, name


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


_RELU = {torch.relu, F.relu, torch.nn.functional.relu}
_TANH = {torch.tanh, F.tanh}
_SIGMOID = {torch.sigmoid, F.sigmoid}
_ADD = {operator.add, torch.add}
_SUB = {operator.sub, torch.sub}
_MUL = {operator.mul, torch.mul}
_DIV = {operator.truediv, torch.div}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_FLAT = {torch.flatten}
_RESHAPE_FN = {torch.reshape}
_STATIC_METHODS = {"size", "dim", "numel"}
_STATIC_ATTRS = {"shape", "ndim"}


class _Translator:
    def __init__(self, model: nn.Module, root: nn.Module, graph: fx.Graph, probes: list[dict[fx.Node, Any]]) -> None:
        self.model, self.root, self.graph, self.probes = model, root, graph, probes
        self.nodes: list[NodeSpec] = []
        self.ref: dict[fx.Node, Any] = {}
        self.canon = tensor_names(model)
        self.users: dict[fx.Node, int] = {n: len(n.users) for n in graph.nodes}

    # -- helpers
    def refuse(self, node: fx.Node, why: str) -> UnsupportedLayerError:
        if node.op == "call_module":
            return UnsupportedLayerError(f"layer {label(_strip(node.target), _fetch(self.root, node.target))} {why}")
        return UnsupportedLayerError(f"operation '{node.name}' ({_target_name(node)}) {why}")

    def value(self, a: Any, node: fx.Node, strict: bool = True) -> Any:
        """Resolve an argument: traced tensors -> _X, model tensors -> _Const, static values -> the probe's."""

        def one(v: Any) -> Any:
            if not isinstance(v, fx.Node):
                return v
            r = self.ref[v]
            if r is _STATIC:
                vals = [p[v] for p in self.probes]
                if strict and any(not _same(vals[0], w) for w in vals[1:]):
                    raise self.refuse(node, f"uses '{v.name}', which depends on the batch size")
                return vals[0]
            return r

        return _map(one, a)

    def shape(self, node: fx.Node, k: int = 0) -> torch.Size:
        return self.probes[k][node].shape[1:]

    def add(
        self, node: fx.Node, module: nn.Module, inputs: list[_X], name: str | None = None, is_module: bool = False
    ) -> None:
        rule = lookup_bound_class(type(module))
        if rule is None:
            raise UnsupportedLayerError(
                f"layer {label(name or node.name, module)} has no bound rule and is not "
                "traced through (register a rule with certbnn.bounds.register_bound)"
            )
        out = self.probes[0][node]
        if not isinstance(out, Tensor):
            raise self.refuse(node, f"returns {type(out).__name__}, not a tensor")
        for k, p in enumerate(self.probes):
            if p[node].dim() == 0 or p[node].shape[0] != (2, 3)[k]:
                raise self.refuse(node, "mixes the examples of the batch (its output does not keep the batch dim)")
        if self.probes[1][node].shape[1:] != out.shape[1:]:
            raise self.refuse(node, "has an output shape that depends on the batch size")
        self.nodes.append(
            NodeSpec(name or node.name, module, rule, tuple(x.index for x in inputs), out.shape[1:], is_module)
        )
        self.ref[node] = _X(len(self.nodes) - 1, node)

    def check_inplace(self, node: fx.Node, x: _X, inplace: bool) -> None:
        """An in-place op is what its out-of-place version computes only if nothing else reads its
        input (or a view of it) afterwards."""
        if not inplace:
            return
        src = x.node
        aliasing = (
            src.op == "placeholder"
            or (x.index >= 0 and self.nodes[x.index].rule.passthrough)
            or (x.index >= 0 and isinstance(self.nodes[x.index].module, Reshape))
        )
        if self.users[src] > 1 or (aliasing and src.op != "placeholder"):
            raise self.refuse(node, "works in place on a tensor that another operation also reads")

    def tensors_only(self, node: fx.Node, xs: list[Any]) -> list[_X]:
        for v in xs:
            if not isinstance(v, _X):
                raise self.refuse(node, "mixes a traced tensor with a constant or a model tensor in a concatenation")
        return xs

    # -- per node kind
    def run(self) -> GraphPlan:
        out_index = None
        for node in self.graph.nodes:
            if node.op == "placeholder":
                if self.ref:
                    raise self.refuse(node, "is a second input: the engine bounds models of one input tensor")
                self.ref[node] = _X(INPUT, node)
            elif node.op == "get_attr":
                t = self.probes[0][node]
                if not isinstance(t, Tensor):
                    self.ref[node] = _STATIC
                else:
                    self.ref[node] = _Const(t, _strip(node.target))
            elif node.op == "output":
                out = node.args[0]
                r = self.ref.get(out) if isinstance(out, fx.Node) else None
                if not isinstance(r, _X):
                    what = type(self.probes[0][out] if isinstance(out, fx.Node) else out).__name__
                    raise UnsupportedLayerError(
                        f"model {label('', self.model)} returns {what}: the engine bounds "
                        "models whose output is one tensor"
                    )
                if r.index == INPUT:
                    self.add(node, nn.Identity(), [r], name="output")
                    r = self.ref[node]
                out_index = r.index
            else:
                self.call(node)
        assert out_index is not None
        return GraphPlan(_prune(self.nodes, out_index), self.probes[0][next(iter(self.graph.nodes))].shape[1:])

    def call(self, node: fx.Node) -> None:
        deps = [self.ref[a] for a in node.all_input_nodes]
        traced = any(isinstance(d, _X) for d in deps)
        if not traced:
            if any(isinstance(d, _Const) for d in deps):
                raise self.refuse(
                    node,
                    "computes with a tensor of the model outside the traced path: a posterior "
                    "sample could not replace it (use it in a layer, or add/multiply it directly)",
                )
            self.ref[node] = _STATIC  # sizes, numbers
            return
        if node.op == "call_module":
            module = _fetch(self.root, node.target)
            args = self.value(node.args, node)
            xs = [a for a in args if isinstance(a, _X)]
            if len(args) != 1 or len(xs) != 1 or node.kwargs:
                raise self.refuse(node, "calls a layer with other than one tensor argument")
            self.check_inplace(node, xs[0], bool(getattr(module, "inplace", False)))
            self.add(node, module, xs, name=_strip(node.target), is_module=True)
            return
        if (
            node.op == "call_method"
            and node.target in _STATIC_METHODS
            or (node.op == "call_function" and node.target is getattr and node.args[1] in _STATIC_ATTRS)
        ):
            self.ref[node] = _STATIC
            return
        if node.op == "call_function" and node.target is operator.getitem and isinstance(self.ref[node.args[0]], _X):
            raise self.refuse(node, "indexes or slices a traced tensor: not supported")
        if node.op == "call_function" and node.target is operator.getitem:
            self.ref[node] = _STATIC
            return
        self.function(node)

    def function(self, node: fx.Node) -> None:
        t, method = node.target, node.op == "call_method"
        key = t if method else t
        if method and isinstance(t, str) and t.endswith("_") and not t.startswith("_"):
            raise self.refuse(node, "is an in-place operation: not supported (use the out-of-place version)")
        args = self.value(
            node.args, node, strict=not (key in ("view", "reshape", "flatten") or t in _FLAT or t in _RESHAPE_FN)
        )
        kwargs = self.value(node.kwargs, node, strict=False)
        x0 = args[0] if args else None
        act = None
        if (not method and t in _RELU) or key == "relu":
            act = nn.ReLU()
            inplace = bool(kwargs.get("inplace", args[1] if len(args) > 1 else False)) if not method else False
        elif not method and t is F.leaky_relu or key == "leaky_relu":
            b = _bind(args, kwargs, ("input", "negative_slope", "inplace"), {"negative_slope": 0.01, "inplace": False})
            act, inplace = nn.LeakyReLU(float(b["negative_slope"])), bool(b["inplace"])
        elif (not method and t in _TANH) or key == "tanh":
            act, inplace = nn.Tanh(), False
        elif (not method and t in _SIGMOID) or key == "sigmoid":
            act, inplace = nn.Sigmoid(), False
        if act is not None:
            self.check_inplace(node, self.one_x(node, x0), inplace)
            self.add(node, act, [x0])
            return
        if key == "contiguous" and method:
            self.add(node, nn.Identity(), [self.one_x(node, x0)])
            return
        if not method and t is F.dropout:
            b = _bind(
                args, kwargs, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False}
            )
            if b["training"] and b["p"] > 0:
                raise self.refuse(node, f"is dropout in training mode with p={b['p']}: it applies random masks")
            self.add(node, nn.Identity(), [self.one_x(node, b["input"])])
            return
        if (not method and t in _ADD | _SUB) or key in ("add", "sub"):
            self.add_sub(node, args, kwargs, sign=-1 if (t in _SUB or key == "sub") else 1)
            return
        if (not method and t in _MUL) or key == "mul":
            self.mul_div(node, args, kwargs, "mul")
            return
        if (not method and t in _DIV) or key == "div":
            if kwargs.get("rounding_mode") is not None:
                raise self.refuse(node, "rounds its quotient: not supported")
            self.mul_div(node, args, kwargs, "div")
            return
        if (not method and t in (operator.neg, torch.neg)) or key == "neg":
            self.add(node, ConstAffine("mul", -1.0), [self.one_x(node, x0)])
            return
        if (not method and t in _FLAT | _RESHAPE_FN) or key in ("flatten", "view", "reshape"):
            self.add(node, Reshape(self.shape(node)), [self.one_x(node, x0)])
            return
        if not method and t in _CAT:
            b = _bind(args, kwargs, ("tensors", "dim"), {"dim": 0})
            xs = self.tensors_only(node, list(b["tensors"]))
            rank = len(self.shape(node)) + 1
            dim = b["dim"] % rank
            if dim == 0:
                raise self.refuse(node, "concatenates along the batch dim")
            self.add(node, Cat(dim), xs)
            return
        if (not method and t is torch.mean) or key == "mean":
            b = _bind(args, kwargs, ("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
            if b.get("dtype") is not None or b["dim"] is None:
                raise self.refuse(node, "averages over the batch dim (give the feature dims)")
            x = self.one_x(node, b["input"])
            rank = len(self.nodes[x.index].shape if x.index >= 0 else self.probes[0][x.node].shape[1:]) + 1
            dims = (b["dim"],) if isinstance(b["dim"], int) else tuple(b["dim"])
            dims = tuple(d % rank for d in dims)
            if 0 in dims:
                raise self.refuse(node, "averages over the batch dim")
            self.add(node, Mean(dims, bool(b["keepdim"])), [x])
            return
        if not method and t is F.adaptive_avg_pool2d:
            b = _bind(args, kwargs, ("input", "output_size"), {})
            self.add(node, nn.AdaptiveAvgPool2d(b["output_size"]), [self.one_x(node, b["input"])])
            return
        if not method and t in (F.max_pool2d, torch.max_pool2d):
            b = _bind(
                args,
                kwargs,
                ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False},
            )
            if b["return_indices"]:
                raise self.refuse(node, "returns (values, indices)")
            pool = nn.MaxPool2d(b["kernel_size"], b["stride"], b["padding"], b["dilation"], ceil_mode=b["ceil_mode"])
            self.add(node, pool, [self.one_x(node, b["input"])])
            return
        if not method and t is F.avg_pool2d:
            b = _bind(
                args,
                kwargs,
                ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None},
            )
            pool = nn.AvgPool2d(
                b["kernel_size"],
                b["stride"],
                b["padding"],
                b["ceil_mode"],
                b["count_include_pad"],
                b["divisor_override"],
            )
            self.add(node, pool, [self.one_x(node, b["input"])])
            return
        raise self.refuse(
            node,
            "has no bound rule (supported: Linear, Conv2d, activations as modules or functions, "
            "+, -, * and / by constants, flatten/view/reshape, cat, mean, pools, BatchNorm)",
        )

    def one_x(self, node: fx.Node, x: Any) -> _X:
        if not isinstance(x, _X):
            raise self.refuse(node, "is applied to something that is not a traced tensor")
        return x

    def const(self, node: fx.Node, c: Any, x: _X) -> tuple[float | Tensor, bool]:
        """A number, or a model tensor broadcasting over the batch: ``(value, drop_batch)``."""
        if isinstance(c, bool) or not isinstance(c, (int, float, _Const)):
            raise self.refuse(node, f"combines a traced tensor with a {type(c).__name__}: not supported")
        if not isinstance(c, _Const):
            return float(c), False
        if id(c.tensor) not in self.canon:
            raise self.refuse(
                node,
                f"uses the tensor attribute '{c.name}', which is not a parameter or buffer of "
                "the model (register it as a buffer)",
            )
        feat = self.probes[0][x.node].shape[1:]
        t = c.tensor
        if t.dim() > len(feat) + 1 or (t.dim() == len(feat) + 1 and t.shape[0] != 1):
            raise self.refuse(
                node, f"uses '{c.name}' of shape {tuple(t.shape)}, which does not broadcast over the batch"
            )
        try:
            torch.broadcast_shapes(t.shape[1:] if t.dim() == len(feat) + 1 else t.shape, feat)
        except RuntimeError:
            raise self.refuse(
                node, f"uses '{c.name}' of shape {tuple(t.shape)}, which does not broadcast to {tuple(feat)}"
            ) from None
        if torch.broadcast_shapes(t.shape, (1, *feat))[1:] != feat:
            raise self.refuse(node, f"broadcasts '{c.name}' beyond the shape of the tensor it is applied to")
        return t, t.dim() == len(feat) + 1

    def add_sub(self, node: fx.Node, args: tuple, kwargs: dict, sign: int) -> None:
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if kwargs.get("alpha", 1) != 1:
            raise self.refuse(node, "has alpha != 1: not supported")
        if isinstance(a, _X) and isinstance(b, _X):
            if self.probes[0][a.node].shape != self.probes[0][b.node].shape:
                raise self.refuse(
                    node, "adds tensors of different shapes (broadcasting between traced tensors is not supported)"
                )
            self.add(node, Add(sign), [a, b])
            return
        if isinstance(a, _X):
            c, drop = self.const(node, b, a)
            kind = "add" if sign > 0 else "sub"
            self.add(node, ConstAffine(kind, c, drop), [a])
            return
        x = self.one_x(node, b)
        c, drop = self.const(node, a, x)
        self.add(node, ConstAffine("add" if sign > 0 else "rsub", c, drop), [x])

    def mul_div(self, node: fx.Node, args: tuple, kwargs: dict, kind: str) -> None:
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if isinstance(a, _X) and isinstance(b, _X):
            raise self.refuse(
                node,
                f"{'multiplies' if kind == 'mul' else 'divides'} two traced tensors (not a linear map): not supported",
            )
        if isinstance(b, _X):
            if kind == "div":
                raise self.refuse(node, "divides by a traced tensor: not supported")
            a, b = b, a
        x = self.one_x(node, a)
        c, drop = self.const(node, b, x)
        self.add(node, ConstAffine(kind, c, drop), [x])


_STATIC = object()  # marker: a non-tensor value (a size, a number)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError):
        return False


_MODULE_NAMES = {"_operator": "operator", "torch._C._nn": "torch.nn.functional", "torch._C._VariableFunctions": "torch"}


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    if callable(t):
        mod = getattr(t, "__module__", None) or ""
        mod = _MODULE_NAMES.get(mod, mod)
        return f"{mod}.{getattr(t, '__name__', str(t))}" if mod else getattr(t, "__name__", str(t))
    return str(t)


def _prune(nodes: list[NodeSpec], output: int) -> list[NodeSpec]:
    """Keep the ancestors of ``output`` (unused results change nothing); output last; indices renumbered."""
    keep = {output}
    for i in range(output, -1, -1):
        if i in keep:
            keep.update(j for j in nodes[i].inputs if j >= 0)
    order = sorted(keep)
    new = {old: k for k, old in enumerate(order)}
    new[INPUT] = INPUT
    return [
        NodeSpec(
            nodes[i].name,
            nodes[i].module,
            nodes[i].rule,
            tuple(new[j] for j in nodes[i].inputs),
            nodes[i].shape,
            nodes[i].is_module,
        )
        for i in order
    ]


def _probe_input(model: nn.Module, in_shape: tuple[int, ...], batch: int, seed: int) -> Tensor:
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *in_shape), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _check_reproduces(plan: GraphPlan, model: nn.Module, x: Tensor) -> None:
    """The DAG's modules, run in order, must give ``model(x)`` (catches in-place mutations that
    tracing records as out-of-place operations, and any mistranslation)."""
    vals: dict[int, Tensor] = {INPUT: x}
    for i, n in enumerate(plan.nodes):
        vals[i] = n.module(*(vals[j] for j in n.inputs))
    with torch.no_grad():
        ref = model(x.clone())
    got = vals[len(plan.nodes) - 1]
    scale = 1 + float(ref.abs().max()) if ref.numel() else 1.0
    tol = 1e-4 if ref.dtype != torch.float64 else 1e-9
    if got.shape != ref.shape or not bool(((got - ref).abs() <= tol * scale).all()):
        raise UnsupportedLayerError(
            f"model {label('', model)}: the traced graph does not reproduce model(x) "
            "(an in-place update of a tensor that is read again?)"
        )


# Traced plans per model, reused while the model's structure is unchanged (see cached_trace).
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, GraphPlan]] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module, in_shape: tuple[int, ...]) -> tuple:
    """What a traced plan depends on besides Python attributes read by ``forward``: the modules,
    their tensors (objects), training flags, hooks and parametrizations."""
    parts: list[Any] = [tuple(in_shape)]
    for name, m in model.named_modules(remove_duplicate=False):
        parts.append(
            (
                name,
                id(m),
                m.training,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                tuple(id(t) for t in m._parameters.values()),
                tuple(id(t) for t in m._buffers.values()),
                "forward" in m.__dict__,
                "_call_impl" in m.__dict__,
            )
        )
    return tuple(parts)


def cached_trace(model: nn.Module, in_shape: tuple[int, ...]) -> GraphPlan:
    """:func:`trace_graph`, reusing the last plan of ``model`` when its fingerprint is unchanged
    and the plan still reproduces ``model(x)`` on a random probe (which catches changed Python
    attributes that ``forward`` reads); else traced afresh."""
    key = _fingerprint(model, in_shape)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        try:
            with torch.no_grad():
                _check_reproduces(hit[1], model, _probe_input(model, tuple(in_shape), 2, 7))
            return hit[1]
        except (UnsupportedLayerError, RuntimeError):
            pass
    plan = trace_graph(model, in_shape)
    _CACHE[model] = (key, plan)
    return plan


def trace_graph(model: nn.Module, in_shape: tuple[int, ...]) -> GraphPlan:
    """The DAG of ``model`` for inputs ``(B, *in_shape)``; raises :class:`UnsupportedLayerError`
    (one line naming the operation) where it cannot be bounded exactly (module docstring)."""
    graph, root = _fx_graph(model)
    probes = []
    with torch.no_grad():
        for k, batch in enumerate((2, 3)):
            x = _probe_input(model, tuple(in_shape), batch, k)
            try:
                env, _ = _run(graph, root, x.clone())
            except UnsupportedLayerError:
                raise
            except Exception as err:
                raise UnsupportedLayerError(
                    f"model {label('', model)} fails on inputs of shape {(batch, *in_shape)}: {_first_line(err)}"
                ) from None
            probes.append(env)
        plan = _Translator(model, root, graph, probes).run()
        _check_reproduces(plan, model, _probe_input(model, tuple(in_shape), 2, 7))
    return plan


def expected_input_rank(plan: GraphPlan) -> int | None:
    """Feature rank the first rank-fixing op expects (Linear 1, Conv2d/pools 3), if the input
    reaches it through rank-agnostic ops only (as the chain engine's ``_expected_rank``)."""
    for n in plan.nodes:
        if n.rule.input_rank is not None:
            return n.rule.input_rank
        agnostic = issubclass(n.rule, (ElementwiseOp, ChannelAffineOp, BoundIdentity))
        if not (agnostic or isinstance(n.module, (Add, ConstAffine))):
            return None
    return None
