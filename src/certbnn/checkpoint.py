"""Training checkpoints: method state + RNG state + progress, one safetensors file.

Written atomically at the end of every epoch, so a killed run always leaves
the last complete epoch readable; no pickle anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from certbnn.errors import CertbnnError
from certbnn.fileio import atomic_write_bytes
from certbnn.inference.base import flatten_state, unflatten_state

FORMAT_VERSION = 1


class CheckpointError(CertbnnError):
    """A checkpoint is missing, corrupt, or from an incompatible run."""


@dataclass
class Checkpoint:
    state: Any  # the method's state dataclass
    rng_state: torch.Tensor  # torch.Generator.get_state() of the training generator
    epoch: int  # number of completed epochs
    step: int  # number of completed steps
    history: list[dict[str, Any]]


def save_checkpoint(path: Path, ckpt: Checkpoint, config: dict[str, Any]) -> None:
    tensors, layout = flatten_state(ckpt.state)
    tensors = {f"state/{k}": v.cpu() for k, v in tensors.items()}
    tensors["rng"] = ckpt.rng_state.cpu()
    meta = {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "epoch": ckpt.epoch,
        "step": ckpt.step,
        "history": ckpt.history,
        "config": config,
    }
    atomic_write_bytes(path, st_save(tensors, metadata={"certbnn": json.dumps(meta)}), "checkpoint", CheckpointError)


def load_checkpoint(path: Path, state_cls: type, device: torch.device) -> tuple[Checkpoint, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; returns it and the run's config."""
    try:
        data = Path(path).read_bytes()
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["certbnn"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint to resume from") from None
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')} is not "
            f"supported (this certbnn reads {FORMAT_VERSION})"
        )
    state_tensors = {k[len("state/") :]: v.to(device) for k, v in tensors.items() if k.startswith("state/")}
    state = unflatten_state(state_cls, state_tensors, meta["layout"])
    return Checkpoint(state, tensors["rng"], meta["epoch"], meta["step"], meta["history"]), meta["config"]
