"""Registry mapping ``nn.Module`` types to their bound classes.

Lookup walks the module type's MRO, so subclasses of a registered type use its
rule unless they register their own -- provided they compute the same function:
:func:`certbnn.bounds.structure.model_layers` refuses a subclass that overrides
``forward`` (or another method on the call path). Users extend the engine with::

    @register_bound(MyLayer)
    class BoundMyLayer(BoundOp): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from certbnn.bounds.base import BoundOp
from certbnn.errors import ConfigError

_REGISTRY: dict[type, type[BoundOp]] = {}

B = TypeVar("B", bound="type[BoundOp]")


def register_bound(
    module_type: type[nn.Module], bound_class: type[BoundOp] | None = None
) -> Callable[[B], B] | type[BoundOp]:
    """Register ``bound_class`` as the rule for ``module_type`` (replacing any earlier one).

    Usable directly, ``register_bound(nn.ReLU, BoundReLU)``, or as a class
    decorator, ``@register_bound(nn.ReLU)``.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ConfigError(f"register_bound: {module_type!r} is not an nn.Module subclass")

    def _register(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, BoundOp)):
            raise ConfigError(f"register_bound: {cls!r} is not a BoundOp subclass")
        _REGISTRY[module_type] = cls
        return cls

    if bound_class is None:
        return _register
    return _register(bound_class)


def lookup_rule(module_type: type) -> tuple[type, type[BoundOp]] | None:
    """``(registered_type, bound_class)`` of the nearest registered base in ``module_type``'s MRO, or None."""
    for t in module_type.__mro__:
        if t in _REGISTRY:
            return t, _REGISTRY[t]
    return None


def lookup_bound_class(module_type: type) -> type[BoundOp] | None:
    """The bound class for ``module_type`` (nearest registered base in its MRO), or None."""
    found = lookup_rule(module_type)
    return None if found is None else found[1]


def registered_types() -> dict[type, type[BoundOp]]:
    """A copy of the registry (module type -> bound class)."""
    return dict(_REGISTRY)
