"""Multi-process runs on ``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPU).

certbnn shards *work*, never state: every rank holds the same posterior / method
state and the same random generator, and

* minibatch methods: each rank takes a contiguous 1/N slice of every global batch
  (the batch order is the single-process order); parameter gradients are averaged
  across ranks inside the likelihood (:func:`average_grads`, an identity whose
  backward all-reduces), so N processes with global batch B take the same steps as
  one process with batch B, up to float reduction order. VOGN all-reduces its
  per-example gradient statistics; full-batch HMC sums its potential over data
  shards.
* weight noise: all ranks draw it from identically seeded generators, so every
  rank perturbs the weights identically (the noise is not sharded). Draws whose
  shape follows the shard (the random start of PGD training) are taken per shard:
  the same number on every rank, but not the numbers a single process draws.
* evaluation: chunks of test points are dealt round-robin to ranks, each chunk
  with its own generator seeded by (seed, chunk), and gathered on rank 0, so
  results are identical for any number of processes.

Rank 0 writes every file and shows progress; the others stay quiet. Collectives
time out after ``CERTBNN_DIST_TIMEOUT`` seconds (default 1800), so a dead rank
makes the others fail with an error instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from certbnn.errors import CertbnnError, ConfigError

TIMEOUT_ENV = "CERTBNN_DIST_TIMEOUT"


@dataclass(frozen=True)
class Communicator:
    """This process's place in a process group: ``rank`` of ``world_size``."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batch_shard(self, global_size: int) -> slice:
        """This rank's contiguous slice of a global batch (sizes must divide evenly)."""
        if global_size % self.world_size:
            raise ConfigError(f"batch size {global_size} is not divisible by the {self.world_size} processes")
        size = global_size // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def data_shard(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (sizes differ by at most one)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (or mean) of ``tensor`` over ranks, returned as a new tensor."""
        out = tensor.detach().clone()
        _collective(dist.all_reduce, out)
        return out / self.world_size if op == "mean" else out

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        _collective(dist.all_gather_object, out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        _collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        _collective(dist.barrier)


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as exc:  # a peer died or timed out
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CertbnnError(f"distributed run failed: another process died or timed out ({first[:200]})") from None


_CURRENT: Communicator | None = None


def current() -> Communicator | None:
    """The communicator of this process, or None in a single-process run."""
    return _CURRENT


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str = "cpu") -> Communicator | None:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); NCCL for CUDA devices, gloo otherwise. None when not
    launched with several processes. Idempotent."""
    global _CURRENT
    if _CURRENT is not None or not launched_by_torchrun():
        return _CURRENT
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, "1800"))
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds") from None
    backend = "nccl" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    _CURRENT = Communicator(dist.get_rank(), dist.get_world_size())
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None


def use(comm: Communicator | None) -> None:
    """Set the communicator (tests, or callers that created their own process group)."""
    global _CURRENT
    _CURRENT = comm


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


class _AverageGrad(torch.autograd.Function):
    """Identity forward; backward averages the incoming gradient over ranks."""

    @staticmethod
    def forward(ctx, tensor: Tensor, comm: Communicator) -> Tensor:  # type: ignore[override]
        ctx.comm = comm
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return ctx.comm.all_reduce(grad.contiguous(), "mean"), None


def average_grads(params: dict[str, Tensor], comm: Communicator | None) -> dict[str, Tensor]:
    """``params`` unchanged in value; gradients flowing back through them are averaged over ranks.

    The tensors are viewed as one flat vector, so a backward pass makes a single
    all-reduce (one bucket, like DDP's) whatever the number of weight tensors.
    Every rank must differentiate through the result the same number of times
    (one minibatch step each), or the collectives do not match.
    """
    if comm is None or comm.world_size == 1:
        return params
    names = list(params)
    tensors = [params[n] for n in names]
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return {name: _AverageGrad.apply(tensor, comm) for name, tensor in params.items()}
    flat = _AverageGrad.apply(torch.cat([t.reshape(-1) for t in tensors]), comm)
    pieces = flat.split([t.numel() for t in tensors])
    return {n: piece.view_as(t) for n, piece, t in zip(names, pieces, tensors)}
