"""Training configuration: defaults < TOML file < command-line flags.

A config file is TOML with the :class:`TrainConfig` fields at top level (or in a
``[train]`` table), plus optional ``[method_options]`` and
``[likelihood_options]`` tables passed to the method / likelihood factories.
Unknown keys are an error naming the key, so a typo never silently trains the
wrong model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from certbnn.errors import ConfigError


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as ``RUN_DIR/config.json``)."""

    dataset: str = "mnist"
    data_dir: str | None = None
    model: str = "mlp:512"
    method: str = "bbb"
    likelihood: str = "ibp"          # standard | ibp | crown-ibp | crown | fgsm | pgd
    lam: float = 0.25                # weight of the clean term in the robust/adversarial mix
    mix: str = "prob"                # prob (the paper's) | loss
    margins: bool = False            # worst-case logits from margin bounds (tighter)
    eps: float = 0.11                # training radius reached by the schedule (pixel units)
    warmup_epochs: float = 0.0       # epochs at eps = 0 before the ramp
    ramp_fraction: float = 0.5       # fraction of the remaining steps spent ramping, then hold
    epochs: int = 20
    batch_size: int = 128
    lr: float | None = None          # passed to the method (its default when None)
    kl_weight: float | None = None   # BBB KL weight / posterior temperature (method default when None)
    prior_scale: float = 1.0         # prior variance = prior_scale / fan_in
    seed: int = 0
    limit_train: int | None = None   # use only this many training examples (quick runs)
    augment: int = 0                 # append this many randomly transformed copies (paper CIFAR-10: 40000)
    val_size: int = 1000             # held-out training examples for per-epoch validation
    val_samples: int = 8             # posterior samples used in validation
    test_size: int | None = None     # test points scored into metrics.json at the end (None: all)
    device: str = "auto"             # cpu | cuda[:N] | auto (a GPU when present)
    parallel: str = "data"           # under torchrun: data (shard the data) | chains (one sampler chain per process)
    init_from: str | None = None     # posterior file or run dir whose mean initialises the weights
    method_options: dict[str, Any] = field(default_factory=dict)
    likelihood_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.eps >= 0, f"eps must be >= 0, got {self.eps}"),
            (0 <= self.lam <= 1, f"lambda must be in [0, 1], got {self.lam}"),
            (self.mix in ("prob", "loss"), f"mix must be prob or loss, got {self.mix!r}"),
            (self.prior_scale > 0, f"prior scale must be > 0, got {self.prior_scale}"),
            (self.val_size >= 0 and self.val_samples >= 1, "val_size must be >= 0 and val_samples >= 1"),
            (self.limit_train is None or self.limit_train >= 1, f"limit_train must be >= 1, got {self.limit_train}"),
            (self.test_size is None or self.test_size >= 1, f"test_size must be >= 1, got {self.test_size}"),
            (self.parallel in ("data", "chains"), f"parallel must be data or chains, got {self.parallel!r}"),
            (self.augment >= 0, f"augment must be >= 0, got {self.augment}"),
            (self.lr is None or self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:"),
             f"device must be cpu, cuda[:N] or auto, got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict of TrainConfig fields (validated names)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    values = dict(raw.pop("train", {}))
    values.update(raw)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(FIELDS))})")
    return values


def make_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Merge file then flags over the defaults; option tables merge key by key."""
    merged: dict[str, Any] = {}
    for source in (file_values, flag_values):
        for key, value in source.items():
            if key in ("method_options", "likelihood_options"):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    try:
        return TrainConfig(**merged).validate()
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from None


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with value parsed as JSON when possible (numbers, booleans), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"option {text!r} must look like key=value")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
