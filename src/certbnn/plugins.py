"""User model factories: ``--model package.module:factory`` imports and runs the user's code.

A plug-in spec is ``module.path:attribute`` (Python names, dots allowed on both sides)
whose part before ``:`` is not a registered model name (``mlp:512``, ``cnn:16c4,...`` stay
registry specs). The module is imported from ``sys.path`` and the current directory; this
executes its code, exactly as ``python -c "import module.path"`` would. Nothing else in
certbnn imports user code.

Factory contract: ``factory()`` when it takes no arguments, else
``factory(input_shape, num_classes)`` (positionally, or as keywords when its parameters
have those names), where ``input_shape`` is one example's shape without the batch
dimension, e.g. ``(1, 28, 28)`` or ``(D,)``, and ``num_classes`` an int. It must return a
freshly initialised ``nn.Module`` with float parameters whose ``forward`` maps a
``(B, *input_shape)`` float batch in [0, 1] to ``(B, num_classes)`` logits; the prior needs
every parameter to belong to an ``nn.Linear`` or ``nn.ConvNd``. The training seed is set
before the factory is called, so its initialisation is reproducible. Every failure (spec
syntax, import, attribute, factory error, wrong output) is one :class:`ConfigError` line.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from certbnn.errors import CertbnnError, ConfigError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
PLUGIN_RE = re.compile(rf"({_NAME}(?:\.{_NAME})*):({_NAME}(?:\.{_NAME})*)")
PROBE_BATCH = 2


def is_plugin_spec(spec: str) -> bool:
    """True when ``spec`` is meant as ``module:factory``: it has a ``:`` and the text before
    it is not a registered model name (checked for syntax by :func:`parse_plugin_spec`)."""
    from certbnn.models import list_models

    head, colon, _ = str(spec).partition(":")
    return bool(colon) and "".join(head.split()).lower() not in list_models()


def parse_plugin_spec(spec: str) -> tuple[str, str]:
    """``(module path, attribute path)`` of ``module.path:factory``; ConfigError otherwise."""
    match = PLUGIN_RE.fullmatch(str(spec).strip())
    if match is None:
        from certbnn.models import list_models

        raise ConfigError(
            f"model spec {spec!r}: neither a registered model ({', '.join(list_models())}) nor a "
            "plug-in package.module:factory (Python names, e.g. mypkg.nets:make_net)"
        )
    return match[1], match[2]


def _import(module_name: str, spec: str):
    """Import ``module_name`` with the current directory on ``sys.path`` for the call."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        parts = module_name.split(".")
        if exc.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise ConfigError(
                f"model plug-in {spec!r}: cannot import module {module_name!r} ({exc}); run certbnn "
                "from the folder that holds it or add that folder to PYTHONPATH"
            ) from None
        raise ConfigError(f"model plug-in {spec!r}: importing {module_name!r} failed: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001  (the user's module raised while imported, SyntaxError included)
        raise ConfigError(f"model plug-in {spec!r}: importing {module_name!r} raised {_first_line(exc)}") from None
    finally:
        if added:
            sys.path.remove(cwd)


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``module.path:factory`` (imports the module; runs its code)."""
    module_name, attribute = parse_plugin_spec(spec)
    target: Any = _import(module_name, spec)
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"model plug-in {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"model plug-in {spec!r}: {attribute} is a {type(target).__name__}, not callable")
    return target


def _call(factory: Callable[..., Any], spec: str, input_shape: tuple[int, ...], num_classes: int) -> Any:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: try the documented forms in order
        signature = None
    kwargs = {"input_shape": input_shape, "num_classes": num_classes}
    if signature is not None:
        names = set(signature.parameters)
        if names & set(kwargs):
            chosen: tuple[tuple, dict] = ((), {k: v for k, v in kwargs.items() if k in names})
        elif _binds(signature):
            chosen = ((), {})
        elif _binds(signature, input_shape, num_classes):
            chosen = ((input_shape, num_classes), {})
        else:
            raise ConfigError(
                f"model plug-in {spec!r}: the factory must take no arguments or "
                f"(input_shape, num_classes); its signature is {signature}"
            )
    else:
        chosen = ((), {})
    try:
        return factory(*chosen[0], **chosen[1])
    except ConfigError as exc:
        raise ConfigError(f"model plug-in {spec!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (user code may raise anything)
        raise ConfigError(f"model plug-in {spec!r}: the factory raised {_first_line(exc)}") from None


def _binds(signature: inspect.Signature, *args: Any) -> bool:
    try:
        signature.bind(*args)
        return True
    except TypeError:
        return False


def build_plugin(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Import, call and check the factory of ``spec`` (see the module doc); the module it
    returns, in training mode. Checks: an ``nn.Module`` with float parameters, each covered
    by the prior's fan-in rule, whose forward maps a (2, *input_shape) batch to (2, num_classes)."""
    from certbnn.priors import prior_from_model

    shape = tuple(int(d) for d in input_shape)
    model = _call(load_factory(spec), spec, shape, num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model plug-in {spec!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    params = list(model.parameters())
    if not params:
        raise ConfigError(f"model plug-in {spec!r}: the module has no parameters (nothing to learn)")
    odd = next(((n, p.dtype) for n, p in model.named_parameters() if not p.dtype.is_floating_point), None)
    if odd is not None:
        raise ConfigError(f"model plug-in {spec!r}: parameter {odd[0]!r} has dtype {odd[1]}, not a float")
    try:
        prior_from_model(model)
    except ConfigError as exc:
        raise ConfigError(
            f"model plug-in {spec!r}: {exc} (certbnn's prior needs every parameter inside an nn.Linear or nn.ConvNd)"
        ) from None
    probe = torch.rand((PROBE_BATCH, *shape), generator=torch.Generator().manual_seed(0)).to(params[0])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:  # noqa: BLE001  (user code may raise anything)
        raise ConfigError(
            f"model plug-in {spec!r}: forward of a {tuple(probe.shape)} batch raised {_first_line(exc)}"
        ) from None
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (PROBE_BATCH, num_classes):
        raise ConfigError(
            f"model plug-in {spec!r}: forward maps a {tuple(probe.shape)} batch to {got}, expected "
            f"({PROBE_BATCH}, {num_classes}) logits"
        )
    return model


def check_bounds(spec: str, model: nn.Module, input_shape: tuple[int, ...], method: str) -> None:
    """Refuse (one line) a plug-in the bound engine cannot follow, before any training: bounds
    ``method`` of the model on a small box around a probe batch."""
    from certbnn.bounds import compute_bounds

    probe = torch.rand((PROBE_BATCH, *input_shape), generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(model.parameters()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            compute_bounds(model, (probe - 0.01).clamp(0, 1), (probe + 0.01).clamp(0, 1), method)
    except CertbnnError as exc:
        raise type(exc)(f"model plug-in {spec!r}: the bound engine cannot bound it ({exc})") from None
    except Exception as exc:  # noqa: BLE001  (tracing runs the user's forward, which may raise anything)
        raise ConfigError(f"model plug-in {spec!r}: the bound engine cannot bound it ({_first_line(exc)})") from None
    finally:
        model.train(was_training)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
