"""Saving and loading posteriors without pickle: one safetensors file.

Layout. Tensors ``mean/<name>`` and ``std/<name>`` (kind "gaussian") or
``samples/<name>`` and optional ``weights`` (kind "samples"), stored on CPU in
their own dtype. The safetensors header metadata holds one key, ``"certbnn"``,
whose value is a JSON object with

- ``format_version`` (int, :data:`FORMAT_VERSION`), ``kind``, ``certbnn_version``;
- ``architecture``: ``{"spec": model spec str or null, "fingerprint": {...}}``
  (see :func:`certbnn.models.model_fingerprint`); the fingerprint lists the
  parameters in the posterior's order;
- any free-form JSON fields given by the caller (dataset, method, eps, metrics, ...);
- optionally ``sample_eps`` (samplers: the training radius each stored sample was drawn
  at, one number or null per sample, checked against M on save and load) and
  ``snapshot_eps`` (SWAG: the radius before each snapshot). Both are optional fields of
  format version 1: older files lack them and older readers ignore them, so the version
  is unchanged.

Writes are atomic: a temporary file in the same directory is fsynced and then
renamed over ``path``, so an existing file survives any failure.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from certbnn import __version__
from certbnn.errors import CertbnnError, ConfigError
from certbnn.fileio import atomic_write_bytes
from certbnn.models import fingerprint_difference, fingerprint_of_params, model_fingerprint
from certbnn.posterior.gaussian import GaussianPosterior
from certbnn.posterior.samples import SamplePosterior
from certbnn.safe_open import read_regular

__all__ = ["FORMAT_VERSION", "PosteriorFileError", "save_posterior", "load_posterior"]

FORMAT_VERSION = 1
_META_KEY = "certbnn"
_RESERVED = ("format_version", "kind", "certbnn_version", "architecture")
#: Limits on the certbnn JSON metadata read back (checked before parsing).
MAX_METADATA_BYTES = 64 << 20
MAX_METADATA_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]")

#: Either posterior kind; both expose ``kind``, ``names``, ``sample``, ``mean`` and ``to``.
Posterior = GaussianPosterior | SamplePosterior


class PosteriorFileError(CertbnnError):
    """A posterior file is missing, unreadable, corrupt, from a newer format, or holds bad values."""


def save_posterior(
    path: str | os.PathLike,
    posterior: Posterior,
    metadata: Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
    model_spec: str | None = None,
) -> None:
    """Write ``posterior`` and ``metadata`` (JSON-able; reserved keys are overwritten)
    to ``path`` atomically. With ``model``, its fingerprint is stored and must match the
    posterior; ``model_spec`` (or ``metadata["architecture"]["spec"]``) records the spec."""
    path = Path(path)
    tensors = _tensors_of(posterior, path)
    fingerprint = fingerprint_of_params(_param_tensors(posterior), batch_dims=int(posterior.kind == "samples"))
    if model is not None:
        difference = fingerprint_difference(model_fingerprint(model), fingerprint)
        if difference:
            raise ConfigError(f"cannot save {path}: posterior does not match the model: {difference}")
    header = {k: v for k, v in (metadata or {}).items() if k not in _RESERVED}
    problem = _eps_record_problem(header, posterior)
    if problem:
        raise ConfigError(f"cannot save {path}: {problem}")
    if model_spec is None:
        arch = (metadata or {}).get("architecture")
        model_spec = arch.get("spec") if isinstance(arch, Mapping) else None
    header.update(
        format_version=FORMAT_VERSION,
        kind=posterior.kind,
        certbnn_version=__version__,
        architecture={"spec": model_spec, "fingerprint": fingerprint},
    )
    try:
        text = json.dumps(header, default=_json_default)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot save {path}: metadata is not JSON-serializable: {err}") from None
    data = _st_save(tensors, metadata={_META_KEY: text})
    _atomic_write(path, data)


def load_posterior(
    path: str | os.PathLike, expected_fingerprint: Mapping[str, Any] | nn.Module | None = None
) -> tuple[Posterior, dict[str, Any]]:
    """Read a file written by :func:`save_posterior`: ``(posterior, metadata)``, tensors on CPU.

    Raises PosteriorFileError (naming the file) for a missing/corrupt/truncated file, a
    newer ``format_version`` or non-finite values; ConfigError when the stored
    architecture differs from ``expected_fingerprint`` (a fingerprint dict or a model).
    """
    path = Path(path)
    data = read_regular(path, "posterior file", PosteriorFileError)
    try:
        tensors = _st_load(data)
    except Exception as err:  # safetensors raises its own (Rust) error types
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise PosteriorFileError(
            f"{path} is not a valid posterior file (corrupt or truncated?): {first_line}"
        ) from None
    meta = _read_metadata(path, data)
    posterior = _rebuild(path, meta, tensors)
    problem = _eps_record_problem(meta, posterior)
    if problem:
        raise PosteriorFileError(f"{path}: {problem}")
    if expected_fingerprint is not None:
        expected = (
            model_fingerprint(expected_fingerprint)
            if isinstance(expected_fingerprint, nn.Module)
            else expected_fingerprint
        )
        difference = fingerprint_difference(expected, meta["architecture"]["fingerprint"])
        if difference:
            raise ConfigError(f"posterior file {path} does not match the model architecture: {difference}")
    return posterior, meta


def _eps_record_problem(meta: Mapping[str, Any], posterior: Posterior) -> str | None:
    """Why ``sample_eps`` / ``snapshot_eps`` in ``meta`` are malformed, or None."""
    for key in ("sample_eps", "snapshot_eps"):
        values = meta.get(key)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf"))
            for v in values
        ):
            return f"metadata {key} must be a list of non-negative finite numbers or nulls"
        if key == "sample_eps" and (posterior.kind != "samples" or len(values) != posterior.num_samples):
            count = posterior.num_samples if posterior.kind == "samples" else "no"
            return f"metadata sample_eps has {len(values)} entries for {count} stored samples"
    return None


# --- writing ---------------------------------------------------------------------------


def _param_tensors(posterior: Posterior) -> dict[str, torch.Tensor]:
    return posterior.mean() if posterior.kind == "gaussian" else posterior.sample(None)


def _tensors_of(posterior: Posterior, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(posterior, GaussianPosterior):
        parts = {"mean": posterior.mean(), "std": posterior.std()}
    elif isinstance(posterior, SamplePosterior):
        parts = {"samples": posterior.sample(None)}
    else:
        raise ConfigError(f"cannot save {path}: {type(posterior).__name__} is not a certbnn posterior")
    out = {}
    for part, tensors in parts.items():
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise PosteriorFileError(f"refusing to save {path}: {part}[{name!r}] contains NaN or infinite values")
            out[f"{part}/{name}"] = t.detach().cpu().clone(memory_format=torch.contiguous_format)
    if isinstance(posterior, SamplePosterior) and posterior.frequencies is not None:
        out["weights"] = posterior.frequencies.detach().cpu().clone()
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} value {value!r:.60} is not JSON-serializable")


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, "posterior file", PosteriorFileError)


# --- reading ---------------------------------------------------------------------------


def _read_metadata(path: Path, data: bytes) -> dict[str, Any]:
    """The certbnn metadata of an already validated safetensors byte string."""
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    text = (header.get("__metadata__") or {}).get(_META_KEY)
    if text is None:
        raise PosteriorFileError(f"{path} is a safetensors file without certbnn posterior metadata")
    problem = _json_limits_problem(text)
    if problem:
        raise PosteriorFileError(f"{path} has unreadable certbnn metadata ({problem})")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise PosteriorFileError(f"{path} has corrupt certbnn metadata (not a JSON object)")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PosteriorFileError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise PosteriorFileError(
            f"{path} uses posterior format version {version}, but certbnn {__version__} "
            f"reads versions up to {FORMAT_VERSION}; upgrade certbnn"
        )
    if meta.get("kind") not in ("gaussian", "samples"):
        raise PosteriorFileError(f"{path} has an unknown posterior kind {meta.get('kind')!r}")
    if not _valid_fingerprint(meta.get("architecture")):
        raise PosteriorFileError(f"{path} has corrupt architecture metadata")
    return meta


def _json_limits_problem(text: str) -> str | None:
    """Why the JSON ``text`` is too large or nested too deeply to parse safely, or None."""
    if len(text) > MAX_METADATA_BYTES:
        return f"{len(text)} characters, more than {MAX_METADATA_BYTES}"
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = deepest = 0
    for char in brackets:
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_METADATA_DEPTH:
            return f"nested deeper than {MAX_METADATA_DEPTH} levels"
    return None


def _valid_fingerprint(arch: Any) -> bool:
    try:
        params = arch["fingerprint"]["parameters"]
        return (
            isinstance(params, list)
            and bool(params)
            and all(
                isinstance(p["name"], str) and all(isinstance(d, int) and d >= 0 for d in p["shape"]) for p in params
            )
        )
    except (TypeError, KeyError):
        return False


def _rebuild(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Posterior:
    names = [p["name"] for p in meta["architecture"]["fingerprint"]["parameters"]]
    parts = ("mean", "std") if meta["kind"] == "gaussian" else ("samples",)
    expected = {f"{part}/{name}" for part in parts for name in names}
    present = set(tensors) - {"weights"} if meta["kind"] == "samples" else set(tensors)
    if present != expected:
        odd = sorted(present ^ expected)[0]
        raise PosteriorFileError(f"{path} is inconsistent: tensor {odd!r} does not match its metadata")
    dicts = {part: {name: tensors[f"{part}/{name}"] for name in names} for part in parts}
    for part, params in dicts.items():
        for name, t in params.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise PosteriorFileError(f"{path}: {part}[{name!r}] is not finite floating-point data (NaN/inf?)")
    stored = fingerprint_of_params(dicts[parts[0]], batch_dims=int(meta["kind"] == "samples"))
    difference = fingerprint_difference(meta["architecture"]["fingerprint"], stored)
    if difference:
        raise PosteriorFileError(f"{path} is inconsistent with its own metadata: {difference}")
    try:
        if meta["kind"] == "gaussian":
            return GaussianPosterior(dicts["mean"], dicts["std"])
        return SamplePosterior(dicts["samples"], tensors.get("weights"))
    except ConfigError as err:
        raise PosteriorFileError(f"{path}: {err}") from None
