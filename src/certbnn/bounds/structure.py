"""Which network the engine bounds: the layer chain that ``model(x)`` actually runs.

The engine bounds a model only where it can tell exactly what ``model(x)``
computes: a chain of layers with registered bound rules, called in the order
``nn.Sequential.forward`` calls them. :func:`model_layers` walks the model as
``Sequential.forward`` does -- ``_modules`` in insertion order, so a module
instance used twice is a layer twice -- and raises
:class:`~certbnn.errors.UnsupportedLayerError` (one line naming the module by
its qualified name and type, and the reason) on anything whose call could
compute something else:

* a module without a rule that is not an ``nn.Sequential`` (custom ``forward``:
  functional ops, residual sums, branches), or a ``None`` child;
* a subclass of a registered type, or of ``nn.Sequential``, that overrides
  ``forward`` (or a method its base's ``forward`` relies on) without registering
  a rule of its own; an instance whose ``forward`` was replaced;
* forward hooks and pre-hooks (the module's own or global ones),
  parametrizations, uninitialised lazy modules, a container that contains itself;
* configurations the built-in rules do not implement exactly: Dropout in
  training mode with ``p > 0``, BatchNorm in training mode or without running
  statistics, ``MaxPool2d(return_indices=True)``, ``nn.Flatten`` with a
  ``start_dim`` that is 0 or negative (it can reach the batch dimension).

Backward hooks are allowed (they do not change forward values), and so is
``inplace=True`` on activations (in a chain it changes no layer's output).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from certbnn.bounds.registry import lookup_rule
from certbnn.errors import UnsupportedLayerError

if TYPE_CHECKING:
    from certbnn.bounds.base import BoundOp

Layer = tuple[str, nn.Module, "type[BoundOp]"]

# Methods through which ``module(x)`` reaches ``forward``: overriding any of them
# (in any class, torch's own included) changes what the module computes.
_CALL_PATH = ("forward", "__call__", "_call_impl", "_wrapped_call_impl")
# Further methods that a base type's ``forward`` relies on; a user-defined subclass
# overriding one of them also changes the function (torch's own subclasses, e.g.
# BatchNorm1d's ``_check_input_dim``, are part of the rule's contract).
_HELPERS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.Module, ("__getattr__", "__getattribute__")),
    (nn.Sequential, ("__iter__",)),
    (nn.modules.conv._ConvNd, ("_conv_forward",)),
    (nn.modules.batchnorm._NormBase, ("_check_input_dim",)),
)


def label(name: str, module: nn.Module) -> str:
    """``'2.1' (Linear)``; the root is ``<model> (Net)``."""
    return f"'{name}' ({type(module).__name__})" if name else f"<model> ({type(module).__name__})"


def _refuse(name: str, module: nn.Module, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"layer {label(name, module)} {why}")


def _patched(module: nn.Module, base: type) -> str | None:
    """A call-path method replaced on the instance (``module.forward = ...``), or None."""
    helpers = tuple(n for t, names in _HELPERS if issubclass(base, t) for n in names)
    for name in ("forward", "_call_impl", *helpers):  # looked up on the instance first
        if name in module.__dict__:
            return (
                f"has an instance attribute '{name}' replacing {base.__name__}.{name}: "
                "the engine cannot see what it computes"
            )
    return None


def _override(module: nn.Module, base: type) -> str | None:
    """A call-path method overridden between ``type(module)`` and ``base`` in the MRO, or None."""
    helpers = tuple(n for t, names in _HELPERS if issubclass(base, t) for n in names)
    for cls in type(module).__mro__:
        if cls is base:
            break
        user_class = not cls.__module__.startswith("torch.")
        for name in _CALL_PATH + helpers if user_class else _CALL_PATH:
            if name in cls.__dict__:
                return f"overrides {name} ({cls.__qualname__}.{name}) of {base.__name__}"
    return None


def _call_extras(module: nn.Module) -> str | None:
    """Hooks / parametrizations / lazy state that make ``module(x)`` differ from its plain forward."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "is a lazy module with uninitialised parameters; run the model on one input first"
    if module._forward_pre_hooks:
        return "has a forward pre-hook (it can change the layer's input)"
    if module._forward_hooks:
        return "has a forward hook (it can change the layer's output)"
    if parametrize.is_parametrized(module):
        return "has parametrizations (torch.nn.utils.parametrize): its tensors are computed at call time"
    return None


def _config(module: nn.Module) -> str | None:
    """Configurations of torch layers that the built-in rules do not implement."""
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
        return f"is in training mode with p={module.p}: its forward applies random masks; call model.eval()"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training:
            return "is in training mode: it normalises with batch statistics; call model.eval()"
        if module.running_mean is None or module.running_var is None:
            return "has no running statistics (track_running_stats=False): it normalises with batch statistics"
    if isinstance(module, nn.MaxPool2d) and module.return_indices:
        return "has return_indices=True: its forward returns (values, indices)"
    if isinstance(module, nn.Flatten) and module.start_dim <= 0:
        return f"has start_dim={module.start_dim}: it can merge the batch dimension; use start_dim >= 1"
    return None


def check_global_hooks(model: nn.Module) -> None:
    """Refuse while global forward (pre-)hooks are registered: they can change every layer's output."""
    mod = torch.nn.modules.module
    for attr, register in (
        ("_global_forward_pre_hooks", "register_module_forward_pre_hook"),
        ("_global_forward_hooks", "register_module_forward_hook"),
    ):
        if getattr(mod, attr, None):
            raise _refuse(
                "",
                model,
                f"runs under global forward hooks (torch.nn.modules.module.{register}) that can "
                "change every layer's output; remove them to compute bounds",
            )


def leaf_rule(name: str, module: nn.Module) -> type[BoundOp] | None:
    """The bound class of a module the engine treats as one layer, after the checks of the
    module docstring (hooks, parametrizations, replaced or overridden call-path methods,
    unsupported configurations), which raise :class:`UnsupportedLayerError`; None when no
    rule is registered for its type (a container, or custom code)."""
    found = lookup_rule(type(module))
    why = _call_extras(module) or _patched(module, found[0] if found else type(module))
    if why:
        raise _refuse(name, module, why)
    if found is None:
        return None
    base, rule = found
    why = _override(module, base)
    if why:
        raise _refuse(
            name,
            module,
            f"{why}, so the {base.__name__} bound rule would bound another function; "
            f"register a rule for {type(module).__name__} with certbnn.bounds.register_bound",
        )
    if rule.__module__.startswith("certbnn.bounds."):
        why = _config(module)
        if why:
            raise _refuse(name, module, why)
    if module._modules:  # children a user rule may call
        for sub_name, sub in module.named_modules(prefix=name):
            if sub is not module and (sub._forward_hooks or sub._forward_pre_hooks):
                raise _refuse(sub_name, sub, "has a forward hook or pre-hook")
    return rule


def check_traced_module(name: str, module: nn.Module) -> None:
    """Checks for a module whose ``forward`` the graph tracer follows (it records the code, not
    hooks or parametrizations): refuse hooks, parametrizations, uninitialised lazy modules."""
    why = _call_extras(module)
    if why:
        raise _refuse(name, module, why)


def is_chain(model: nn.Module) -> bool:
    """True if ``model`` is a registered layer or an ``nn.Sequential`` (nested, subclasses that
    keep its call path, not patched on the instance) whose leaves have rules: the flat path
    (:func:`model_layers`) handles it, with its own refusals. False when some module runs
    custom ``forward`` code (the graph path traces it)."""
    seen: set[int] = set()

    def chain(m: nn.Module | None) -> bool:
        if m is None or lookup_rule(type(m)) is not None:
            return True
        if not isinstance(m, nn.Sequential) or _override(m, nn.Sequential) or _patched(m, nn.Sequential):
            return False
        if id(m) in seen:
            return True  # model_layers refuses a container that contains itself
        seen.add(id(m))
        return all(chain(c) for c in m._modules.values())

    return chain(model)


def _walk(module: nn.Module | None, name: str, out: list[Layer], ancestors: set[int]) -> None:
    if module is None:
        raise UnsupportedLayerError(f"layer '{name}' is None: Sequential.forward would call None")
    rule = leaf_rule(name, module)
    if rule is not None:
        out.append((name, module, rule))
        return
    if isinstance(module, nn.Sequential):
        why = _override(module, nn.Sequential)
        if why:
            raise _refuse(
                name,
                module,
                f"is an nn.Sequential subclass that {why}: the engine bounds only plain "
                "layer chains (register a rule for it with certbnn.bounds.register_bound)",
            )
        if id(module) in ancestors:
            raise _refuse(name, module, "contains itself: its forward never terminates")
        ancestors.add(id(module))
        for key, child in module._modules.items():
            _walk(child, f"{name}.{key}" if name else key, out, ancestors)
        ancestors.discard(id(module))
        return
    raise _refuse(
        name,
        module,
        "has no bound rule and is not an nn.Sequential: the engine cannot follow a custom "
        "forward (register a rule with certbnn.bounds.register_bound)",
    )


def model_layers(model: nn.Module) -> list[Layer]:
    """``(qualified_name, module, bound_class)`` of every layer ``model(x)`` runs, in call order.

    Names are the module paths of ``model.named_modules(remove_duplicate=False)``
    (``"0"``, ``"2.1"``; ``""`` for a model that is itself a layer); a shared
    instance appears once per use. Raises :class:`UnsupportedLayerError` where
    the engine would bound a different function than ``model(x)`` (module docstring).
    """
    check_global_hooks(model)
    out: list[Layer] = []
    _walk(model, "", out, set())
    return out
