"""``run_grid(preset, out_dir)``: train and evaluate every cell of a preset, resumably.

Layout of ``out_dir``::

    preset.toml                 the preset as given (for the record)
    results.json                every cell's settings, training metrics and evaluation
    RESULTS.md, *.png           the report (:mod:`certbnn.reproduce.report`)
    cells/<cell>/run/           the `certbnn train` run directory of the cell
    cells/<cell>/eval/          its `certbnn evaluate` output
    cells/<cell>/log.txt        the cell's training log
    .certbnn-run                the marker of a certbnn grid folder (a non-empty folder without it is refused)

A killed write's temporary files (``.<name>.<random>.tmp``) are removed when the grid
(re)starts, and those of a cell's run and evaluation when the cell does.

A cell is finished when ``eval/evaluation.json`` exists and was made with the
cell's evaluation options; a rerun skips finished cells, resumes a training run
from its last checkpoint, and evaluates runs that finished training. A cell whose
saved ``config.json`` differs from the preset's is an error (nothing is
overwritten). A cell that fails (e.g. training diverges) is recorded as failed
and the grid goes on; the next run retries it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from certbnn import __version__, data, distributed, strict_json
from certbnn.errors import CertbnnError
from certbnn.evaluation.runner import evaluate_run
from certbnn.fileio import (
    RUN_MARKER,
    atomic_write_text,
    claim_dir,
    file_lock,
    make_dir,
    open_append,
    remove_stale_temps,
)
from certbnn.provenance import code_version, machine_info
from certbnn.reproduce.grid import CELL_REF, Cell, Preset
from certbnn.training import CONFIG, POSTERIOR, normalised_config, resolve_device, train

RESULTS_FORMAT_VERSION = 1
# Several `certbnn reproduce` processes may share one grid folder (one per core, each with its own
# --only): the grid lock is held while results.json and the report are read, merged and written;
# a cell's lock while the cell trains and is evaluated, so that two processes never train one run.
GRID_LOCK = ".certbnn-grid.lock"
CELL_LOCK = ".certbnn-cell.lock"


def cell_status(cell: Cell, out_dir: Path) -> str:
    """``done`` | ``evaluate`` (trained) | ``resume`` (checkpointed) | ``train`` (nothing usable yet)."""
    folder = out_dir / "cells" / cell.dirname
    run, evaluation = folder / "run", folder / "eval" / "evaluation.json"
    _check_same_config(cell, run)
    if (run / POSTERIOR).exists():
        if evaluation.exists():
            try:
                saved = json.loads(evaluation.read_text()).get("options")
            except json.JSONDecodeError:
                saved = None
            if saved == asdict(cell.evaluate):
                return "done"
        return "evaluate"
    return "resume" if (run / "checkpoint.safetensors").exists() else "train"


def run_grid(
    preset: Preset,
    out_dir: str | Path,
    *,
    cells: list[Cell] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str = "",
    invocation: str = "",
    kept: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``cells`` (default: all of the preset's) into ``out_dir``; returns the results dict.

    ``results.json`` and the report are rewritten after every cell, so a killed
    grid leaves a valid partial record. Other processes may run other cells of the same
    folder at the same time: each write merges the cells they recorded, and a cell that
    another process is running is skipped (rerun to collect it). Under torchrun every rank
    works on every cell (training and evaluation are distributed) and rank 0 alone writes;
    two torchrun launches on one folder are not guarded against each other.

    ``command`` is the line that reproduces the whole grid (recorded once); ``invocation`` this
    call's exact line (with the options that chose its cells, default ``command``), recorded as
    ``invocation`` in each cell whose training this call ran or finished; a cell it only
    evaluates or collects keeps the invocation it had.

    ``kept`` (from :func:`load_kept_cells`) are finished cells of another results file that
    this folder's results stand on, unchanged, as if run here: a cell the folder holds (in its
    ``results.json`` or as a cell folder) or that this call runs is never replaced by one.
    """
    from certbnn.reproduce.report import report_files

    comm = distributed.current()
    main = comm is None or comm.is_main
    progress, log = (progress, log) if main else (False, lambda line: None)
    cells = preset.cells if cells is None else cells
    out_dir = claim_dir(out_dir, "grid") if main else Path(out_dir)  # never into someone else's folder
    if comm is not None:
        comm.barrier()  # rank 0 has claimed the folder before any rank makes a cell folder in it
    if main:  # what a killed write left behind: under the lock, no other process is writing
        experiments = sorted({c.experiment for c in preset.cells})
        datasets = sorted({str(e["dataset"]) for e in preset.experiments})
        with file_lock(out_dir / GRID_LOCK, what="grid lock"):
            remove_stale_temps(out_dir, ["results.json", RUN_MARKER, *report_files(experiments, datasets)])
    statuses = {cell.id: cell_status(cell, out_dir) for cell in cells}  # validates before any work
    devices = sorted({str(resolve_device(cell.config.device)) for cell in cells})
    results = _load_results(out_dir / "results.json", preset)
    results.update(
        {
            "format_version": RESULTS_FORMAT_VERSION,
            "certbnn_version": __version__,
            "code": code_version(),
            "preset": preset.name,
            "description": preset.description,
            "front": preset.front,
            "target": preset.target,
            "source": preset.source,
            "command": command or results.get("command", ""),
            "machine": machine_info(",".join(devices)),
            "experiments": preset.experiments,
        }
    )
    known = {cell.id for cell in preset.cells}
    results["cells"] = {k: v for k, v in results.get("cells", {}).items() if k in known}
    todo = sum(s != "done" for s in statuses.values())
    log(f"{preset.name}: {len(cells)} cells, {len(cells) - todo} already finished, {todo} to run, in {out_dir}")
    if kept and main:
        own = {c.id for c in preset.cells if (out_dir / "cells" / c.dirname).exists()} | set(statuses)
        added = {k: v for k, v in kept.items() if k not in results["cells"] and k not in own}
        results["cells"].update(added)
        log(f"kept {len(added)} finished cell(s) of another results file ({len(kept) - len(added)} held or run here)")
    bar = tqdm(cells, desc=preset.name, unit="cell", disable=not progress)
    failures, mine = [], set()
    for cell in bar:
        bar.set_postfix_str(cell.id)
        status = statuses[cell.id]
        entry = results["cells"].get(cell.id, {})
        if status == "done" and entry.get("status") == "done":
            continue
        with contextlib.ExitStack() as held:
            try:
                if not held.enter_context(_cell_lock(cell, out_dir, guarded=comm is None)):
                    log(f"{cell.id}: another process is running this cell; skipped (rerun to collect it)")
                    continue
                if comm is None:
                    status = cell_status(cell, out_dir)  # that process may have finished it meanwhile
                previous = entry
                entry = _run_cell(cell, out_dir, status, main)
                if entry and entry.get("wall_seconds") is None:
                    entry["wall_seconds"] = previous.get("wall_seconds")  # only re-evaluated: keep the training's
                recorded = (invocation or command) if status in ("train", "resume") else previous.get("invocation")
                if entry and recorded:
                    entry["invocation"] = recorded
            except CertbnnError as exc:
                entry = {**_describe(cell), "status": "failed", "error": str(exc)}
                failures.append(cell.id)
                log(f"{cell.id}: failed: {exc}")
            finally:
                if comm is not None:
                    comm.barrier()  # rank 0 has written the cell's files before anyone reads them
        if not main:
            continue
        results["cells"][cell.id] = entry
        mine.add(cell.id)
        try:  # results.json holds the cell: a report that cannot be written must not stop the grid
            _save(results, mine, preset, out_dir)
        except _ReportError as exc:  # reported, and raised again by the final report below
            log(f"report not written after {cell.id} ({exc}); the grid goes on")
        if status != "done" and entry.get("status") == "done":
            log(f"{cell.id}: {_headline(entry)}")
    bar.close()
    if main:
        try:
            _save(results, mine, preset, out_dir)
        except _ReportError as exc:
            raise exc.__cause__ from None
    if failures:
        raise CertbnnError(
            f"{len(failures)} cell(s) failed ({', '.join(failures)}); see {out_dir / 'results.json'}; "
            "rerun the same command to retry them"
        )
    return results


class _ReportError(Exception):
    """The report could not be written (results.json was); ``__cause__`` is the error."""


def _save(results: dict[str, Any], mine: set[str], preset: Preset, out_dir: Path) -> None:
    """Write ``results.json`` and the report, under the grid lock: the cells that other processes
    recorded since this one loaded the file are taken from disk, except those in ``mine`` (this
    process ran them); cells in the preset's order."""
    from certbnn.reproduce.report import write_report

    with file_lock(out_dir / GRID_LOCK, what="grid lock"):
        on_disk = _load_results(out_dir / "results.json", preset).get("cells", {})
        merged = {**results["cells"], **{k: v for k, v in on_disk.items() if k not in mine}}
        results["cells"] = {c.id: merged[c.id] for c in preset.cells if c.id in merged}
        results["seconds_total"] = round(
            sum(
                c.get("wall_seconds") or c.get("train_seconds", 0) + c.get("eval_seconds", 0)
                for c in results["cells"].values()
            ),
            1,
        )
        atomic_write_text(out_dir / "results.json", strict_json.dumps(results, indent=2), "results")
        try:
            write_report(results, out_dir)
        except Exception as exc:  # noqa: BLE001  (the caller decides whether the grid goes on)
            raise _ReportError(f"{type(exc).__name__}: {exc}") from exc


def _cell_folder(cell: Cell, out_dir: Path) -> Path:
    """The cell's folder; a symbolic link on the way to its run or evaluation is refused."""
    folder = out_dir / "cells" / cell.dirname
    linked = [p for p in (out_dir / "cells", folder, folder / "run", folder / "eval") if p.is_symlink()]
    if linked:  # the grid writes only into folders it made, never through a link elsewhere
        raise CertbnnError(f"{linked[0]} is a symbolic link; a grid's cell folders must be its own")
    return folder


@contextlib.contextmanager
def _cell_lock(cell: Cell, out_dir: Path, guarded: bool) -> Iterator[bool]:
    """Yields False when another process holds the cell (it is training or evaluating it)."""
    if not guarded:
        yield True
        return
    folder = make_dir(_cell_folder(cell, out_dir), "cell folder")
    with file_lock(folder / CELL_LOCK, blocking=False, what="cell lock") as free:
        yield free


def _run_cell(cell: Cell, out_dir: Path, status: str, main: bool = True) -> dict[str, Any]:
    folder = _cell_folder(cell, out_dir)
    run, evaluation_dir = folder / "run", folder / "eval"
    config = cell.config
    if cell.depends_on is not None:
        source = (
            out_dir
            / "cells"
            / Cell(
                cell.experiment, config.init_from[len(CELL_REF) :], cell.mode, cell.sweep, config, cell.evaluate
            ).dirname
            / "run"
            / POSTERIOR
        )
        if not source.exists():
            raise CertbnnError(f"{cell.id} starts from {cell.depends_on}, which has no posterior yet")
        config = type(config)(**{**config.to_json(), "init_from": str(source.resolve())})
    train_seconds = 0.0
    cell_start = time.perf_counter()
    if status in ("train", "resume"):
        # status "train" over a run killed before its first checkpoint: train() starts it afresh in
        # place (it refuses a folder that is not a certbnn run); nothing is ever deleted here
        make_dir(folder, "cell folder")
        with open_append(folder / "log.txt", "cell log") if main else open(os.devnull, "w") as log_file:

            def cell_log(line: str) -> None:
                log_file.write(line + "\n")
                log_file.flush()

            start = time.perf_counter()
            train(config, run, resume=status == "resume", progress=False, log=cell_log)
            train_seconds = time.perf_counter() - start
        comm = distributed.current()
        if comm is not None:
            comm.barrier()  # rank 0 has written the posterior that every rank evaluates
    if not main:
        if status != "done":
            evaluate_run(run, cell.evaluate, evaluation_dir, progress=False)
        return {}
    metrics = json.loads((run / "metrics.json").read_text())
    start = time.perf_counter()
    if status != "done":
        evaluate_run(run, cell.evaluate, evaluation_dir, progress=False)
    evaluation = json.loads((evaluation_dir / "evaluation.json").read_text())
    eval_seconds = evaluation.get("seconds", time.perf_counter() - start)
    train_total = sum(e["seconds"] for e in metrics.get("epochs", []))
    return {
        **_describe(cell),
        "status": "done",
        "dir": str(folder.relative_to(out_dir)),
        "data_source": _data_source(config),
        "train_seconds": round(train_total or train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "wall_seconds": round(time.perf_counter() - cell_start, 2) if status in ("train", "resume") else None,
        "device": metrics.get("device"),
        "seconds_per_epoch": metrics.get("seconds_per_epoch"),
        "examples_per_second": metrics.get("examples_per_second"),
        "num_train": metrics.get("num_train"),
        "test_accuracy": metrics.get("test_accuracy"),
        "train_code": metrics.get("code"),  # the code that trained the cell (None: before it was recorded)
        "train_machine": metrics.get("machine"),  # where it was trained (None: before it was recorded)
        **({"chain": metrics["chain"]} if "chain" in metrics else {}),  # HMC: acceptance, distinct samples
        "evaluation": _slim(evaluation),
    }


def _data_source(config) -> str:
    """The name of the folder the training data came from (it tells a variant such as a JPEG
    copy); only the name, so that ``results.json`` holds no path of the machine that ran it."""
    try:
        return data.locate(data.get_spec(config.dataset), config.data_dir).name
    except CertbnnError:
        return "registered arrays"


def _describe(cell: Cell) -> dict[str, Any]:
    return {
        "id": cell.id,
        "experiment": cell.experiment,
        "dataset": cell.config.dataset,
        "model": cell.config.model,
        "method": cell.method,
        "mode": cell.mode,
        "sweep": dict(cell.sweep),
        "config": cell.config.to_json(),
        "evaluate_options": asdict(cell.evaluate),
    }


def _slim(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation without what results.json repeats elsewhere."""
    return {k: v for k, v in evaluation.items() if k not in ("options", "run", "plots")}


def _headline(entry: dict[str, Any]) -> str:
    row = entry["evaluation"]["per_eps"][-1]
    cert = row["certified_accuracy"]
    parts = [f"clean {row['clean_accuracy']:.3f}"]
    if "pgd_accuracy" in row:
        parts.append(f"PGD {row['pgd_accuracy']:.3f}")
    parts += [f"{name} {value:.3f}" for name, value in cert.items()]
    seconds = f"{entry['train_seconds']:.0f} s train, {entry['eval_seconds']:.0f} s eval"
    return f"{', '.join(parts)} at eps {row['eps']} ({seconds})"


def _check_same_config(cell: Cell, run: Path) -> None:
    saved_path = run / CONFIG
    if not saved_path.exists():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError:
        raise CertbnnError(f"{saved_path}: corrupt; delete that cell's folder to rerun it") from None
    detail = _config_difference(saved, cell)
    if detail:
        raise CertbnnError(
            f"cell {cell.id} in {run.parent} was trained with other settings ({detail}); "
            "use another --out, or delete that cell's folder to retrain it"
        )


def _config_difference(saved: dict[str, Any], cell: Cell) -> str:
    """The first (up to three) settings in which a saved training config differs from the cell's,
    as ``key: saved -> wanted``; empty when they describe the same run."""
    saved = normalised_config(saved) or saved  # fields added since the cell ran take their defaults
    wanted = normalised_config(cell.config.to_json())
    if cell.depends_on is not None:
        saved = {**saved, "init_from": wanted["init_from"]}  # resolved to a path when it ran
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:3])


def load_kept_cells(path: str | Path, preset: Preset) -> dict[str, dict[str, Any]]:
    """The finished cells of another ``results.json`` of the same preset, for ``run_grid(kept=...)``.

    Every finished cell must be one of the preset's cells with the same training and evaluation
    settings (it stands for exactly what this grid would compute); anything else is refused with
    a one-line :class:`CertbnnError`, before any work. Failed cells are not kept.
    """
    path = Path(path)
    try:
        other = json.loads(path.read_text())
    except FileNotFoundError:
        raise CertbnnError(f"--keep-from {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CertbnnError(f"--keep-from {path}: not a readable results.json ({type(exc).__name__})") from None
    if not isinstance(other, dict) or not isinstance(other.get("cells"), dict):
        raise CertbnnError(f"--keep-from {path}: not a certbnn reproduce results.json (no cells)")
    if other.get("format_version") != RESULTS_FORMAT_VERSION:
        raise CertbnnError(
            f"--keep-from {path}: results format {other.get('format_version')!r}, "
            f"this certbnn reads {RESULTS_FORMAT_VERSION}"
        )
    if other.get("preset") != preset.name:
        raise CertbnnError(f"--keep-from {path}: holds preset {other.get('preset')!r}, not {preset.name!r}")
    cells = {cell.id: cell for cell in preset.cells}
    kept = {}
    for cell_id, entry in other["cells"].items():
        if not isinstance(entry, dict) or entry.get("status") != "done":
            continue
        if cell_id not in cells:
            raise CertbnnError(f"--keep-from {path}: cell {cell_id} is not a cell of preset {preset.name!r}")
        cell = cells[cell_id]
        detail = _config_difference(entry.get("config") or {}, cell)
        if not detail and entry.get("evaluate_options") != asdict(cell.evaluate):
            detail = "evaluation settings"
        if detail:
            raise CertbnnError(
                f"--keep-from {path}: cell {cell_id} was made with other settings ({detail}); "
                "it cannot stand for this grid's cell"
            )
        kept[cell_id] = entry
    return kept


def _load_results(path: Path, preset: Preset) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # rebuilt from the cell folders, which are the source of truth
    return results if results.get("preset") == preset.name else {}
