"""Presets: a TOML description of a grid of training runs and their evaluations.

A preset file has these tables (every key optional except ``experiment``)::

    [preset]            name, description, front, target
    [train]             TrainConfig fields shared by every cell
    [evaluate]          EvalOptions fields shared by every cell (eps, limit, samples, ...)
    [methods.NAME]      TrainConfig overrides for one inference method
    [modes.NAME]        TrainConfig overrides for one training mode (e.g. likelihood = "ibp")
    [[experiment]]      one block per data set / model:
        name, dataset, model, methods = [...], modes = [...]
        [experiment.train]          overrides for this experiment
        [experiment.evaluate]       evaluation overrides (e.g. ood = "fashion-mnist")
        [experiment.method_settings.NAME]   method overrides for this experiment only
        [experiment.sweep]          KEY = [values]: one cell per point of the product

A cell's training config merges, later winning: ``train`` < ``experiment.train`` <
``methods.M`` < ``experiment.method_settings.M`` < ``modes.X`` < the sweep point; the
``method_options`` / ``likelihood_options`` tables merge key by key. ``init_from =
"cell:M"`` warm-starts from method M's cell of the same experiment, mode and sweep
point (e.g. HMC from SGD), which then runs first.

``front = true`` adds to the report a clean vs certified accuracy front over every cell of
a data set (:mod:`certbnn.reproduce.report`); ``target = { clean = 0.97, certified = 0.90 }``
(fractions in [0, 1], either or both; needs ``front``) names the best cell that meets it, or
the closest one. Both are recorded in ``results.json`` like ``description``.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from certbnn.config import FIELDS, TrainConfig, make_config
from certbnn.errors import ConfigError
from certbnn.evaluation.runner import EvalOptions
from certbnn.safe_open import read_regular
from certbnn.settings import check_settings

PRESET_PACKAGE = "certbnn.reproduce.presets"
_EVAL_FIELDS = {f.name for f in fields(EvalOptions)}
_TOP_KEYS = {"preset", "train", "evaluate", "methods", "modes", "experiment"}
_PRESET_KEYS = {"name", "description", "front", "target"}
_TARGET_KEYS = ("clean", "certified")
_EXPERIMENT_KEYS = {"name", "dataset", "model", "methods", "modes", "train", "evaluate", "method_settings", "sweep"}
_MERGED_TABLES = ("method_options", "likelihood_options")
CELL_REF = "cell:"


@dataclass(frozen=True)
class Cell:
    """One training run plus its evaluation."""

    experiment: str
    method: str
    mode: str
    sweep: tuple[tuple[str, Any], ...]
    config: TrainConfig
    evaluate: EvalOptions
    depends_on: str | None = None  # cell id whose run is this cell's init_from

    @property
    def id(self) -> str:
        point = "".join(f"/{key}={value}" for key, value in self.sweep)
        return f"{self.experiment}/{self.method}/{self.mode}{point}"

    @property
    def dirname(self) -> str:
        return file_stem(self.id.replace("/", "__"))


def file_stem(name: str) -> str:
    """``name`` with every character but ``A-Za-z0-9_.=+-`` replaced by ``_``: safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)


@dataclass
class Preset:
    name: str
    description: str
    cells: list[Cell]
    experiments: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    front: bool = False  # the report draws the clean vs certified front
    target: dict[str, float] | None = None  # {"clean": 0.97, "certified": 0.9} (either or both)


def list_presets() -> list[str]:
    """Names of the presets shipped with certbnn."""
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".toml"))


def read_preset_text(name_or_path: str) -> tuple[str, str]:
    """(TOML text, source) of a shipped preset name or a path to a user's TOML file."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if not path.exists():
            raise ConfigError(f"{path}: preset file not found")
        try:  # a regular file only: a FIFO would block forever
            return read_regular(path, "preset file", ConfigError).decode("utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: cannot read preset ({exc})") from None
    if name_or_path not in list_presets():
        raise ConfigError(
            f"unknown preset {name_or_path!r} (shipped: {', '.join(list_presets())}; or give a path to a .toml file)"
        )
    return resources.files(PRESET_PACKAGE).joinpath(f"{name_or_path}.toml").read_text(), f"preset:{name_or_path}"


def load_preset(
    name_or_path: str, overrides: dict[str, Any] | None = None, eval_overrides: dict[str, Any] | None = None
) -> Preset:
    """Parse and expand a preset into its cells (validated; unknown keys are errors).

    ``overrides`` (TrainConfig fields) and ``eval_overrides`` (EvalOptions fields)
    win over everything in the file, e.g. ``{"device": "cuda"}`` from the CLI.
    """
    text, source = read_preset_text(name_or_path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    return expand(raw, source, overrides or {}, eval_overrides or {})


def expand(raw: dict[str, Any], source: str, overrides: dict[str, Any], eval_overrides: dict[str, Any]) -> Preset:
    """The cells of a parsed preset, in run order (dependencies first)."""
    _known(raw, _TOP_KEYS, source)
    header = raw.get("preset", {})
    _known(header, _PRESET_KEYS, f"{source} [preset]")
    front, target = _front_keys(header, f"{source} [preset]")
    experiments = raw.get("experiment")
    if not isinstance(experiments, list) or not experiments:
        raise ConfigError(f"{source}: needs at least one [[experiment]] table")
    train_defaults = _train_table(raw.get("train", {}), f"{source} [train]")
    eval_defaults = _eval_table(raw.get("evaluate", {}), f"{source} [evaluate]")
    methods = {k: _train_table(v, f"{source} [methods.{k}]") for k, v in raw.get("methods", {}).items()}
    modes = {k: _train_table(v, f"{source} [modes.{k}]") for k, v in raw.get("modes", {}).items()}
    overrides = _train_table(overrides, "--set overrides")
    eval_overrides = _eval_table(eval_overrides, "--eval-set overrides")

    cells: list[Cell] = []
    names: set[str] = set()
    for i, exp in enumerate(experiments):
        where = f"{source} [[experiment]] #{i + 1}"
        _known(exp, _EXPERIMENT_KEYS, where)
        if "dataset" not in exp:
            raise ConfigError(f"{where}: needs a dataset")
        name = str(exp.get("name", exp["dataset"]))
        if name in names:
            raise ConfigError(f"{where}: experiment name {name!r} used twice (set distinct `name`s)")
        names.add(name)
        exp_methods = exp.get("methods", list(methods))
        exp_modes = exp.get("modes", list(modes))
        if not isinstance(exp_methods, list) or not isinstance(exp_modes, list):
            raise ConfigError(
                f"{where}: `methods` and `modes` are lists of names "
                "(per-method settings go in [experiment.method_settings.NAME])"
            )
        if not exp_methods or not exp_modes or len(set(exp_methods)) != len(exp_methods):
            raise ConfigError(f"{where}: needs non-empty methods and modes lists without repeats")
        unknown_modes = [m for m in exp_modes if m not in modes]
        if unknown_modes:
            raise ConfigError(f"{where}: mode(s) {', '.join(unknown_modes)} have no [modes.NAME] table")
        exp_train = _train_table(exp.get("train", {}), f"{where} train")
        exp_eval = _eval_table(exp.get("evaluate", {}), f"{where} evaluate")
        exp_method_tables = {
            k: _train_table(v, f"{where} method_settings.{k}") for k, v in exp.get("method_settings", {}).items()
        }
        sweep = exp.get("sweep", {})
        for key, values in sweep.items():
            if key not in FIELDS or key in ("method", "dataset", "model"):
                raise ConfigError(f"{where}: cannot sweep {key!r} (sweep TrainConfig fields such as lam or eps)")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: sweep {key} needs a non-empty list of values")
        points = [tuple(zip(sweep, combo)) for combo in itertools.product(*sweep.values())] if sweep else [()]
        base = {"dataset": exp["dataset"], **({"model": exp["model"]} if "model" in exp else {})}
        evaluate = EvalOptions(**{**eval_defaults, **exp_eval, **eval_overrides}).validate()
        for point in points:
            for mode in exp_modes:
                for method in exp_methods:
                    layers = [
                        train_defaults,
                        base,
                        exp_train,
                        methods.get(method, {}),
                        exp_method_tables.get(method, {}),
                        modes[mode],
                        dict(point),
                        {"method": method},
                        overrides,
                    ]
                    values = _merge(layers)
                    depends = None
                    ref = values.get("init_from")
                    if isinstance(ref, str) and ref.startswith(CELL_REF):
                        start_method = ref[len(CELL_REF) :]
                        if start_method not in exp_methods[: exp_methods.index(method)]:
                            raise ConfigError(
                                f"{where}: {method} starts from {ref!r}, which must be a method "
                                "listed before it in this experiment"
                            )
                        depends = Cell(name, start_method, mode, point, TrainConfig(), evaluate).id
                    try:
                        config = make_config({}, values)
                    except ConfigError as exc:
                        raise ConfigError(f"{where}, {method}/{mode}: {exc}") from None
                    cells.append(Cell(name, method, mode, point, config, evaluate, depends))
    _check_collisions(cells, source)
    if front:
        _check_front_files([str(e["dataset"]) for e in experiments], source)
    return Preset(
        str(header.get("name", Path(source).stem)),
        str(header.get("description", "")),
        cells,
        [dict(e) for e in experiments],
        raw,
        source,
        front=front,
        target=target,
    )


def select(cells: list[Cell], patterns: list[str]) -> list[Cell]:
    """Cells whose id contains any of ``patterns`` (all when empty), plus the cells they start from.
    A pattern starting with ``^`` must match the start of the id (``^mnist/`` leaves out
    ``fashion-mnist/...``, which ``mnist/`` would match)."""
    if not patterns:
        return cells
    chosen = {c.id for c in cells if any(_matches(c.id, p) for p in patterns)}
    if not chosen:
        raise ConfigError(f"--only {','.join(patterns)} matches no cell (ids look like {cells[0].id})")
    by_id = {c.id: c for c in cells}
    for cell_id in list(chosen):
        dep = by_id[cell_id].depends_on
        while dep is not None:
            chosen.add(dep)
            dep = by_id[dep].depends_on
    return [c for c in cells if c.id in chosen]


def _matches(cell_id: str, pattern: str) -> bool:
    return cell_id.startswith(pattern[1:]) if pattern.startswith("^") else pattern in cell_id


def _check_collisions(cells: list[Cell], source: str) -> None:
    """Every cell needs its own id and its own folder, every experiment its own plot
    files (compared ignoring case, for case-insensitive file systems): otherwise one
    cell would resume, overwrite or retrain another's run. A ConfigError names both."""
    ids: set[str] = set()
    folders: dict[str, Cell] = {}
    plots: dict[str, str] = {}  # the report's per-experiment plot files
    for cell in cells:
        if cell.id in ids:
            raise ConfigError(
                f"{source}: two cells have the id {cell.id!r} (a repeated sweep value or "
                "experiment?); every cell needs its own id"
            )
        ids.add(cell.id)
        other = folders.setdefault(cell.dirname.casefold(), cell)
        if other is not cell:
            raise ConfigError(
                f"{source}: cells {other.id!r} and {cell.id!r} would share the folder "
                f"cells/{cell.dirname} (names differing only in punctuation or case); rename one"
            )
        other_name = plots.setdefault(file_stem(cell.experiment).casefold(), cell.experiment)
        if other_name != cell.experiment:
            raise ConfigError(
                f"{source}: experiments {other_name!r} and {cell.experiment!r} would share the plot "
                f"files *_{file_stem(cell.experiment)}.png (names differing only in punctuation "
                "or case); rename one"
            )


def _front_keys(header: dict[str, Any], where: str) -> tuple[bool, dict[str, float] | None]:
    """``front`` (a boolean, default false) and ``target`` (None, or a table of ``clean`` and/or
    ``certified`` accuracy fractions in [0, 1]) of the ``[preset]`` table; one-line errors."""
    front = header.get("front", False)
    if not isinstance(front, bool):
        raise ConfigError(f"{where}: front must be true or false, got {front!r}")
    if "target" not in header:
        return front, None
    target = header["target"]
    if not isinstance(target, dict) or not target:
        raise ConfigError(
            f"{where}: target must be a table such as {{ clean = 0.97, certified = 0.90 }}, got {target!r}"
        )
    _known(target, set(_TARGET_KEYS), f"{where} target")
    for key, value in target.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and 0 <= value <= 1):  # false for nan and inf too
            raise ConfigError(
                f"{where}: target.{key} must be a number in [0, 1] (an accuracy fraction: 0.97 = 97 %), got {value!r}"
            )
    if not front:
        raise ConfigError(f"{where}: target needs front = true (the target is reported with the front)")
    return front, {key: float(target[key]) for key in _TARGET_KEYS if key in target}


def _check_front_files(datasets: list[str], source: str) -> None:
    """Every data set needs its own front plot ``front_<dataset>.png`` (compared ignoring case)."""
    stems: dict[str, str] = {}
    for dataset in datasets:
        other = stems.setdefault(file_stem(dataset).casefold(), dataset)
        if other != dataset:
            raise ConfigError(
                f"{source}: data sets {other!r} and {dataset!r} would share the front plot "
                f"front_{file_stem(dataset)}.png (names differing only in punctuation or case); rename one"
            )


def _merge(layers: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            merged[key] = {**merged.get(key, {}), **value} if key in _MERGED_TABLES else value
    return merged


def _known(table: Any, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")


def _train_table(table: Any, where: str) -> dict[str, Any]:
    """A table of TrainConfig fields, names, types and ranges checked (the cell's full config is
    checked again once merged, e.g. method options against the cell's method)."""
    _known(table, set(FIELDS), where)
    return check_settings(TrainConfig, table, where=f"{where}: ")


def _eval_table(table: Any, where: str) -> dict[str, Any]:
    """A table of EvalOptions fields, names, types and ranges checked."""
    _known(table, _EVAL_FIELDS, where)
    return check_settings(EvalOptions, table, where=f"{where}: ", what="evaluation setting")
