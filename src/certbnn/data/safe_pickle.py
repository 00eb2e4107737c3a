"""A restricted unpickler for the CIFAR-10 *python* batches.

Those batches are pickled dicts of bytes, lists and numpy arrays. Unpickling
untrusted data with :mod:`pickle` can run arbitrary code, so this loader only
resolves the handful of globals that rebuilding a numpy array needs; any
other global (``os.system``, ``builtins.eval``, a user class, ...) is refused.

Sizes are bounded too: numpy's own ``_reconstruct`` allocates whatever shape
the pickle names (a 2**50-element array is one short opcode), so it is
replaced by :class:`_ArrayBuilder`, which allocates nothing and builds the
array only from ``__setstate__`` data already in the pickle, after checking
that shape x itemsize equals the bytes given and that the dtype is a plain
number type (no objects, no structured dtypes).
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import numpy as np

_RECONSTRUCT = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")})
# (module, name) pairs needed to rebuild plain numpy arrays; numpy 2 renamed
# numpy.core to numpy._core, and pickles may name either.
_FROMBUFFER = frozenset(
    {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
)  # pickle protocol 5
_ALLOWED_GLOBALS = (
    _RECONSTRUCT
    | _FROMBUFFER
    | frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes written by Python 3 with protocol < 3
        }
    )
)
_NUMBER_KINDS = frozenset("biufc")
#: Most dimensions an unpickled array may have.
MAX_NDIM = 32


class _ArrayBuilder:
    """Stands in for ``numpy.core.multiarray._reconstruct(ndarray, shape, dtype)``;
    :meth:`__setstate__` (pickle's BUILD) receives ndarray's state tuple and checks it."""

    def __init__(self, cls: Any, *_ignored: Any) -> None:
        if cls is not np.ndarray:
            raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r} (only numpy.ndarray)")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _checked_array(raw, dtype, shape, fortran)


def _checked_frombuffer(raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Stands in for numpy's protocol-5 ``_frombuffer(buf, dtype, shape, order)``."""
    return _checked_array(raw, dtype, shape, order == "F")


def _checked_array(raw: Any, dtype: Any, shape: Any, fortran: Any) -> np.ndarray:
    """A copy of ``raw`` as an array, once dtype, shape and byte count are checked."""
    if (
        not isinstance(dtype, np.dtype)
        or dtype.kind not in _NUMBER_KINDS
        or dtype.hasobject
        or dtype.fields is not None
        or dtype.subdtype is not None
    ):
        raise pickle.UnpicklingError(f"refusing numpy dtype {dtype!r:.80} (plain numbers only)")
    if isinstance(shape, list):
        shape = tuple(shape)
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise pickle.UnpicklingError(f"malformed numpy array shape {shape!r:.80}")
    if isinstance(raw, pickle.PickleBuffer):
        raw = bytes(raw)
    if not isinstance(raw, (bytes, bytearray)):
        raise pickle.UnpicklingError("numpy array data must be bytes")
    need = math.prod(shape) * dtype.itemsize
    if need != len(raw):
        raise pickle.UnpicklingError(
            f"numpy array of shape {shape!r:.80} and dtype {dtype} needs {need} bytes, the pickle holds {len(raw)}"
        )
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler admitting only plain containers, bytes, str, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECONSTRUCT:
            return _ArrayBuilder
        if (module, name) in _FROMBUFFER:
            return _checked_frombuffer
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _finish(value: Any) -> Any:
    """Swap every :class:`_ArrayBuilder` for its array, inside dicts and lists too (iteratively,
    in place, so deep nesting cannot overflow the stack)."""

    def swap(v: Any) -> Any:
        if isinstance(v, _ArrayBuilder):
            if v.array is None:
                raise pickle.UnpicklingError("numpy array without data")
            return v.array
        return v

    value = swap(value)
    stack, seen = [value], set()
    while stack:
        container = stack.pop()
        if id(container) in seen:
            continue
        seen.add(id(container))
        if isinstance(container, dict):
            for key, item in container.items():
                container[key] = swap(item)
                stack.append(container[key])
        elif isinstance(container, list):
            for i, item in enumerate(container):
                container[i] = swap(item)
                stack.append(container[i])
    return value


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding='bytes'``,
    as the CIFAR batches were written by Python 2). Raises ``pickle.UnpicklingError``
    for a refused global, dtype or an array whose shape does not match its bytes."""
    return _finish(RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load())
