"""Model registry and spec parser. Models are plain ``nn.Sequential`` modules.

Spec grammar (whitespace ignored)::

    spec       := name [":" args] ["@" activation]
    mlp:W1,W2,..   hidden dense widths, comma-separated   mlp:512   mlp:1024,512
    cnn:L1,L2,..   layers left to right:
        <C>c<K>[s<S>][p<P>]   Conv2d, C out-channels, KxK kernel, stride S (1), zero padding P (0)
        p<K>                  MaxPool2d(K) (stride K)
        a<K>                  AvgPool2d(K) (stride K)
        <W>                   dense layer of width W (after all conv/pool layers)
    linear          no hidden layer (multinomial logistic regression)
    mnist-mlp       = mlp:512                 (the paper's MNIST net)
    cifar-small     = cnn:16c4,32c4,p2,100    (the paper's CIFAR-10 net)
    activation     relu (default) | tanh | sigmoid

Every model ends with a dense layer of ``num_classes`` logits, added by the
builder; a ``Flatten`` precedes the first dense layer. Example:
``build_model("cnn:16c4,32c4s2p1,p2,100@tanh", (3, 32, 32), 10)``.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from certbnn.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "build_model",
    "register_model",
    "list_models",
    "describe_model",
    "make_activation",
    "check_model",
    "check_size",
    "model_fingerprint",
    "fingerprint_of_params",
    "fingerprint_difference",
]

#: Factory contract: ``factory(arg, input_shape, num_classes, activation) -> nn.Sequential``
#: where ``arg`` is the text after ``":"`` (None when absent) and ``activation`` is a
#: validated key of :data:`ACTIVATIONS`. Raise ConfigError for a bad ``arg``.
ModelFactory = Callable[[str | None, tuple[int, ...], int, str], nn.Sequential]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

_REGISTRY: dict[str, tuple[ModelFactory, str]] = {}
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_\-]*")
_CONV_RE = re.compile(r"(\d+)c(\d+)(?:s(\d+))?(?:p(\d+))?")
_POOL_RE = re.compile(r"([pa])(\d+)")
_DENSE_RE = re.compile(r"\d+")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for a key of :data:`ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def register_model(name: str, factory: ModelFactory, help: str = "", *, overwrite: bool = False) -> None:
    """Make ``name`` usable in specs. Names are lowercase ``[a-z0-9_-]``; re-registering
    an existing name needs ``overwrite=True``."""
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid model name {name!r}: use lowercase letters, digits, '-' and '_'")
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = (factory, help)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def describe_model(name: str) -> str:
    """The one-line help text a model was registered with."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name][1]


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Build the (freshly, randomly initialised) network described by ``spec``.

    ``input_shape`` excludes the batch dimension, e.g. (1, 28, 28) or (3, 32, 32); the
    model maps (B, *input_shape) to (B, num_classes) logits. The spec is first built on
    the meta device (no memory) and refused when its parameters cannot fit in memory.
    A plug-in spec ``package.module:factory`` imports and runs the user's code
    (:mod:`certbnn.plugins`; any ``nn.Module``).
    """
    if _is_plugin(spec):
        return _plugin(spec, input_shape, num_classes)
    build = _builder(spec, input_shape, num_classes)
    check_size(spec, _build(spec, build, meta=True))
    return _build(spec, build, meta=False)


def check_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> int:
    """The parameter count of ``spec`` without allocating it; ConfigError for a bad spec or one
    whose parameters cannot fit in memory (see :func:`check_size`). A plug-in spec is built
    (running the user's factory) and checked by :func:`certbnn.plugins.build_plugin`."""
    if _is_plugin(spec):
        return sum(p.numel() for p in _plugin(spec, input_shape, num_classes).parameters())
    return check_size(spec, _build(spec, _builder(spec, input_shape, num_classes), meta=True))


def _is_plugin(spec: str) -> bool:
    from certbnn.plugins import is_plugin_spec

    return is_plugin_spec(spec)


def _plugin(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    from certbnn.plugins import build_plugin

    shape = _check_shape(spec, input_shape, num_classes)
    return build_plugin(spec, shape, num_classes)


def _builder(spec: str, input_shape: tuple[int, ...], num_classes: int) -> Callable[[], nn.Module]:
    input_shape = _check_shape(spec, input_shape, num_classes)
    text = "".join(str(spec).split()).lower()
    head, at, activation = text.partition("@")
    activation = activation if at else "relu"
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"model spec {spec!r}: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    name, colon, arg = head.partition(":")
    if name not in _REGISTRY:
        raise ConfigError(f"model spec {spec!r}: unknown model {name!r}; known models: {', '.join(list_models())}")
    return functools.partial(_REGISTRY[name][0], arg if colon else None, input_shape, num_classes, activation)


def _build(spec: str, build: Callable[[], nn.Module], meta: bool) -> nn.Sequential:
    try:
        if meta:
            with torch.device("meta"):
                model = build()
        else:
            model = build()
    except ConfigError as err:
        raise ConfigError(f"model spec {spec!r}: {err}") from None
    except (RuntimeError, OverflowError, ValueError, TypeError, MemoryError) as err:  # e.g. sizes beyond int64
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"model spec {spec!r}: cannot build it ({first})") from None
    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"model spec {spec!r}: factory returned {type(model).__name__}, not nn.Sequential")
    return model


def memory_bytes() -> int | None:
    """Physical memory of this machine in bytes (None when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_size(spec: str, model: nn.Module, limit_bytes: int | None = None) -> int:
    """The parameter count of ``model`` (may live on the meta device); ConfigError when one
    float32 copy of its parameters would not fit in ``limit_bytes`` (default: physical memory)."""
    count = sum(p.numel() for p in model.parameters())
    limit = memory_bytes() if limit_bytes is None else limit_bytes
    if limit is not None and 4 * count > limit:
        raise ConfigError(
            f"model spec {spec!r}: {count:,} parameters need {4 * count / 2**30:,.1f} GiB "
            f"(float32), more than the {limit / 2**30:,.1f} GiB of memory here"
        )
    return count


def _check_shape(spec: str, input_shape: Any, num_classes: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ConfigError(f"model spec {spec!r}: input_shape {input_shape!r} is not a tuple of ints") from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"model spec {spec!r}: input_shape {shape} must be non-empty with positive sizes")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"model spec {spec!r}: num_classes must be an int >= 2, got {num_classes!r}")
    return shape


def _tokens(arg: str | None, what: str) -> list[str]:
    if not arg:
        raise ConfigError(f"{what} needs a comma-separated layer list after ':'")
    tokens = arg.lower().split(",")
    if any(not t for t in tokens):
        raise ConfigError(f"empty layer in {arg!r}")
    return tokens


def _positive(text: str, token: str) -> int:
    value = int(text)
    if value < 1:
        raise ConfigError(f"layer {token!r}: sizes must be >= 1")
    return value


def _dense_stack(features: int, widths: list[int], num_classes: int, activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Flatten()]
    for width in widths:
        layers += [nn.Linear(features, width), make_activation(activation)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return layers


def _mlp(arg: str | None, input_shape: tuple[int, ...], num_classes: int, activation: str) -> nn.Sequential:
    widths = []
    for token in _tokens(arg, "mlp"):
        if not _DENSE_RE.fullmatch(token):
            raise ConfigError(f"mlp layer {token!r} is not a width (use commas: mlp:1024,512)")
        widths.append(_positive(token, token))
    return nn.Sequential(*_dense_stack(math.prod(input_shape), widths, num_classes, activation))


def _linear(arg: str | None, input_shape: tuple[int, ...], num_classes: int, activation: str) -> nn.Sequential:
    if arg is not None:
        raise ConfigError("model 'linear' takes no arguments")
    return nn.Sequential(*_dense_stack(math.prod(input_shape), [], num_classes, activation))


def _cnn(arg: str | None, input_shape: tuple[int, ...], num_classes: int, activation: str) -> nn.Sequential:
    if len(input_shape) != 3:
        raise ConfigError(f"cnn needs input_shape (channels, height, width), got {input_shape}")
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    widths: list[int] = []
    for token in _tokens(arg, "cnn"):
        conv, pool = _CONV_RE.fullmatch(token), _POOL_RE.fullmatch(token)
        if (conv or pool) and widths:
            raise ConfigError(f"layer {token!r} comes after a dense layer; conv/pool layers must come first")
        if conv:
            out, kernel = _positive(conv[1], token), _positive(conv[2], token)
            stride = _positive(conv[3], token) if conv[3] else 1
            padding = int(conv[4]) if conv[4] else 0
            height, width = (_conv_size(n, kernel, stride, padding, token) for n in (height, width))
            layers += [nn.Conv2d(channels, out, kernel, stride=stride, padding=padding), make_activation(activation)]
            channels = out
        elif pool:
            size = _positive(pool[2], token)
            height, width = (_conv_size(n, size, size, 0, token) for n in (height, width))
            layers.append(nn.MaxPool2d(size) if pool[1] == "p" else nn.AvgPool2d(size))
        elif _DENSE_RE.fullmatch(token):
            widths.append(_positive(token, token))
        else:
            raise ConfigError(
                f"cannot parse cnn layer {token!r} "
                "(expected e.g. 16c4, 32c3s2p1, p2 (max pool), a2 (avg pool) or 100 (dense))"
            )
    return nn.Sequential(*layers, *_dense_stack(channels * height * width, widths, num_classes, activation))


def _conv_size(size: int, kernel: int, stride: int, padding: int, token: str) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ConfigError(f"layer {token!r} does not fit its {size}-pixel input")
    return out


def _alias(target_arg: str, factory: ModelFactory, name: str) -> ModelFactory:
    def build(arg: str | None, input_shape: tuple[int, ...], num_classes: int, activation: str) -> nn.Sequential:
        if arg is not None:
            raise ConfigError(f"model {name!r} takes no arguments")
        return factory(target_arg, input_shape, num_classes, activation)

    return build


register_model("mlp", _mlp, "dense net; mlp:W1,W2,... hidden widths, e.g. mlp:512 or mlp:1024,512")
register_model(
    "cnn", _cnn, "conv net; cnn:16c4,32c3s2p1,p2,a2,100 (conv CcK[sS][pP], max pool pK, avg pool aK, dense W)"
)
register_model("linear", _linear, "no hidden layer: Flatten, Linear(d, num_classes)")
register_model("mnist-mlp", _alias("512", _mlp, "mnist-mlp"), "the paper's MNIST net, = mlp:512")
register_model(
    "cifar-small", _alias("16c4,32c4,p2,100", _cnn, "cifar-small"), "the paper's CIFAR-10 net, = cnn:16c4,32c4,p2,100"
)


# --- resnet: a small residual CNN (a general graph for the bound engine, see docs/bounds.md) ---


class ResidualBlock(nn.Module):
    """``act(shortcut(x) + conv2(act(conv1(x))))``, 3x3 convolutions; with ``stride > 1`` or a change
    of width the shortcut is a 1x1 convolution of that stride, else the identity. No BatchNorm, so
    that ``tol="sound"`` certificates (which refuse BatchNorm) work on it."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.act2 = make_activation(activation)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.shortcut(x) + self.conv2(self.act1(self.conv1(x))))


def _resnet(arg: str | None, input_shape: tuple[int, ...], num_classes: int, activation: str) -> nn.Sequential:
    if len(input_shape) != 3:
        raise ConfigError(f"resnet needs input_shape (channels, height, width), got {input_shape}")
    if arg is not None and not _DENSE_RE.fullmatch(arg):
        raise ConfigError(f"resnet takes one width, e.g. resnet:16, got {arg!r}")
    width = _positive(arg, arg) if arg else 16
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, padding=1),
        make_activation(activation),
        ResidualBlock(width, width, 1, activation),
        ResidualBlock(width, 2 * width, 2, activation),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


register_model(
    "resnet",
    _resnet,
    "small residual CNN; resnet:W (default 16): conv W, residual blocks W and 2W "
    "(stride 2), global average pool, dense",
)


# --- fingerprints: which parameter names and shapes an architecture has -------------


def fingerprint_of_params(params: Mapping[str, torch.Tensor], batch_dims: int = 0) -> dict[str, Any]:
    """Fingerprint (JSON-able) of a name -> tensor dict, ignoring ``batch_dims`` leading dims."""
    return {"parameters": [{"name": name, "shape": list(t.shape[batch_dims:])} for name, t in params.items()]}


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """``{"parameters": [{"name", "shape"}, ...]}`` in ``model.named_parameters()`` order."""
    return fingerprint_of_params(dict(model.named_parameters()))


def fingerprint_difference(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str | None:
    """None when both fingerprints hold the same names with the same shapes (order is
    not compared: parameters are matched by name); otherwise a phrase naming the first
    differing parameter, in ``expected`` order."""
    want = {p["name"]: list(p["shape"]) for p in expected.get("parameters", [])}
    have = {p["name"]: list(p["shape"]) for p in actual.get("parameters", [])}
    for name, shape in want.items():
        if name not in have:
            return f"parameter {name!r} is missing"
        if have[name] != shape:
            return f"parameter {name!r} has shape {tuple(have[name])}, expected {tuple(shape)}"
    extra = [name for name in have if name not in want]
    return f"unexpected parameter {extra[0]!r}" if extra else None
