"""The one interface every inference method implements.

A method is a frozen dataclass of hyper-parameters (plus the prior and the
training-set size N it needs); its state is a dataclass of tensors returned by
every call, never hidden inside the method (optax/blackjax style)::

    method = make_method("bbb", prior=prior, num_data=60000, lr=1e-3)
    state = method.init(params, generator)                 # params: dict name -> tensor
    for x, y in batches:
        state, info = method.step(state, (x, y), nll, generator)
    state = method.end_epoch(state, epoch)                 # e.g. SWAG snapshots
    posterior = method.posterior(state)                    # GaussianPosterior | SamplePosterior

``nll(params, x, y)`` is the per-example negative log-likelihood (any of
:mod:`certbnn.likelihoods`, at the current eps): shape (B,) for point params,
(S, B) for params with a leading sample dimension S; differentiable in params.
Every method scales it as a proper log-likelihood of N points:
``-log p(D | w) ~= N * mean_batch(nll)``.

Methods with ``full_batch = True`` (HMC) receive the whole training set as
``batch`` at every step (they may evaluate it in chunks).

The state passed to ``step`` is DONATED (as JAX's ``donate_argnums``): the step may update
its tensors in place and return them in the new state, so the caller must not use the old
state (or tensors taken from it) afterwards; copy what must be kept first (checkpoints,
stored samples and posteriors are copies). The fused steps (BBB, SGD, Adam, NoisyAdam, SWAG,
SG-HMC) update their flat buffers in place from the second step on (the first packs the
state from ``init`` into new buffers); HMC and VOGN return new tensors. ``end_epoch`` and
``posterior`` leave the state usable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import Tensor

from certbnn.errors import CertbnnError, ConfigError
from certbnn.posterior import GaussianPosterior, SamplePosterior

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]
NLL = Callable[[Params, Tensor, Tensor], Tensor]
Posterior = GaussianPosterior | SamplePosterior
State = Any  # a dataclass whose fields flatten_state understands


class InferenceMethod(Protocol):
    """What the trainer, the CLI and the distributed layer rely on."""

    name: ClassVar[str]
    full_batch: ClassVar[bool]

    def init(self, params: Params, generator: torch.Generator) -> State: ...

    def step(
        self, state: State, batch: Batch, nll: NLL, generator: torch.Generator
    ) -> tuple[State, dict[str, float]]: ...

    def end_epoch(self, state: State, epoch: int) -> State: ...

    def posterior(self, state: State) -> Posterior: ...


_METHODS: dict[str, type] = {}
M = TypeVar("M", bound=type)


def register_method(cls: M) -> M:
    """Class decorator adding a method to the registry under ``cls.name``."""
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type:
    """The method registered as ``name``; spellings without '-' (``noisyadam``) are accepted."""
    aliases = {key.replace("-", ""): key for key in _METHODS}
    try:
        return _METHODS[aliases.get(name, name)]
    except KeyError:
        raise ConfigError(f"unknown inference method {name!r} (known: {', '.join(method_names())})") from None


def make_method(name: str, **options: Any) -> InferenceMethod:
    """Build a method by name; unknown options are a clear error naming them."""
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        user = sorted(fields - {"prior", "num_data"})  # set by the trainer, not user options
        raise ConfigError(f"method {name!r} has no option(s) {', '.join(unknown)} (options: {', '.join(user)})")
    return cls(**options)


# --- state (de)serialisation, for checkpoints -------------------------------------


APPEND_ONLY = "certbnn_append_only"


def stored_samples_field() -> Any:
    """A state field holding a list of weight sets (``Params``) that only grows at the end and
    is trimmed at the front, and whose items are never changed once in it (HMC, SG-HMC
    samples). Checkpoints write each item once (:class:`~certbnn.checkpoint.CheckpointStore`)."""
    return dataclasses.field(default_factory=list, metadata={APPEND_ONLY: True})


def append_only_fields(state: State) -> list[str]:
    """Names of ``state``'s fields made by :func:`stored_samples_field`."""
    return [f.name for f in dataclasses.fields(state) if f.metadata.get(APPEND_ONLY)]


def flatten_state(state: State) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a state dataclass into named tensors and a JSON-able description.

    Fields may be tensors, dicts of tensors, lists of tensors or of dicts of
    tensors, or JSON scalars (int, float, bool, str, None).
    """
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        layout[f.name] = _flatten_value(value, f.name, tensors)
    return tensors, {"type": type(state).__name__, "fields": layout}


def _flatten_value(value: Any, key: str, out: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        out[key] = value.detach().contiguous()
        return {"kind": "tensor"}
    if isinstance(value, dict):
        for name, tensor in value.items():
            out[f"{key}/{name}"] = tensor.detach().contiguous()
        return {"kind": "dict", "names": list(value)}
    if isinstance(value, (list, tuple)):
        return {"kind": "list", "items": [_flatten_value(v, f"{key}/{i}", out) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"kind": "scalar", "value": value}
    raise CertbnnError(f"state field {key!r} of type {type(value).__name__} cannot be checkpointed")


def _unflatten_value(spec: dict[str, Any], key: str, tensors: dict[str, Tensor]) -> Any:
    kind = spec["kind"]
    if kind == "tensor":
        return tensors[key]
    if kind == "dict":
        return {name: tensors[f"{key}/{name}"] for name in spec["names"]}
    if kind == "list":
        return [_unflatten_value(s, f"{key}/{i}", tensors) for i, s in enumerate(spec["items"])]
    return spec["value"]


def unflatten_state(cls: type, tensors: dict[str, Tensor], layout: dict[str, Any]) -> State:
    """Inverse of :func:`flatten_state` for a state of class ``cls``."""
    if layout.get("type") != cls.__name__:
        raise CertbnnError(f"checkpoint holds a {layout.get('type')} state, expected {cls.__name__}")
    try:
        values = {name: _unflatten_value(spec, name, tensors) for name, spec in layout["fields"].items()}
        return cls(**values)
    except (KeyError, TypeError) as exc:
        raise CertbnnError(f"checkpoint state does not match {cls.__name__} ({exc})") from None


# --- small helpers shared by the methods ---------------------------------------------


def grad_of(loss: Tensor, params: Params) -> Params:
    """d loss / d params as a dict (zeros for parameters the loss does not use)."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}


def requires_grad(params: Params) -> Params:
    """Detached copies of ``params`` that require grad (leaves for one step)."""
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}
