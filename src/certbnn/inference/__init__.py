"""Approximate inference methods, one interface (see :mod:`certbnn.inference.base`).

Registered names: ``sgd``, ``adam`` (point estimates), ``bbb`` (Bayes by
Backprop), ``noisy-adam``, ``vogn``, ``swag``, ``hmc``, ``sghmc``. Build one with
:func:`make_method`.
"""

from certbnn.inference import bbb, hmc, noisy_adam, sgd, sghmc, swag, vogn  # noqa: F401  (registration)
from certbnn.inference.base import (
    NLL,
    InferenceMethod,
    Params,
    flatten_state,
    make_method,
    method_class,
    method_names,
    register_method,
    unflatten_state,
)

__all__ = [
    "NLL",
    "InferenceMethod",
    "Params",
    "flatten_state",
    "make_method",
    "method_class",
    "method_names",
    "register_method",
    "unflatten_state",
]
