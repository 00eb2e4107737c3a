"""Strict JSON for every file certbnn writes: no ``NaN`` / ``Infinity`` tokens.

Python's ``json`` writes non-finite floats as ``NaN`` / ``Infinity``, which strict parsers
(JavaScript, jq, most other languages) reject. :func:`dumps` writes them as ``null``
(a number that is not one) and fails loudly (``ValueError``) on anything it missed.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of dicts / lists / tuples, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite` ``(value)`` with ``allow_nan=False``."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
