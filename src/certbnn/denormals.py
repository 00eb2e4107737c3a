"""Subnormal floats on the CPU: flush-to-zero for training steps, IEEE gradual underflow for sound bounds.

Arithmetic on subnormal operands is 10-100x slower on x86 CPUs: a training step whose
gradients underflow (a confident softmax, a robust loss far above the clean one) ran 15x
slower (docs/speed.md, section 1). :func:`flush_denormals` turns flush-to-zero and
denormals-are-zero (FTZ/DAZ) on for its duration and then restores the calling thread's
previous setting; the trainer runs each step inside it. The rigorous bounds (``tol="sound"``,
:mod:`certbnn.bounds.rounding`) assume gradual underflow (e.g. ``down(0)`` is the negative
subnormal, not 0), so :func:`gradual_underflow` forces FTZ/DAZ off for their duration,
whatever the caller set.

``torch.set_flush_denormal`` sets the bits of the CALLING thread only; torch's OpenMP
workers keep theirs (a process that turned FTZ on before its first parallel op has it on
every worker, one that turned it on later only on the main thread). Here the calling
thread's floating-point environment is copied to every thread of the OpenMP pool by one
parallel region of libgomp (the runtime of torch's Linux builds) running libc's
``fesetenv`` on each thread. Where that runtime is not found (the bits then follow the
calling thread only), :func:`gradual_underflow` probes the workers and, if one still
flushes, lets torch compute on the calling thread alone until it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator

import torch

__all__ = ["flush_denormals", "flushes_anywhere", "gradual_underflow", "set_flush_denormal"]

_TINY = torch.finfo(torch.float32).tiny


def _this_thread_flushes() -> bool:
    """Whether the calling thread flushes subnormal results to zero (a one-element op runs on it)."""
    return torch.tensor(_TINY).div(2.0).item() == 0.0


def flushes_anywhere() -> bool:
    """Whether the calling thread or any intra-op worker flushes subnormal results: one op
    large enough to be split over all threads, checked element by element."""
    probe = torch.full((max(1 << 17, 65536 * torch.get_num_threads()),), _TINY).div_(2.0)
    return bool(probe.eq(0.0).any()) or _this_thread_flushes()


@functools.cache
def _pool_setter() -> tuple | None:
    """``(GOMP_parallel, fegetenv, address of fesetenv)`` where ATen's parallel backend is
    torch's libgomp on Linux, else None."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
        torch_lib = os.path.dirname(torch.__file__)
        path = next((p for p in paths if p.startswith(torch_lib)), None) or min(paths, default=None)
        if path is None:
            return None
        gomp = ctypes.CDLL(path)
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        parallel, fegetenv = gomp.GOMP_parallel, libm.fegetenv
        parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        fegetenv.argtypes = [ctypes.c_void_p]
        return parallel, fegetenv, ctypes.cast(libm.fesetenv, ctypes.c_void_p)
    except (OSError, AttributeError):
        return None


def set_flush_denormal(enabled: bool) -> bool:
    """``torch.set_flush_denormal(enabled)`` on the calling thread and every OpenMP worker;
    True when the workers were reached (False: the calling thread only, or no DAZ support)."""
    if not torch.set_flush_denormal(enabled):
        return False
    setter = _pool_setter()
    if setter is None:
        return False
    parallel, fegetenv, fesetenv = setter
    env = ctypes.create_string_buffer(256)  # fenv_t (32 bytes on x86-64 glibc), generously sized
    if fegetenv(env) != 0:
        return False
    parallel(fesetenv, env, torch.get_num_threads(), 0)  # each thread: fesetenv(&env)
    return True


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """FTZ/DAZ ``enabled`` on the calling thread and the OpenMP workers for the duration
    (a no-op on CPUs without DAZ); on exit every thread gets the calling thread's previous
    setting. Yields whether the workers were reached."""
    before = _this_thread_flushes()
    try:
        yield set_flush_denormal(enabled)
    finally:
        set_flush_denormal(before)


@contextlib.contextmanager
def gradual_underflow() -> Iterator[None]:
    """IEEE gradual underflow for the duration on every thread that computes: FTZ/DAZ off
    (the previous setting restored on exit); where a worker could not be reached and still
    flushes, torch runs on the calling thread alone until exit."""
    with flush_denormals(False) as reached:
        if reached or not flushes_anywhere():
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
