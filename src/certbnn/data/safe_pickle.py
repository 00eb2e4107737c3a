"""A restricted unpickler for the CIFAR-10 *python* batches.

Those batches are pickled dicts of bytes, lists and numpy arrays. Unpickling
untrusted data with :mod:`pickle` can run arbitrary code, so this loader only
resolves the handful of globals that rebuilding a numpy array needs; any
other global (``os.system``, ``builtins.eval``, a user class, ...) is refused.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

# (module, name) pairs needed to rebuild plain numpy arrays; numpy 2 renamed
# numpy.core to numpy._core, and pickles may name either.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes written by Python 3 with protocol < 3
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler admitting only plain containers, bytes, str, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding='bytes'``,
    as the CIFAR batches were written by Python 2)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
