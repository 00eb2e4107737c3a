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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from certbnn.errors import ConfigError
from certbnn.safe_open import read_regular
from certbnn.schedules import LR_SCHEDULES
from certbnn.settings import LAM_LABEL, MILLION, SEED, UNIT, Range, at_least, between, check_settings, one_of, positive


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as ``RUN_DIR/config.json``)."""

    dataset: str = "mnist"  # a registered name, PATH.npz, or a folder <root>/<name>/data.npz
    data_dir: str | None = None
    dataset_file: str | None = None  # an npz data set's file (absolute), recorded when the run starts
    dataset_sha256: str | None = None  # that file's sha256: recorded, or given to pin it; checked on every use
    model: str = "mlp:512"
    method: str = "bbb"
    likelihood: str = "ibp"  # standard | ibp | crown-ibp | crown | fgsm | pgd
    lam: float = 0.25  # weight of the clean term in the robust/adversarial mix
    mix: str = "prob"  # prob (the paper's) | loss
    margins: bool = False  # worst-case logits from margin bounds (tighter)
    eps: float = 0.11  # training radius reached by the schedule (pixel units)
    warmup_epochs: float = 0.0  # epochs at eps = 0 before the ramp
    ramp_fraction: float = 0.5  # fraction of the remaining steps spent ramping, then hold
    lam_start: float | None = None  # lam during warm-up, ramped to lam with eps (None: lam throughout)
    beta: float = 1.0  # crown-ibp: bounds = beta CROWN-IBP + (1 - beta) IBP once eps is reached
    beta_start: float | None = None  # crown-ibp: beta at the ramp's start, ramped to beta with eps
    lr_schedule: str = "auto"  # auto (cosine for optimisers, constant for samplers) | constant | cosine
    epochs: int = 20
    batch_size: int = 128
    lr: float | None = None  # passed to the method (its default when None)
    kl_weight: float | None = None  # BBB KL weight / posterior temperature (method default when None)
    prior_scale: float = 1.0  # prior variance = prior_scale / fan_in
    seed: int = 0
    limit_train: int | None = None  # use only this many training examples (quick runs)
    augment: int = 0  # append this many randomly transformed copies (paper CIFAR-10: 40000)
    augment_each_epoch: bool = False  # draw new copies every epoch (on-the-fly augmentation)
    val_size: int = 1000  # held-out training examples for per-epoch validation
    val_samples: int = 8  # posterior samples used in validation
    test_size: int | None = None  # test points scored into metrics.json at the end (None: all)
    device: str = "auto"  # cpu | cuda[:N] | auto (a GPU when present)
    parallel: str = "data"  # under torchrun: data (shard the data) | chains (one sampler chain per process)
    init_from: str | None = None  # posterior file or run dir whose mean initialises the weights
    method_options: dict[str, Any] = field(default_factory=dict)
    likelihood_options: dict[str, Any] = field(default_factory=dict)

    # ranges of the fields (types come from the annotations above; see certbnn.settings)
    SETTING_RANGES: ClassVar[dict[str, Range]] = {
        "lam": UNIT,
        "mix": one_of("prob", "loss"),
        "eps": UNIT,
        "warmup_epochs": at_least(0),
        "ramp_fraction": UNIT,
        "lam_start": UNIT,
        "beta": UNIT,
        "beta_start": UNIT,
        "lr_schedule": one_of("auto", *LR_SCHEDULES),
        "epochs": at_least(1),
        "batch_size": at_least(1),
        "lr": positive(),
        "kl_weight": positive(),
        "prior_scale": positive(),
        "seed": SEED,
        "limit_train": at_least(1),
        "augment": between(0, 100 * MILLION),
        "val_size": at_least(0),
        "val_samples": between(1, MILLION),
        "test_size": at_least(1),
        "parallel": one_of("data", "chains"),
    }
    SETTING_LABELS: ClassVar[dict[str, str]] = LAM_LABEL

    def validate(self, *, check_model: bool = True) -> TrainConfig:
        """Check every field's type and range (ConfigError naming the key and value); returns self.
        ``check_model=False``: ``model`` is only a label (a module given to :func:`certbnn.fit`)."""
        check_settings(TrainConfig, dataclasses.asdict(self))
        if not (self.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError(f"device must be cpu, cuda[:N] or auto, got {self.device!r}")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs {self.warmup_epochs:g} exceeds the {self.epochs} training epochs")
        for name in ("dataset", "model", "method", "likelihood"):
            if not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty string, got ''")
        if self.dataset_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.dataset_sha256):
            raise ConfigError(f"dataset_sha256 must be 64 lowercase hex digits, got {self.dataset_sha256!r}")
        self._check_schedules()
        check_method_options(self.method, self.method_options)
        check_likelihood_options(self.likelihood, self.likelihood_options)
        self._check_against_dataset(check_model)
        return self

    def _check_schedules(self) -> None:
        """lambda, beta and learning-rate schedules only where they change something."""
        if self.lam_start is not None and self.likelihood not in ROBUST_LIKELIHOODS + ADVERSARIAL_LIKELIHOODS:
            raise ConfigError(
                f"lam_start schedules the clean weight of a robust or adversarial likelihood; "
                f"likelihood {self.likelihood!r} has none (unset lam_start)"
            )
        if (self.beta != 1.0 or self.beta_start is not None) and self.likelihood != "crown-ibp":
            raise ConfigError(
                f"beta / beta_start mix CROWN-IBP with IBP bounds: they need likelihood crown-ibp, "
                f"not {self.likelihood!r}"
            )
        if self.lr_schedule == "cosine" and self.method in SAMPLERS:
            raise ConfigError(
                f"lr_schedule {self.lr_schedule!r} is for optimisers; {self.method} is a sampler whose "
                "step size sets the distribution it samples (use lr_schedule = 'constant')"
            )

    @property
    def resolved_lr_schedule(self) -> str:
        """The learning-rate schedule that training uses: ``auto`` is ``cosine`` for the optimisers
        (+4.4 points certified on MNIST at 30 epochs, docs/RESULTS.md "Recipe search") and
        ``constant`` for the samplers, whose step size is part of the distribution they sample."""
        if self.lr_schedule != "auto":
            return self.lr_schedule
        return "constant" if self.method in SAMPLERS else "cosine"

    def dataset_spec(self):
        """The data set's spec. An npz data set (``PATH.npz`` or ``<root>/<name>/data.npz``) is
        read and checked again, from ``dataset_file`` when that still exists, and its path and
        sha256 are recorded in ``dataset_file`` / ``dataset_sha256``; a file whose sha256 differs
        from a recorded one is refused (ConfigError)."""
        from certbnn import data
        from certbnn.data import npz
        from certbnn.data.registry import registered_spec

        registered = registered_spec(self.dataset)
        spec = None
        if registered is None or registered.source is not None:
            spec = npz.resolve(self.dataset, self.data_dir, self.dataset_file)
        if spec is None:
            if self.dataset_file is not None or self.dataset_sha256 is not None:
                if registered is None or registered.source is not None:
                    raise ConfigError(
                        f"data set {self.dataset!r}: its recorded file {self.dataset_file} is missing "
                        f"and no {self.dataset}/data.npz was found under the data roots"
                    )
                raise ConfigError(
                    f"data set {self.dataset!r} is a registered data set, not an npz file: "
                    "dataset_file / dataset_sha256 do not apply"
                )
            if registered is not None and registered.source is not None:
                data.unregister(self.dataset)  # an npz data set no longer found where it was
            return data.get_spec(self.dataset, self.data_dir)
        if self.dataset_sha256 is not None and spec.sha256 != self.dataset_sha256:
            raise ConfigError(
                f"data set {self.dataset!r}: {spec.source} has sha256 {spec.sha256}, but the run "
                f"was made with {self.dataset_sha256} (the file changed; retrain, or restore it)"
            )
        self.dataset_file, self.dataset_sha256 = str(spec.source), spec.sha256
        return spec

    def _check_against_dataset(self, check_model: bool = True) -> None:
        """The likelihood suits the data set and the model fits it and the memory (nothing allocated)."""
        from certbnn.models import build_model
        from certbnn.models import check_model as build_check
        from certbnn.plugins import check_bounds, is_plugin_spec

        spec = self.dataset_spec()
        if self.augment_each_epoch and not self.augment:
            raise ConfigError("augment_each_epoch redraws the augmented copies every epoch: set augment > 0")
        if self.augment_each_epoch and self.method == "hmc":
            raise ConfigError(
                "augment_each_epoch changes the training set every epoch; hmc's potential must be one function "
                "of the weights over fixed data (use the fixed copies: augment_each_epoch = false)"
            )
        if self.augment and len(spec.image_shape) != 3:
            raise ConfigError(
                f"augment transforms images (C, H, W); data set {self.dataset!r} holds feature "
                f"vectors {spec.image_shape} (use augment = 0)"
            )
        if self.likelihood == "gaussian" and spec.num_classes > 1:
            raise ConfigError(
                f"likelihood 'gaussian' is for regression, but data set {self.dataset!r} has "
                f"{spec.num_classes} classes (use standard, ibp, crown-ibp, crown, fgsm or pgd)"
            )
        if check_model and is_plugin_spec(self.model):  # user code: built once, bounds checked when needed
            model = build_model(self.model, spec.image_shape, spec.num_classes)
            if self.likelihood in ROBUST_LIKELIHOODS:
                check_bounds(self.model, model, spec.image_shape, self.likelihood)
        elif check_model:
            build_check(self.model, spec.image_shape, spec.num_classes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
ROBUST_LIKELIHOODS = ("ibp", "crown-ibp", "crown")  # likelihoods that bound the network
ADVERSARIAL_LIKELIHOODS = ("fgsm", "pgd")
SAMPLERS = ("hmc", "sghmc", "swag")  # methods whose learning rate is part of what they sample


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict of TrainConfig fields (names, types and ranges checked)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(
                f"{path}: config file not found" if not path.exists() else f"{path}: config file is not a regular file"
            )
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({_one_line(exc)})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    train_table = raw.pop("train", {})
    if not isinstance(train_table, dict):
        raise ConfigError(f"{path}: train must be a table, got {train_table!r}")
    values = dict(train_table)
    values.update(raw)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(FIELDS))})")
    return check_settings(TrainConfig, values, where=f"{path}: ")


# Fields whose default changed after runs were saved without them: the value that reproduces how
# such a run trained (a saved config missing the field ran with it).
SAVED_DEFAULTS: dict[str, Any] = {"lr_schedule": "constant"}


def load_saved_config(path: str | Path) -> dict[str, Any]:
    """The settings of a run's ``config.json`` (a JSON table of TrainConfig fields, checked);
    fields it predates take :data:`SAVED_DEFAULTS`, then their defaults."""
    path = Path(path)
    try:  # a regular file only: a FIFO would block forever
        values = json.loads(read_regular(path, "run config", ConfigError).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({_one_line(exc)})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if isinstance(values, dict):
        values = {**SAVED_DEFAULTS, **values}
    return check_settings(TrainConfig, values, where=f"{path}: ")


def make_config(*sources: dict[str, Any]) -> TrainConfig:
    """Merge ``sources`` in order over the defaults (e.g. file then flags; option tables merge
    key by key); every value is checked for type and range (:mod:`certbnn.settings`) before
    the config exists."""
    merged: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            if key in ("method_options", "likelihood_options") and isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    return TrainConfig(**check_settings(TrainConfig, merged)).validate()


# options a method or likelihood gets from the trainer, not from the user
_METHOD_INTERNAL = ("prior", "num_data")


def method_option_names(method: str) -> list[str]:
    """The options a user may set for ``method`` (``--opt KEY=VALUE`` / ``[method_options]``)."""
    from certbnn.inference.base import method_class
    from certbnn.settings import field_types

    return sorted(k for k in field_types(method_class(method)) if k not in _METHOD_INTERNAL)


def check_method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the user options of ``method`` (names and types)."""
    from certbnn.inference.base import method_class

    return check_settings(
        method_class(method), options, where=f"method {method!r}: ", exclude=_METHOD_INTERNAL, what="option"
    )


def check_likelihood_options(likelihood: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the user options of ``likelihood`` (names, types, ranges)."""
    from certbnn.likelihoods import likelihood_schema

    cls, fixed = likelihood_schema(likelihood)
    return check_settings(cls, options, where=f"likelihood {likelihood!r}: ", exclude=fixed, what="option")


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with value parsed as JSON when possible (numbers, booleans), else a string;
    ``nan`` / ``inf`` stay strings (so a float setting refuses them by name)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"option {text!r} must look like key=value")
    try:
        parsed = json.loads(value, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError):
        return key.strip(), value
    return key.strip(), parsed


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
