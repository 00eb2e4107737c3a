"""Training checkpoints: method state + RNG state + progress, written atomically at the end of
every epoch, so a killed run always leaves the last complete epoch readable; no pickle anywhere.

A checkpoint is one safetensors file, ``<stem>.safetensors``, plus, for a state with stored
samples (fields made by :func:`~certbnn.inference.base.stored_samples_field`: HMC, SG-HMC), a
folder ``<stem>.items/`` with one file per stored sample. A sample is written once, when it is
first checkpointed; the checkpoint file lists the item files it uses. So an epoch's checkpoint
costs the state plus the samples drawn since the last one, not every sample again (with M
stored samples of P weights, writing them all each epoch made a run's checkpoints cost
O(M^2 P)). Item files no checkpoint uses any more (trimmed by ``max_samples``, or left by a
killed run) are deleted after the checkpoint that stopped using them is in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from certbnn.errors import CertbnnError
from certbnn.fileio import atomic_write_bytes
from certbnn.inference.base import append_only_fields, flatten_state, unflatten_state

FORMAT_VERSION = 2  # 2: stored samples in item files; 1 (all in the one file) is still read
READABLE_VERSIONS = (1, 2)
_ITEM = re.compile(r"(?P<field>[a-z_]+)\.(?P<index>\d{8,})\.safetensors")
_ITEM_TEMP = re.compile(r"\.[a-z_]+\.\d{8,}\.safetensors\.[a-z0-9_]{8}\.tmp")  # atomic_write_bytes's


class CheckpointError(CertbnnError):
    """A checkpoint is missing, corrupt, or from an incompatible run."""


@dataclass
class Checkpoint:
    state: Any  # the method's state dataclass
    rng_state: torch.Tensor  # torch.Generator.get_state() of the training generator
    epoch: int  # number of completed epochs
    step: int  # number of completed steps
    history: list[dict[str, Any]]


def items_dir(path: Path) -> Path:
    """The folder of a checkpoint's item files: ``checkpoint.safetensors`` -> ``checkpoint.items``."""
    return path.with_name(path.name.removesuffix(".safetensors") + ".items")


class CheckpointStore:
    """The checkpoints of one run (or one chain of a multi-chain run) at ``path``.

    ``save`` after every epoch, ``load`` to resume. The store remembers which stored samples it
    has written (by identity: a stored sample is never changed, see
    :func:`~certbnn.inference.base.stored_samples_field`), so each is written once per process;
    a resumed run knows the ones it loaded."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._written: dict[int, tuple[dict, str]] = {}  # id(item) -> (item, file name)
        self._next_index: int | None = None

    def save(self, ckpt: Checkpoint, config: dict[str, Any]) -> None:
        state, item_files = ckpt.state, {}
        stored = append_only_fields(state)
        written: dict[int, tuple[dict, str]] = {}
        if any(getattr(state, name) for name in stored):  # (no folder before the first sample)
            folder = self._items_folder()
            for name in stored:
                item_files[name] = [self._item_file(folder, name, item, written) for item in getattr(state, name)]
        state = dataclasses.replace(state, **{name: [] for name in stored})
        tensors, layout = flatten_state(state)
        tensors = {f"state/{k}": v.cpu() for k, v in tensors.items()}
        tensors["rng"] = ckpt.rng_state.cpu()
        meta = {
            "format_version": FORMAT_VERSION,
            "layout": layout,
            "items": item_files,
            "epoch": ckpt.epoch,
            "step": ckpt.step,
            "history": ckpt.history,
            "config": config,
        }
        data = st_save(tensors, metadata={"certbnn": json.dumps(meta)})
        atomic_write_bytes(self.path, data, "checkpoint", CheckpointError)
        if stored:
            self._written = written
            keep = {file for files in item_files.values() for file in files}
            self._remove_items(lambda file: file not in keep)

    def load(self, state_cls: type, device: torch.device) -> tuple[Checkpoint, dict[str, Any]]:
        """The checkpoint at ``path`` and the run's config."""
        path = self.path
        try:
            data = path.read_bytes()
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["certbnn"])
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no checkpoint to resume from") from None
        except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc})") from None
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise CheckpointError(
                f"{path}: checkpoint format {meta.get('format_version')} is not "
                f"supported (this certbnn reads {', '.join(map(str, READABLE_VERSIONS))})"
            )
        state_tensors = {k[len("state/") :]: v.to(device) for k, v in tensors.items() if k.startswith("state/")}
        state = unflatten_state(state_cls, state_tensors, meta["layout"])
        listed = meta.get("items", {})
        if not isinstance(listed, dict) or not set(listed) <= set(append_only_fields(state)):
            raise CheckpointError(f"{path}: corrupt checkpoint (its item list does not fit a {state_cls.__name__})")
        items = {name: [self._load_item(f, device) for f in files] for name, files in listed.items()}
        if items:
            state = dataclasses.replace(state, **items)
        return Checkpoint(state, tensors["rng"], meta["epoch"], meta["step"], meta["history"]), meta["config"]

    # --- item files ----------------------------------------------------------------------

    def _items_folder(self) -> Path:
        folder = items_dir(self.path)
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            info = None
        if info is not None and not stat.S_ISDIR(info.st_mode):  # a link or a file: never written through
            raise CheckpointError(f"cannot write checkpoint items {folder}: something else is in the way")
        if info is None:
            try:
                folder.mkdir()
            except OSError as err:
                raise CheckpointError(f"cannot write checkpoint items {folder}: {err.strerror or err}") from None
        if self._next_index is None:  # first save of this process: number after what is there
            for entry in os.scandir(folder):  # temporary files of a killed write
                if _ITEM_TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
            self._next_index = 1 + max((int(m["index"]) for m in self._item_names(folder)), default=-1)
        return folder

    def _item_file(self, folder: Path, field: str, item: dict, written: dict) -> str:
        known = self._written.get(id(item))
        if known is not None and known[0] is item:
            file = known[1]
        else:
            file = f"{field}.{self._next_index:08d}.safetensors"
            self._next_index += 1
            tensors = {name: t.detach().contiguous().cpu() for name, t in item.items()}
            atomic_write_bytes(folder / file, st_save(tensors), "checkpoint item", CheckpointError)
        written[id(item)] = (item, file)
        return file

    def _load_item(self, file: str, device: torch.device) -> dict:
        if not isinstance(file, str) or not _ITEM.fullmatch(file):
            raise CheckpointError(f"{self.path}: corrupt checkpoint (item file name {file!r})")
        path = items_dir(self.path) / file
        try:
            if path.is_symlink():
                raise CheckpointError(f"{path}: an item file must not be a link")
            item = {name: t.to(device) for name, t in st_load(path.read_bytes()).items()}
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: corrupt checkpoint (item file {file} is missing)") from None
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: corrupt checkpoint item ({exc})") from None
        self._written[id(item)] = (item, file)
        return item

    @staticmethod
    def _item_names(folder: Path) -> list[re.Match]:
        """The item files in ``folder``; none when it is missing or not a real folder (a link)."""
        if folder.is_symlink():
            return []
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [m for e in entries if (m := _ITEM.fullmatch(e.name)) and e.is_file(follow_symlinks=False)]

    def _remove_items(self, unused) -> None:
        folder = items_dir(self.path)
        for match in self._item_names(folder):
            if unused(match.string):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / match.string)
